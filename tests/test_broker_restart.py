"""A broker restart at QoS 1, simulated and live against a real Mosquitto with the same persistence settings:
the same frames lost, for the same reason, and none with the edge's durable subscription."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

import iotbed
from iotbed.broker.mosquitto import MosquittoBroker
from iotbed.emulation.runner import emulate
from iotbed.errors import IotbedError
from iotbed.runner import RunResult
from iotbed.scenario import Scenario, parse_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"

# Four cameras at 2 frames/s from 2 s; with seed 7 they capture at 0.199, 0.222, 0.453 and 0.469 s into every
# half second.
FAR_EDGE = """
name: far_edge
seed: 7
duration: 9s
nodes:
  cameras: [{{name: cam, count: 4, fps: 2, arrivals: periodic, start: 2s}}]
  gateways: [{{name: gw, count: 1}}]
  edge_servers: [{{name: edge, count: 1, persistent_session: true, durable_subscription: {durable}}}]
links:
  - {{between: [cam, gw], bandwidth: 20Mbps, latency: 2ms}}
  - {{between: [gw, edge], bandwidth: 100Mbps, latency: 240ms}}
broker: {{node: gw, qos: {{"frames/#": 1}}, persistence: true}}
faults: [{{kind: broker_restart, at: 3.29s, down: 0.5s}}]
"""


def lost_frames(trace: pd.DataFrame) -> set[tuple[str, int]]:
    """(camera, its n-th frame) of every frame no edge server got: the same frame in both runtimes."""
    trace = trace.sort_values("t_capture")
    nth = trace.groupby("camera").cumcount()
    lost = trace.t_edge < 0
    return set(zip(trace.camera[lost], nth[lost], strict=True))


def both_runtimes(scenario: Scenario, broker: MosquittoBroker) -> tuple[RunResult, RunResult]:
    simulated = iotbed.run(scenario, write=False, progress=False)
    live = emulate(scenario, broker.url, write=False, progress=False, broker_control=broker)
    assert broker.starts == 2  # restarted once, with SIGTERM: Mosquitto writes its database
    assert len(simulated.trace) == len(live.trace)
    return simulated, live


@pytest.mark.parametrize("durable", [False, True])
def test_one_broker_restart_loses_the_same_frames_simulated_and_live(
    durable: bool, broker_factory: Callable[..., MosquittoBroker]
) -> None:
    """One restart at QoS 1 (SIGTERM, persistence on, in both). The broker runs on the cameras' gateway, 2 ms
    from them; the edge server is 240 ms away and holds a persistent session on the shared subscription
    `$share/edge/frames/#`, which Mosquitto 2.0 does not restore (nor, now, `SimBroker`). Everyone reconnects
    with paho's back-off (0.1, 0.2, 0.4 s) across their paths (live: `MqttTransport`'s handshake delays): the
    cameras are back 0.71 s after the restart and send what they held, the edge's SUBSCRIBE arrives 1.98 s
    after it. What reaches the broker in between finds no subscriber, in both runtimes: the frames captured
    from the restart (3.29 s) to 5.27 s, 16 of them. The sets are compared exactly, because no capture is
    near that window's ends: live, a capture runs a few ms late at most, while the restart and the edge's
    reconnection (threads sleeping through its back-off and path) ran up to 130 ms late on a loaded machine,
    so each end lies 48 ms or more after the last capture before it and 160 ms or more before the next; the
    instants a reconnection is accepted or refused are 100 ms or more from the broker's return. With
    `durable_subscription` (a non-shared subscription, which Mosquitto restores) nothing is lost."""
    scenario = parse_scenario(FAR_EDGE.format(durable=str(durable).lower()))
    simulated, live = both_runtimes(scenario, broker_factory("restart", persistence=True))
    sim_lost = lost_frames(simulated.trace)
    assert sim_lost == lost_frames(live.trace)
    if durable:
        assert sim_lost == set()
    else:
        # cam-0 and cam-1 from their 4th frame (3.70 s, 3.72 s), cam-2 and cam-3 from their 3rd (3.45 s, 3.47 s)
        assert sim_lost == {(f"cam-{k}", n + (k < 2)) for k in range(4) for n in range(2, 6)}
        assert simulated.summary["frames"]["dropped"] == {"no_subscriber": 16}
        assert live.summary["broker"]["acknowledged_not_delivered"] == 16  # Mosquitto acknowledged them


def test_an_edge_away_across_a_restart_has_lost_its_shared_subscription_in_both_runtimes(
    broker_factory: Callable[..., MosquittoBroker],
) -> None:
    """The quickstart's edge (it hosts the broker) holds a persistent session on the shared subscription.
    It crashes at 3 s (its connection is seen closed at once and its session queues frames), the broker
    restarts at 3.34 s (the session and its queue survive, its shared subscription does not), the cameras
    are back within a second, and the edge at 6.34 s. What reaches the broker between the restart and the
    edge's return is lost in both runtimes: 4 cameras x 2 frames/s x 3 s. The fault instants are 100 ms or
    more from any capture (the same cameras as FAR_EDGE's), so the sets are compared exactly."""
    overrides = [
        "duration=9s",
        "nodes.cameras.0.count=4",
        "nodes.cameras.0.fps=2",
        "links.0.loss=0",
        "nodes.edge_servers.0.persistent_session=true",
        "faults=[{kind: node_crash, node: edge-0, at: 3s, down: 3.34s}, {kind: broker_restart, at: 3.34s, down: 0.5s}]",
    ]
    scenario = iotbed.load_scenario(SCENARIOS / "quickstart.yaml", overrides)
    assert scenario.broker.persistence
    simulated, live = both_runtimes(scenario, broker_factory("away", persistence=True))
    sim_lost = lost_frames(simulated.trace)
    assert sim_lost == lost_frames(live.trace)
    assert len(sim_lost) == 24  # captured from 3.45 s (the first after the restart) to 6.22 s
    assert simulated.summary["frames"]["dropped"] == {"no_subscriber": 24}


def test_durable_subscription_splits_the_cameras_over_the_edges_and_loses_nothing_in_a_restart() -> None:
    scenario = parse_scenario(
        """
name: two_durable_edges
seed: 3
duration: 20s
nodes:
  cameras: [{name: cam, count: 6, fps: 5}]
  gateways: [{name: gw, count: 1}]
  edge_servers: [{name: edge, count: 2, durable_subscription: true}]
links: [{between: [cam, gw], bandwidth: 100Mbps, latency: 2ms}, {between: [gw, edge], bandwidth: 1Gbps}]
broker: {node: edge-0}
faults: [{kind: broker_restart, at: 8s, down: 1s}]
"""
    )
    result = iotbed.run(scenario, write=False, progress=False)
    trace = result.trace
    assert result.summary["broker"]["restarts"] == 1
    assert len(trace) == 6 * 5 * 20 and (trace.t_edge >= 0).all()
    edges = trace.groupby("camera").edge.unique()
    assert {camera: list(e) for camera, e in edges.items()} == {f"cam-{k}": [f"edge-{k % 2}"] for k in range(6)}


def test_durable_subscription_that_matches_no_camera_is_a_clear_error() -> None:
    scenario = iotbed.load_scenario(
        SCENARIOS / "quickstart.yaml",
        [
            "nodes.edge_servers.0.count=2",
            "nodes.edge_servers.0.durable_subscription=true",
            "nodes.edge_servers.0.subscribe=video/#",
        ],
    )
    with pytest.raises(IotbedError, match=r"nodes\.edge_servers\.0\.durable_subscription: no camera's topic matches"):
        iotbed.run(scenario, write=False, progress=False)
