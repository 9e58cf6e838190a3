"""Every scenario entry live against a real Mosquitto: the backdoor story (STRIP screening on gateways that are
MQTT clients, quarantine notices through the broker, CoDefend repair on the edge), a rogue publisher that the
broker's ACL refuses, and a man in the middle as a TCP proxy that perturbs frames, and cannot under TLS.

Time to detect, simulated against live. A gateway screens the model in service on the frames relayed since its
last screen, at most every `2 x compute` (it keeps within half its device) and only when `frames` new frames
have come (here 100 frames at 20 frames/s: every 5 s). Both runtimes capture the same frames with the same
stamps and screen them with the same seeds, so the screens fall at the same moments give or take the live
path's milliseconds and the host's own screening time (a live verdict waits for the real computation). The
one thing that can move detection further is a screen whose count test sits at the threshold and goes the
other way: then detection moves by one screening period. The tolerance is that period plus a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SCENARIOS

import iotbed
from iotbed.emulation.runner import emulate
from iotbed.errors import UsageError

STORY = SCENARIOS / "codefend_backdoor_update.yaml"
# The shipped story, earlier and shorter, with a light repair (about 10 s of training instead of 80). Its
# CycleGAN of 1 + 1 epochs barely stamps the trigger, too little evidence to pull the model away from the
# BadNet's own answers, so the repair fine-tunes plainly (distill: 0) as the paper does.
SHORT_STORY = [
    "duration=40s",
    "registry.updates.0.at=4s",
    "attacks.0.start=6s",
    "nodes.edge_servers.0.repair.epochs=1",
    "nodes.edge_servers.0.repair.decay_epochs=1",
    "nodes.edge_servers.0.repair.unlearn_epochs=4",
    "nodes.edge_servers.0.repair.clean_images=200",
    "nodes.edge_servers.0.repair.distill=0",
]
SUPERIOT = SCENARIOS / "superiot_cameras.yaml"
MITM = ["duration=8s", "attacks=[{kind: mitm, link: [gw-0, edge], method: fgsm, eps: 0.3}]"]


def _events(summary: dict) -> list[tuple[str, str, int]]:  # type: ignore[type-arg]
    return [(e["node"], e["event"], e["version"]) for e in summary["model_events"]]


def test_backdoor_story_runs_live_as_in_simulation(plain_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With signed updates: the BadNet comes from the registry's own key (a compromised registry), so every
    signature check passes it, and only the STRIP screen catches it; the gateways' notices and the edge's
    repaired model are signed too, and nothing is refused."""
    scenario = iotbed.load_scenario(STORY, [*SHORT_STORY, "security.signing=true"])
    simulated = iotbed.run(scenario, tmp_path / "sim", progress=False).summary
    live = emulate(scenario, plain_broker.url, out_dir=tmp_path / "live", progress=False).summary
    for summary in (simulated, live):
        events = _events(summary)
        assert ("edge-0", "adopted", 2) in events
        assert any(node.startswith("gw-") and event == "quarantined" and v == 2 for node, event, v in events)
        assert ("edge-0", "rolled_back", 1) in events and ("edge-0", "adopted", 1002) in events
        assert ("edge-0", "quarantine_accepted", 2) in events and summary["security"]["refused"] == {}
        b = summary["backdoor"]["2"]
        assert b["quarantined_s"] > b["first_stamped_frame_s"] >= 6.0
        assert b["repair"]["sim_seconds"] > 0 and b["repaired_adopted_s"] > b["quarantined_s"]
        assert b["offline"]["repaired"]["attack_success_rate"] < b["offline"]["backdoored"]["attack_success_rate"]
        detection = summary["detection"]["by_version"]["2"]
        assert detection["n_trojaned"] > 0 and detection["auroc"] > 0.5
    assert live["mode"] == "emulated" and live["broker"]["malformed"] == 0 and live["broker"]["refusals"] == 0
    screens = [s for s in simulated["detection"]["screens"] if s["gateway"] == "gw-0"]
    period = max(b["time_s"] - a["time_s"] for a, b in zip(screens, screens[1:]))
    assert live["backdoor"]["2"]["time_to_detect_s"] == pytest.approx(
        simulated["backdoor"]["2"]["time_to_detect_s"], abs=period + 1.0
    )
    # the gateways screened the frames they relay, which reached them as MQTT messages
    assert (tmp_path / "live" / "strip_screens.csv").is_file()
    written = json.loads((tmp_path / "live" / "summary.json").read_text())
    assert written["backdoor"]["2"]["quarantined_s"] == live["backdoor"]["2"]["quarantined_s"]
    # `iotbed compare` sets the two stories side by side and says why they differ
    from iotbed.analysis.compare import compare_runs, explain

    rows = {r["metric"]: r for r in compare_runs(tmp_path / "sim", tmp_path / "live")}
    assert rows["backdoor.2.time_to_detect_s"]["a"] == simulated["backdoor"]["2"]["time_to_detect_s"]
    assert rows["backdoor.2.time_to_detect_s"]["b"] == live["backdoor"]["2"]["time_to_detect_s"]
    assert any("STRIP screens and the CoDefend repair" in note for note in explain(tmp_path / "sim", tmp_path / "live"))


