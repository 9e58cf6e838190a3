"""Live runs: node logic over a real Mosquitto broker (`iotbed.broker.mqtt_transport.MqttTransport`) under
`simpy.rt.RealtimeEnvironment`, with each node's uplink shaped in process (`LinkShaper`)."""

from iotbed.emulation.shaper import LinkShaper, ShaperStats, TokenBucket, make_loss

__all__ = ["LinkShaper", "ShaperStats", "TokenBucket", "make_loss"]
