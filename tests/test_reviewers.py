"""Human reviewers behind the reject option: the review desk's queue against queueing theory, its verdicts
against its accuracy, and escalation to a `reviewers:` group in a run, simulated and live."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import simpy
from conftest import SCENARIOS

import iotbed
from iotbed.broker.messages import Publish
from iotbed.emulation.runner import emulate
from iotbed.errors import ScenarioError
from iotbed.nodes.payloads import Frame
from iotbed.nodes.reviewers import ReviewConfig, ReviewDesk, ServiceTime
from iotbed.sim.trace import FrameRecord, TraceRecorder

QUICKSTART = SCENARIOS / "quickstart.yaml"


def _desk(env: simpy.Environment, reviewers: int, service: ServiceTime, accuracy: float, seed: int) -> ReviewDesk:
    config = ReviewConfig("$share/desk/escalations/desk/#", 1, reviewers, service, accuracy, 10)
    desk = ReviewDesk(
        env,
        "desk-0",
        None,
        config,
        TraceRecorder(),
        np.random.default_rng(seed),
        frozenset({"edge-0"}),  # type: ignore[arg-type]
    )
    for _ in range(reviewers):
        env.process(desk._review())
    return desk


def _arrivals(env: simpy.Environment, desk: ReviewDesk, rate: float, n: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    records = []
    for i in range(n):
        yield env.timeout(rng.exponential(1 / rate))
        record = FrameRecord(i, "cam-0", "frames/cam-0", 0, int(rng.integers(10)), 100, 150, 1, env.now)
        record.rejected, record.t_escalated = True, env.now
        records.append(record)
        desk._take(Frame(i, 0, env.now, 0, record.label, (1, 8, 8), 0), record)
    return records


def _erlang_c_wait(rate: float, service_rate: float, servers: int) -> float:
    """The mean time in queue of an M/M/c queue (Erlang's C formula)."""
    load = rate / service_rate
    rho = load / servers
    below = sum(load**k / math.factorial(k) for k in range(servers))
    top = load**servers / math.factorial(servers) / (1 - rho)
    waits = top / (below + top)
    return waits / (servers * service_rate - rate)


@pytest.mark.parametrize("servers", [1, 3])
def test_the_desk_queues_as_an_m_m_c_queue(servers: int) -> None:
    """Poisson arrivals at 75% load and exponential reviews: the mean wait matches Erlang's C formula."""
    env = simpy.Environment()
    desk = _desk(env, servers, ServiceTime("exponential", 1.0, 1.0), 1.0, seed=1)
    rate = 0.75 * servers
    arrivals = env.process(_arrivals(env, desk, rate, 40_000, np.random.default_rng(2)))
    env.run()
    records = arrivals.value
    assert desk.reviewed == len(records) and not desk.waiting.items
    expected = _erlang_c_wait(rate, 1.0, servers)
    assert desk.waited_s / desk.reviewed == pytest.approx(expected, rel=0.1)
    sojourn = np.array([r.t_resolved - r.t_escalated for r in records])
    assert sojourn.mean() == pytest.approx(expected + 1.0, rel=0.06)


def test_fixed_reviews_keep_at_most_c_frames_in_review() -> None:
    env = simpy.Environment()
    desk = _desk(env, 2, ServiceTime("fixed", 3.0, 0.5), 1.0, seed=0)
    process = env.process(_arrivals(env, desk, 1.0, 300, np.random.default_rng(3)))
    env.run()
    done = np.sort([r.t_resolved for r in process.value])
    sojourn = np.array([r.t_resolved - r.t_escalated for r in process.value])
    assert sojourn.min() >= 3.0 - 1e-9
    # two reviewers: at most two reviews end in any 3-s window (each takes 3 s)
    assert (done[2:] - done[:-2] >= 3.0 - 1e-9).all()
    assert desk.busy_s == pytest.approx(3.0 * 300)
    assert desk.max_queue > 10  # 1 frame/s against 2/3 a second served: the queue grows


def test_lognormal_reviews_have_the_asked_mean_and_spread() -> None:
    draws = np.array([ServiceTime("lognormal", 8.0, 0.5).draw(rng) for rng in [np.random.default_rng(4)] * 20_000])
    assert draws.mean() == pytest.approx(8.0, rel=0.02)
    assert draws.std() / draws.mean() == pytest.approx(0.5, rel=0.05)


def test_reviewers_are_right_as_often_as_their_accuracy_and_wrong_uniformly() -> None:
    env = simpy.Environment()
    desk = _desk(env, 4, ServiceTime("fixed", 0.1, 0.5), 0.8, seed=5)
    process = env.process(_arrivals(env, desk, 10.0, 20_000, np.random.default_rng(6)))
    env.run()
    records = process.value
    right = np.array([r.final_prediction == r.label for r in records])
    assert right.mean() == pytest.approx(0.8, abs=0.012)  # 4 standard errors
    wrong = [(r.final_prediction - r.label) % 10 for r in records if r.final_prediction != r.label]
    counts = np.bincount(wrong, minlength=10)[1:]  # each of the 9 other labels about as often
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()


def test_a_frame_an_idle_reviewer_takes_never_counts_as_queued() -> None:
    """Frames 10 s apart, reviews of 3 s: nobody waits, the queue stays empty."""
    env = simpy.Environment()
    desk = _desk(env, 1, ServiceTime("fixed", 3.0, 0.5), 1.0, seed=0)

    def spaced():  # type: ignore[no-untyped-def]
        for i in range(5):
            record = FrameRecord(i, "cam-0", "frames/cam-0", 0, 1, 100, 150, 1, env.now)
            record.rejected, record.t_escalated = True, env.now
            desk._take(Frame(i, 0, env.now, 0, 1, (1, 8, 8), 0), record)
            yield env.timeout(10.0)

    env.process(spaced())
    env.run()
    assert desk.reviewed == 5 and desk.max_queue == 0 and desk.waited_s == 0.0


def test_the_mean_wait_counts_only_finished_reviews() -> None:
    """Two frames at once, one reviewer, stopped mid-way through the second review: one frame reviewed, and it
    never waited; the second (which waited 3 s) is still in review and not in the mean."""
    env = simpy.Environment()
    desk = _desk(env, 1, ServiceTime("fixed", 3.0, 0.5), 1.0, seed=0)
    for i in range(2):
        record = FrameRecord(i, "cam-0", "frames/cam-0", 0, 1, 100, 150, 1, 0.0)
        record.rejected, record.t_escalated = True, 0.0
        desk._take(Frame(i, 0, 0.0, 0, 1, (1, 8, 8), 0), record)
    env.run(until=4.0)
    assert desk.reviewed == 1 and desk.waited_s == 0.0 and desk.max_queue == 1


def test_escalations_from_elsewhere_are_counted_not_reviewed() -> None:
    """A resolver takes only frames an edge escalating to its group rejected, on that frame's camera topic."""
    env = simpy.Environment()
    desk = _desk(env, 1, ServiceTime("fixed", 1.0, 0.5), 1.0, seed=0)
    recorder = desk.recorder
    mine = recorder.new_frame("cam-0", "frames/cam-0", 0, 3, 100, 150, 1, 0.0)
    mine.rejected, mine.edge = True, "edge-0"
    other = recorder.new_frame("cam-1", "frames/cam-1", 0, 3, 100, 150, 1, 0.0)
    other.rejected, other.edge = True, "edge2-0"  # rejected by an edge that escalates elsewhere
    frame = Frame(mine.frame_id, 0, 0.0, 0, 3, (1, 8, 8), 0)
    desk._on_frame(Publish("escalations/cloud/cam-0", frame, 1))  # another group's topic
    desk._on_frame(Publish("escalations/desk/cam-1", frame, 1))  # another camera's topic
    desk._on_frame(Publish("escalations/desk/cam-1", Frame(other.frame_id, 0, 0.0, 0, 3, (1, 8, 8), 0), 1))
    assert desk.unknown_frames == 3 and mine.t_escalated < 0
    desk._on_frame(Publish("escalations/desk/cam-0", frame, 1))
    env.run()
    assert desk.unknown_frames == 3 and desk.reviewed == 1 and mine.resolver == "desk-0"


REVIEW = [
    "duration=20s",
    "nodes.edge_servers.0.reject={target: {coverage: 0.9}, action: escalate, to: desk}",
    "nodes.reviewers=[{name: desk, reviewers: 8, service_time: {distribution: fixed, mean: 100ms}, accuracy: 0.9}]",
    "links=[{between: [cam, gw], bandwidth: 20Mbps, latency: 2ms}, {between: [gw, edge], bandwidth: 100Mbps,"
    " latency: 5ms}, {between: [edge, desk], bandwidth: 10Mbps, latency: 40ms}]",
    "nodes.cameras.0.conditions=[{kind: fog, severity: 4, start: 10s}]",
]


def test_rejected_frames_go_to_the_reviewers_simulated_and_live(plain_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scenario = iotbed.load_scenario(QUICKSTART, REVIEW)
    simulated = iotbed.run(scenario, tmp_path / "sim", progress=False)
    trace, summary = simulated.trace, simulated.summary
    escalated = summary["selective"]["escalated"]
    rejected = trace[trace["rejected"]]
    assert escalated["rejected"] == len(rejected) > 100
    done = rejected[rejected["resolver"] != ""]
    assert set(done["resolver"]) == {"desk-0"}
    assert ((done["t_escalated"] - done["t_done"]) > 0.040).all()  # across the 40-ms WAN
    assert ((done["t_resolved"] - done["t_escalated"]) >= 0.1 - 1e-9).all()  # a review takes 100 ms
    desk = summary["reviewers"]["desk-0"]
    assert desk["reviewed"] == len(done)
    assert desk["utilisation"] == pytest.approx(len(done) * 0.1 / (8 * summary["sim_end_s"]))
    assert escalated["resolved"] >= escalated["rejected"] - 10  # at half load the desk keeps up
    path = escalated["by_resolver"]["desk"]
    assert path["resolved"] == len(done) and path["resolve_ms"]["p50"] >= 100 - 1e-6
    assert escalated["accuracy"] == pytest.approx(0.9, abs=0.06)
    # every escalation is republished once: its bytes are the frame's PUBLISH with the longer topic
    extra = len("escalations/desk/") - len("frames/")
    assert escalated["bytes_per_s"] == pytest.approx((rejected["publish_bytes"].sum() + extra * len(rejected)) / 20.0)
    live = emulate(scenario, plain_broker.url, out_dir=tmp_path / "live", progress=False).summary
    assert live["selective"]["escalated"]["resolved"] >= live["selective"]["escalated"]["rejected"] - 20
    assert live["reviewers"]["desk-0"]["reviewed"] == live["selective"]["escalated"]["resolved"]
    assert live["selective"]["escalated"]["accuracy"] == pytest.approx(0.9, abs=0.08)


def test_clouds_and_reviewers_hear_only_their_own_escalations() -> None:
    """Two edge groups, one escalating to a cloud and one to reviewers: each resolver takes only its own."""
    scenario = iotbed.load_scenario(
        QUICKSTART,
        [
            "duration=15s",
            "nodes.edge_servers=[{name: edge, subscribe: '$share/edge/frames/cam-0'}, "
            "{name: edge2, subscribe: '$share/edge2/frames/cam-1'}]",
            "nodes.edge_servers.0.reject={target: {coverage: 0.8}, action: escalate, to: cloud}",
            "nodes.edge_servers.1.reject={target: {coverage: 0.8}, action: escalate, to: desk}",
            "nodes.clouds=[{name: cloud}]",
            "nodes.reviewers=[{name: desk, service_time: {distribution: fixed, mean: 100ms}}]",
            "links=[{between: [cam, gw], bandwidth: 20Mbps, latency: 2ms}, {between: [gw, edge], bandwidth: "
            "100Mbps}, {between: [gw, edge2], bandwidth: 100Mbps}, {between: [edge, cloud], bandwidth: 10Mbps}, "
            "{between: [edge2, desk], bandwidth: 10Mbps}]",
        ],
    )
    trace = iotbed.run(scenario, write=False, progress=False).trace
    resolved = trace[trace["resolver"] != ""]
    assert len(resolved) > 20
    by_edge = resolved.groupby("edge")["resolver"].agg(set).to_dict()
    assert by_edge == {"edge-0": {"cloud-0"}, "edge2-0": {"desk-0"}}


def test_a_bad_reviewers_entry_is_refused() -> None:
    with pytest.raises(ScenarioError, match="give a mean above zero"):
        iotbed.load_scenario(QUICKSTART, ["nodes.reviewers=[{name: desk, service_time: {mean: 0s}}]"])
    with pytest.raises(ScenarioError, match="no link leads from it to the broker's group"):
        iotbed.load_scenario(QUICKSTART, ["nodes.reviewers=[{name: desk}]"])
    with pytest.raises(ScenarioError, match="reviewers"):
        iotbed.load_scenario(QUICKSTART, ["nodes.reviewers=[{name: desk, reviewers: 0}]"])
    with pytest.raises(ScenarioError, match="accuracy"):
        iotbed.load_scenario(QUICKSTART, ["nodes.reviewers=[{name: desk, accuracy: 1.5}]"])
    with pytest.raises(ScenarioError, match="used twice"):
        iotbed.load_scenario(QUICKSTART, ["nodes.clouds=[{name: desk}]", "nodes.reviewers=[{name: desk}]"])
