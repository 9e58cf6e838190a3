"""Queueing on a bottleneck link agrees with queueing theory.

One camera sends fixed-size frames with Poisson arrivals over one link: an M/D/1 queue. Its mean waiting
time is the Pollaczek-Khinchine value rho * S / (2 * (1 - rho)), and a frame finds the link idle with
probability 1 - rho. The simulated means are compared with a tolerance of four standard errors, estimated
from the run itself by batch means (frames in a queue are correlated, so plain i.i.d. errors would be too
small); the test also requires that standard error to be under 4% of the theoretical value, so it cannot
pass merely by being noisy.
"""

from __future__ import annotations

import numpy as np
import pytest

from iotbed.deployment import build_deployment
from iotbed.runner import load_model_bytes, prepare, simulate
from iotbed.scenario import parse_scenario

SCENARIO = """
name: md1
seed: {seed}
duration: {duration}s
nodes:
  cameras: [{{name: cam, count: 1, fps: {fps}, arrivals: poisson}}]
  edge_servers: [{{name: edge, count: 1}}]
links:
  - {{between: [cam, edge], bandwidth: 1Mbps, latency: 3ms, queue: 100000}}
broker: {{node: edge, qos: {{"frames/#": 0}}, transport: udp}}
"""
# transport udp: one packet per frame, the M/D/1 queue of the theory. Over TCP (the default) Nagle's algorithm
# coalesces frames written while one is unacknowledged, ACKs share the link and the window holds frames back.


def batch_means_se(samples: np.ndarray, batches: int = 30) -> float:
    means = np.array([chunk.mean() for chunk in np.array_split(samples, batches)])
    return float(means.std(ddof=1) / np.sqrt(batches))


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_md1_waiting_time_matches_pollaczek_khinchine(rho: float) -> None:
    probe = parse_scenario(SCENARIO.format(seed=3, duration=1, fps=1))
    resolved, artefacts, _ = prepare(probe, progress=False)
    from iotbed.broker.packets import publish_size, tcp_ip_size
    from iotbed.nodes.payloads import raw_frame_bytes

    shape = tuple(int(x) for x in artefacts.images.shape[1:])
    size = tcp_ip_size(publish_size("frames/cam-0", raw_frame_bytes(shape), 0))  # type: ignore[arg-type]
    service = size * 8 / 1e6
    fps = rho / service
    duration = 60_000 * service / rho  # about 60,000 frames
    scenario = parse_scenario(SCENARIO.format(seed=3, duration=duration, fps=fps))
    scenario = scenario.model_copy(update={"model": resolved.model})
    deployment = build_deployment(scenario, artefacts, load_model_bytes)
    simulate(deployment, duration + 5, False, "md1")
    table = deployment.recorder.to_table()
    arrived = table.column("t_broker").to_numpy()
    captured = table.column("t_capture").to_numpy()
    done = arrived >= 0
    assert done.mean() > 0.999
    wait = (arrived - captured)[done] - service - 0.003
    assert wait.min() > -1e-9  # never faster than serialisation plus propagation

    theory = rho * service / (2 * (1 - rho))
    se = batch_means_se(wait)
    assert se < 0.04 * theory
    assert abs(wait.mean() - theory) < 4 * se, (wait.mean(), theory, se)

    idle = (wait < 1e-9).astype(float)
    assert abs(idle.mean() - (1 - rho)) < 4 * batch_means_se(idle) + 1e-3


def test_a_frame_id_no_camera_handed_out_is_counted_and_skipped() -> None:
    """A forged frame (id 10^9) reaching the edge is counted, not classified, and does not stop the run."""
    from iotbed.broker.messages import Publish
    from iotbed.nodes.payloads import Frame

    probe = parse_scenario(SCENARIO.format(seed=3, duration=1, fps=5))
    resolved, artefacts, _ = prepare(probe, progress=False)
    deployment = build_deployment(resolved, artefacts, load_model_bytes)
    edge = deployment.nodes.edges[0]
    shape = tuple(int(x) for x in artefacts.images.shape[1:])
    forged = Frame(10**9, 0, 0.0, 0, 0, shape, 100, np.zeros(shape, np.float32))  # type: ignore[arg-type]
    assert deployment.recorder.record(10**9) is None
    edge._on_frame(Publish("frames/cam-0", forged, 1))
    simulate(deployment, 6.0, False, "forged")
    assert edge.unknown_frames == 1
    table = deployment.recorder.to_table()
    assert table.num_rows > 0 and 10**9 not in table.column("frame_id").to_pylist()
    assert set(table.column("status").to_pylist()) == {"delivered"}  # the real frames went on as usual