def test_a_rogue_publisher_is_refused_by_the_brokers_acl(broker_factory) -> None:  # type: ignore[no-untyped-def]
    from iotbed.broker.broker_auth import BrokerUser
    from iotbed.broker.mosquitto import scenario_client_roles

    scenario = iotbed.load_scenario(
        STORY,
        [
            "duration=10s",
            "registry.updates.0.at=3s",
            "registry.updates.0.publisher=cam-7",
            "nodes.edge_servers.0.repair=null",
            "attacks=[]",
            "broker.protocol=mqtt5",  # under MQTT 3.1.1 Mosquitto acknowledges a refused publish and drops it
        ],
    )
    # One user per client as `iotbed broker start --auth` makes them: `rogue@cam-7` is a camera user of its
    # own (logging in as cam-7 it would take cam-7's session over: the broker binds client ids to users).
    roles = scenario_client_roles(scenario)
    assert roles["rogue@cam-7"] == roles["cam-7"] == "camera"
    logins = {name: f"pw-{name}" for name in roles}
    users = tuple(BrokerUser(name, pw, roles[name]) for name, pw in logins.items())
    broker = broker_factory("auth", users=users)
    summary = emulate(scenario, broker.url, logins=logins, write=False, progress=False).summary
    events = _events(summary)
    assert ("rogue@cam-7", "published", 2) in events  # it tried, with a camera's rights
    assert not [e for e in events if e[0] == "edge-0" and e[1] == "adopted"]  # nothing reached the edge
    reasons = summary["broker"]["refusal_reasons"]
    assert sum(n for reason, n in reasons.items() if reason.startswith("publish:")) >= 1
    assert summary["frames"]["delivered"] == summary["frames"]["captured"] > 0  # the rest ran as usual
    assert summary["edge_servers"]["edge-0"]["model_version"] == 1


def test_a_live_man_in_the_middle_lowers_accuracy_as_the_simulated_one(plain_broker) -> None:  # type: ignore[no-untyped-def]
    scenario = iotbed.load_scenario(SUPERIOT, MITM)
    simulated = iotbed.run(scenario, write=False, progress=False)
    live = emulate(scenario, plain_broker.url, write=False, progress=False)
    report = live.summary["mitm"]["mitm-fgsm"]
    assert report["read_the_stream"] and report["nodes"] == ["cam-0", "cam-2", "cam-4", "cam-6"]
    sim_acc, live_acc = simulated.summary["accuracy"], live.summary["accuracy"]
    # the same cameras attacked: those behind gw-0
    for result in (simulated, live):
        trace = result.trace
        attacked = trace.attack == "mitm-fgsm"
        assert set(trace.camera[attacked]) == {"cam-0", "cam-2", "cam-4", "cam-6"}
    assert report["frames_tampered"] == int((live.trace.attack == "mitm-fgsm").sum()) > 0
    assert live_acc["clean"] > 0.9 and live_acc["attacked"] < live_acc["clean"] - 0.5
    assert live_acc["attacked"] == pytest.approx(sim_acc["attacked"], abs=0.1)


def test_a_man_in_the_middle_cannot_read_tls(tls_broker) -> None:  # type: ignore[no-untyped-def]
    scenario = iotbed.load_scenario(SUPERIOT, MITM)
    live = emulate(scenario, tls_broker.url, tls_ca=str(tls_broker.ca_file), write=False, progress=False).summary
    report = live["mitm"]["mitm-fgsm"]
    assert report["tls"] and not report["read_the_stream"]
    assert report["unreadable_connections"] == report["connections"] == 4
    assert report["frames_tampered"] == 0 and live["accuracy"]["attacked"] is None
    assert live["frames"]["delivered"] == live["frames"]["captured"] > 0 and live["accuracy"]["clean"] > 0.9


def test_an_entry_a_runtime_cannot_run_is_refused_before_anything_starts(tmp_path: Path) -> None:
    scenario = iotbed.load_scenario(SUPERIOT, MITM)
    with pytest.raises(UsageError, match="mitm.*--netns"):
        emulate(scenario, "local", netns=True, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
