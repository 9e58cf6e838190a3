"""Live runs: node logic over a real Mosquitto broker (`iotbed.broker.mqtt_transport.MqttTransport`) under a
realtime SimPy environment.

- `runner`: `emulate()`, what `iotbed emulate` runs;
- `live`: the scenario's nodes on real transports, built once and started per process;
- `workers`: spreading clients over forked worker processes and merging what they measured;
- `paths`: each node's simulated path to the broker, as one shaped hop;
- `shaper`: shaping what a node publishes, in process;
- `netns`: shaping real packets in the kernel (network namespaces, veth, HTB, netem);
- `monitor`: the broker's own `$SYS` counters.
"""

from iotbed.emulation.shaper import LinkShaper, ShaperStats, TokenBucket, make_loss

__all__ = ["LinkShaper", "ShaperStats", "TokenBucket", "make_loss"]
