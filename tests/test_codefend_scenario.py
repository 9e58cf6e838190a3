"""The backdoored-update story in a scenario: a BadNet pushed by the registry, cameras showing its trigger,
STRIP on the gateways quarantining it, the edge rolling back, repairing with CoDefend and publishing the
repaired model; and a clean update that is screened and kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SCENARIOS

import iotbed
from iotbed.errors import ScenarioError

STORY = SCENARIOS / "codefend_backdoor_update.yaml"
# The shipped repair (about 80 s of wall-clock training here). A lighter one (2 + 2 CycleGAN epochs, 6 of
# unlearning) left a model that a gateway quarantined again, as it should: the screen judges every version.
QUICK = ["duration=150s"]


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> iotbed.RunResult:
    out = tmp_path_factory.mktemp("codefend") / "run"
    return iotbed.run(iotbed.load_scenario(STORY, QUICK), out, progress=False)


def test_backdoored_update_is_quarantined_rolled_back_and_repaired(story: iotbed.RunResult) -> None:
    b = story.summary["backdoor"]["2"]
    assert b["adopted_s"] == pytest.approx(10.0, abs=0.1)
    assert b["first_stamped_frame_s"] >= 20.0
    # detected after the trigger appeared, and the edge went back to model 1 at once
    assert b["quarantined_s"] > b["first_stamped_frame_s"]
    assert 0 < b["time_to_detect_s"] < 60
    events = [(e["node"], e["event"], e["version"]) for e in story.summary["model_events"]]
    assert ("edge-0", "rolled_back", 1) in events
    assert ("edge-0", "adopted", 1002) in events
    assert b["repaired_adopted_s"] > b["quarantined_s"] and b["time_to_repair_s"] > 0
    assert b["repair"]["sim_seconds"] > 0 and b["repair"]["wall_seconds"] > 0
    # in the trace: the BadNet won the stamped frames it saw; model 1 and the repaired model did not
    by_version = b["in_run_by_version"]
    assert by_version["2"]["attack_success_rate"] >= 0.9
    assert by_version["1002"]["stamped_frames"] > 50
    assert by_version["1002"]["attack_success_rate"] <= 0.05
    assert b["frames_won_by_the_backdoor"] == round(
        by_version["2"]["attack_success_rate"] * by_version["2"]["stamped_frames"]
    )
    # offline on the whole test split: the BadNet works, the repair removes it and keeps clean accuracy
    offline = b["offline"]
    assert offline["backdoored"]["attack_success_rate"] >= 0.98
    assert offline["repaired"]["attack_success_rate"] <= 0.05
    assert offline["repaired"]["clean_accuracy"] >= offline["backdoored"]["clean_accuracy"] - 0.03


def test_the_edge_repairs_once_from_every_gateways_notice(story: iotbed.RunResult) -> None:
    """Both gateways quarantine the BadNet within the pooling window: one repair, from both notices' frames,
    keeping those the backdoor flipped; a notice that comes while the repair gathers starts no second one."""
    b = story.summary["backdoor"]["2"]
    repair = b["repair"]
    quarantines = [e for e in story.summary["model_events"] if e["event"] == "quarantined" and e["version"] == 2]
    assert len(quarantines) == 2  # both gateways caught it
    assert sorted(repair["gateways"]) == sorted(e["node"] for e in quarantines)
    started = [e for e in story.summary["model_events"] if e["event"] == "repair_started" and e["version"] == 2]
    assert len(started) == 1 and len(story.summary["backdoor"]) == 1
    assert 0 < repair["d_poison"] <= repair["flagged"]
    assert repair["d_poison_purity"] >= repair["flagged_purity"]  # keeping flipped frames keeps stamped ones


def test_trace_and_detection_tell_the_same_story(story: iotbed.RunResult) -> None:
    trace = story.trace
    served = trace[trace.status == "delivered"]
    quarantined = story.summary["backdoor"]["2"]["quarantined_s"]
    # no frame classified by the BadNet after the quarantine reached the edge (plus the batch in service)
    late = served[(served.model_version == 2) & (served.t_infer_start > quarantined + 0.1)]
    assert late.empty
    detection = story.summary["detection"]["by_version"]["2"]
    # Per frame STRIP is weak on this small digits BadNet (measured: AUROC 0.90, FAR 59% at FRR 1% over the
    # ~500 screened frames); the screen's count test still catches it. Far better than chance is what holds.
    assert detection["auroc"] > 0.75
    assert detection["n_trojaned"] > 20 and detection["n_calibration"] == 300
    assert {p["frr_preset"] for p in detection["points"]} == {0.02, 0.01, 0.005}
    screens = story.summary["detection"]["screens"]
    assert any(s["backdoored"] and s["version"] == 2 for s in screens)
    assert not any(s["backdoored"] and s["version"] in (1, 1002) for s in screens)


def test_a_clean_update_is_screened_and_kept() -> None:
    scenario = iotbed.load_scenario(STORY, ["duration=45s", "registry.updates.0.backdoor=null", "attacks=[]"])
    summary = iotbed.run(scenario, progress=False, write=False).summary
    events = [(e["node"], e["event"], e["version"]) for e in summary["model_events"]]
    assert ("edge-0", "adopted", 2) in events
    assert not [e for e in events if e[1] in ("quarantined", "rolled_back")]
    assert any(e[1] == "screened_clean" and e[2] == 2 for e in events)
    assert summary["edge_servers"]["edge-0"]["model_version"] == 2
    assert "backdoor" not in summary


def test_a_trigger_attack_needs_a_backdoored_update() -> None:
    with pytest.raises(ScenarioError, match="is not a backdoored update"):
        iotbed.load_scenario(STORY, ["registry.updates.0.backdoor=null"])


def test_strip_screen_charges_the_gateway_device(story: iotbed.RunResult) -> None:
    screens = story.summary["detection"]["screens"]
    compute = np.array([s["compute_s"] for s in screens])
    assert (compute > 0).all()
    # at most half the device: consecutive screens of one gateway are at least 2x the compute apart
    for gateway in {s["gateway"] for s in screens}:
        times = sorted(s["time_s"] for s in screens if s["gateway"] == gateway)
        assert all(b - a >= 2 * compute[0] - 1e-6 for a, b in zip(times, times[1:]))


def test_backdoor_figures_and_screen_table_from_the_run_folder(story: iotbed.RunResult) -> None:
    import pandas as pd

    from iotbed.analysis import plots

    folder = story.out_dir
    assert folder is not None
    screens = pd.read_csv(folder / "strip_screens.csv")
    assert len(screens) == sum(s["frames"] for s in story.summary["detection"]["screens"])
    assert screens.loc[screens.stamped, "score"].median() < screens.loc[~screens.stamped, "score"].median()
    assert {"strip_entropy", "roc", "backdoor"} <= set(plots.available(folder))
    for kind in ("strip_entropy", "roc", "backdoor"):
        (png,) = plots.plot(kind, folder, folder / "figures", ("png",))
        assert png.stat().st_size > 10_000


def test_a_rogue_publisher_on_a_camera_pushes_the_backdoor_and_is_caught() -> None:
    scenario = iotbed.load_scenario(
        STORY, ["duration=50s", "registry.updates.0.publisher=cam-7", "nodes.edge_servers.0.repair=null"]
    )
    summary = iotbed.run(scenario, progress=False, write=False).summary
    events = [(e["node"], e["event"], e["version"]) for e in summary["model_events"]]
    assert ("rogue@cam-7", "published", 2) in events
    assert not [e for e in events if e[0] == "registry"]
    assert ("edge-0", "adopted", 2) in events and ("edge-0", "rolled_back", 1) in events
    assert summary["backdoor"]["2"]["published_by"] == "rogue@cam-7"
    assert summary["edge_servers"]["edge-0"]["model_version"] == 1  # no repairer: model 1 stays in service


def test_an_update_publisher_must_be_a_node() -> None:
    with pytest.raises(ScenarioError, match="update publisher 'cam' is not a node"):
        iotbed.load_scenario(STORY, ["registry.updates.0.publisher=cam"])


def test_in_codefends_own_flow_the_gateways_send_d_valid() -> None:
    """`strip.send_clean` and `repair.d_valid: gateways`: each notice carries 60 clean labelled images (charged
    to the links as the notice's bytes), and the edge repairs from the pooled ones instead of its own set. A
    short repair: this checks the flow, not the repair's quality."""
    scenario = iotbed.load_scenario(
        STORY,
        [
            "duration=90s",
            "nodes.gateways.0.strip.send_clean=60",
            "nodes.edge_servers.0.repair={clean_images: 500, epochs: 1, decay_epochs: 0, unlearn_epochs: 2, "
            "d_valid: gateways, pool_window: 30s}",
        ],
    )
    summary = iotbed.run(scenario, progress=False, write=False).summary
    repair = summary["backdoor"]["2"]["repair"]
    assert repair["d_valid_from"] == "gateways" and repair["d_valid_refused"] == 0
    assert repair["d_valid"] == 60 * len(repair["gateways"])
    notices = [e for e in summary["model_events"] if e["event"] == "quarantined" and e["version"] == 2]
    pixels = 32 * 32  # digits frames: one channel
    assert all(e["size_bytes"] >= 60 * (pixels + 2) for e in notices)  # D_valid's pixels and labels travel
    with pytest.raises(ScenarioError, match="no screening gateway sends clean images"):
        iotbed.load_scenario(STORY, ["nodes.edge_servers.0.repair.d_valid=gateways"])
    with pytest.raises(ScenarioError, match="more than the 300 calibration images"):
        iotbed.load_scenario(STORY, ["nodes.gateways.0.strip.send_clean=301"])


# SentiNet finds the shipped BadNet (training seed 1) only at chance (AUROC about 0.5: Grad-CAM's region for the
# target misses the square), and the BadNet trained with seed 0 at AUROC above 0.97; the test takes the latter.
SENTINET_GATEWAYS = [
    "duration=60s",
    "registry.updates.0.train.seed=0",
    "nodes.gateways.0.strip=null",
    "nodes.gateways.0.sentinet={frames: 100, n_pastes: 50, backgrounds: 100, calibration: 200}",
    "nodes.edge_servers.0.repair=null",
]


def test_gateways_can_screen_with_sentinet_instead_of_strip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SentiNet in STRIP's place: model 1 passes its screens, the BadNet is quarantined after the trigger shows,
    the screen is charged as SentiNet's passes (Grad-CAM, pastes and noise tests), and the summary and the
    screens' table give its detection figures under its own name."""
    import pandas as pd

    result = iotbed.run(iotbed.load_scenario(STORY, SENTINET_GATEWAYS), tmp_path / "run", progress=False)
    summary = result.summary
    screens = summary["detection"]["screens"]
    assert {s["kind"] for s in screens} == {"sentinet"}
    assert any(s["version"] == 1 for s in screens)
    assert not any(s["backdoored"] for s in screens if s["version"] == 1)  # the clean model is kept
    b = summary["backdoor"]["2"]
    assert b["quarantined_s"] is not None and b["quarantined_s"] > b["first_stamped_frame_s"]
    events = [(e["node"], e["event"], e["version"]) for e in summary["model_events"]]
    assert ("edge-0", "rolled_back", 1) in events
    report = summary["detection"]["by_screen"]["sentinet"]["2"]
    assert report is not None and report["auroc"] > 0.9
    assert summary["detection"]["by_version"]["2"] == report  # the only screen: its figures are the run's
    # charged as SentiNet's passes on the gateway's profile: the 100 frames and 200 calibration images, each
    # with Grad-CAM and two tests of 50 pastes, and the backgrounds labelled once
    from iotbed.defenses.sentinet import SentinetDetector
    from iotbed.models.architectures import build_model
    from iotbed.sim.devices import BUILTIN_PROFILES

    model = build_model("lenet5", in_channels=1, num_classes=10, image_size=32, mean=(0.0,), std=(1.0,))
    cost = SentinetDetector(model, torch.rand(100, 1, 32, 32), n_pastes=50).cost
    expected = BUILTIN_PROFILES["raspberry_pi_4"].seconds_for(1, 300 * cost.per_input + cost.setup)
    assert cost.per_input > 100 * cost.forward  # far more than one pass per image
    assert [s["compute_s"] for s in screens] == pytest.approx([expected] * len(screens), rel=1e-9)
    table = pd.read_csv(result.out_dir / "strip_screens.csv")
    assert set(table["kind"]) == {"sentinet"}
    assert table.loc[table.stamped, "score"].median() < table.loc[~table.stamped, "score"].median()


def test_a_gateway_runs_one_screen() -> None:
    with pytest.raises(ScenarioError, match="has both `strip:` and `sentinet:`"):
        iotbed.load_scenario(STORY, ["nodes.gateways.0.sentinet={frames: 100}"])
