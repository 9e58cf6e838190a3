"""A live run survives crafted frames published on a camera's topic: they are counted, never crash it."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
from conftest import SCENARIOS
from test_hostile_payloads import all_dropped_frame, forged_id_frame, huge_pixel_drop_frame

import iotbed
from iotbed.emulation.runner import emulate


def _publish_later(
    host: str,
    port: int,
    payloads: list[bytes],
    delay_s: float,
    errors: list[BaseException],
    topic: str = "frames/cam-0",
) -> None:
    try:
        time.sleep(delay_s)
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="intruder")
        client.connect(host, port)
        client.loop_start()
        try:
            for data in payloads:
                client.publish(topic, data, qos=1).wait_for_publish(timeout=5)
        finally:
            client.loop_stop()
            client.disconnect()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def test_crafted_frames_do_not_take_a_live_run_down(plain_broker) -> None:  # type: ignore[no-untyped-def]
    scenario = iotbed.load_scenario(SCENARIOS / "quickstart.yaml", ["duration=6s", "nodes.cameras.0.count=2"])
    shape = (1, 32, 32)  # the digits dataset: one channel
    crafted = [huge_pixel_drop_frame(), all_dropped_frame(), forged_id_frame(10**9, shape)]
    errors: list[BaseException] = []
    host, port = plain_broker.url.removeprefix("mqtt://").rsplit(":", 1)
    intruder = threading.Thread(target=_publish_later, args=(host, int(port), crafted, 1.5, errors), daemon=True)
    intruder.start()
    summary = emulate(scenario, plain_broker.url, write=False, progress=False).summary
    intruder.join(timeout=10)
    assert not errors, errors
    broker = summary["broker"]
    # each crafted frame reaches every subscriber of frames/cam-0 (the gateway, the edge): counted there
    assert broker["malformed"] >= 2
    assert set(broker["malformed_reasons"]) == {"bad_shape"}
    assert summary["edge_servers"]["edge-0"]["unknown_frames"] >= 1
    assert summary["frames"]["captured"] > 0
    assert summary["frames"]["delivered"] == summary["frames"]["captured"]


def test_forged_escalations_are_counted_by_the_review_desk(plain_broker) -> None:  # type: ignore[no-untyped-def]
    """Frames no edge rejected, published straight onto the reviewers' escalation topic: the desk counts them
    and reviews none of them; the run's own escalations are still resolved."""
    scenario = iotbed.load_scenario(
        SCENARIOS / "quickstart.yaml",
        [
            "duration=8s",
            "nodes.cameras.0.count=2",
            "nodes.edge_servers.0.reject={target: {coverage: 0.8}, action: escalate, to: desk}",
            "nodes.reviewers=[{name: desk, service_time: {distribution: fixed, mean: 10ms}}]",
            "links=[{between: [cam, gw], bandwidth: 20Mbps}, {between: [gw, edge], bandwidth: 100Mbps}, "
            "{between: [edge, desk], bandwidth: 10Mbps, latency: 20ms}]",
        ],
    )
    shape = (1, 32, 32)
    crafted = [forged_id_frame(10**9, shape), forged_id_frame(0, shape), all_dropped_frame()]
    errors: list[BaseException] = []
    host, port = plain_broker.url.removeprefix("mqtt://").rsplit(":", 1)
    intruder = threading.Thread(
        target=_publish_later, args=(host, int(port), crafted, 1.5, errors, "escalations/desk/cam-0"), daemon=True
    )
    intruder.start()
    summary = emulate(scenario, plain_broker.url, write=False, progress=False).summary
    intruder.join(timeout=10)
    assert not errors, errors
    desk = summary["reviewers"]["desk-0"]
    assert desk["unknown_frames"] >= 1  # the forged ids; frame 0 too, unless the edge had rejected it
    assert desk["reviewed"] == summary["selective"]["escalated"]["resolved"] > 0
