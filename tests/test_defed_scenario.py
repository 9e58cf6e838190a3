"""Defed in a scenario: denoisers trained through the edge's model, thresholds fitted on held-out clean images,
every frame scored and flagged frames relabelled, the figures in the trace and the summary, the compute charged
to the edge, and the thresholds refitted when the model in service changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SCENARIOS

import iotbed
from iotbed.errors import ScenarioError

DEFED = SCENARIOS / "defed_edge.yaml"
# Two epochs per denoiser instead of ten: the test checks the wiring and that the detector separates
# oblivious attacks from clean frames at all, not Defed's quality (that is `make defed-table`).
QUICK = ["duration=15s", "nodes.edge_servers.0.defenses=[{defed: {noise_levels: [20, 40], epochs: 2}}]"]


@pytest.fixture(scope="module")
def run() -> iotbed.RunResult:
    return iotbed.run(iotbed.load_scenario(DEFED, QUICK), progress=False, write=False)


def test_every_frame_is_scored_and_the_flag_follows_the_score(run: iotbed.RunResult) -> None:
    trace = run.trace
    delivered = trace[trace.status == "delivered"]
    assert len(delivered) > 300 and delivered.detect_score.notna().all()
    assert (delivered.detected == (delivered.detect_score > 1.0)).all()


def test_oblivious_attacks_are_flagged_far_more_than_clean_frames(run: iotbed.RunResult) -> None:
    detection = run.summary["edge_detection"]
    clean = detection["clean"]["flag_rate"]
    assert clean < 0.15  # k = 2 on clean calibration images: a few percent
    for label, entry in detection["by_attack"].items():
        assert entry["frames"] > 20, label
        assert entry["flag_rate"] > clean + 0.2, label
        assert entry["report"]["auroc"] > 0.75, label
        assert entry["report"]["n_calibration"] == 500


def test_flagged_frames_are_relabelled_and_the_attacked_accuracy_rises(run: iotbed.RunResult) -> None:
    accuracy = run.summary["accuracy"]
    assert accuracy["attacked"] > accuracy["undefended_reference"]["attacked"] + 0.1


def test_the_edge_is_charged_for_every_denoiser_pass(run: iotbed.RunResult) -> None:
    edge = run.summary["defenses"]["edge-0"]
    defed = edge["defed"]
    assert defed["noise_levels"] == [20, 40] and defed["denoiser"] == "DefedNet"
    # two denoisers, each far costlier than the model, plus one model pass per denoised frame
    assert defed["flops_per_image"] > 2 * 10 * edge["model_flops_per_image"]
    assert 0.0 < defed["thresholds"]["calibration_frr"] < 0.1


# Five PGD steps and five Square queries keep the crafting to about a minute; measured on this split at
# these settings: Defed's accuracy 86% on the oblivious frames, 62% on the adaptive ones; frames wrong and
# unflagged 7% oblivious, 26% detector-aware.
ATTACKS = (
    "attacks=[{kind: compromised_camera, cameras: [cam-0], method: pgd, eps: 0.1, steps: 5, name: oblivious},"
    "{kind: compromised_camera, cameras: [cam-1], method: pgd, eps: 0.1, steps: 5, adaptive: true, name: adaptive},"
    "{kind: compromised_camera, cameras: [cam-2], method: pgd, eps: 0.1, steps: 5, adaptive: true,"
    " detector_aware: true, name: aware},"
    "{kind: compromised_camera, cameras: [cam-3], method: square, eps: 0.1, queries: 5, name: square}]"
)


@pytest.fixture(scope="module")
def crafted():
    """The scenario's attacks crafted through the edge's Defed (no simulation: the frames are what matters)."""
    from iotbed.runner import prepare

    return prepare(iotbed.load_scenario(DEFED, [*QUICK, ATTACKS]), progress=False)[1]


def test_adaptive_attacks_through_defed_do_what_they_are_for(crafted) -> None:
    """On the whole test split, against the deployed ensemble: PGD through Defed leaves it less accurate than the
    same PGD crafted on the bare model, and the detector-aware PGD gets more frames both wrong and unflagged.
    Every attack keeps its L-inf budget and the 8-bit grid the frames travel on."""
    ensemble = crafted.guards["edge"].ensemble
    truth = torch.from_numpy(crafted.labels)
    verdicts = {label: ensemble.classify(torch.from_numpy(adv)) for label, adv in crafted.adversarial.items()}

    def accuracy(label: str) -> float:
        return float((verdicts[label].labels == truth).double().mean())

    def evading(label: str) -> float:
        v = verdicts[label]
        return float(((v.labels != truth) & ~v.flagged).double().mean())

    assert accuracy("adaptive") < accuracy("oblivious") - 0.05
    assert evading("aware") > evading("oblivious") + 0.05
    assert evading("aware") > evading("adaptive")
    for label, adv in crafted.adversarial.items():
        delta = torch.from_numpy(adv) - crafted.images
        assert float(delta.abs().max()) <= 0.1 + 1e-6, label
        assert torch.equal((torch.from_numpy(adv) * 255).round(), torch.from_numpy(adv) * 255), label
    assert float((torch.from_numpy(crafted.adversarial["square"]) != crafted.images).double().mean()) > 0.5


def test_attacks_through_defed_are_refused_where_they_cannot_run() -> None:
    with pytest.raises(ScenarioError, match="detector_aware is a kind of adaptive pgd"):
        iotbed.load_scenario(DEFED, ["attacks=[{kind: compromised_camera, cameras: [cam-0], detector_aware: true}]"])
    with pytest.raises(ScenarioError, match="always query the deployed defenses"):
        iotbed.load_scenario(
            DEFED, ["attacks=[{kind: compromised_camera, cameras: [cam-0], method: square, adaptive: true}]"]
        )


def test_defed_must_come_last_and_levels_must_differ() -> None:
    with pytest.raises(ScenarioError, match="must be the last of the defenses"):
        iotbed.load_scenario(DEFED, ["nodes.edge_servers.0.defenses=[{defed: {}}, {jpeg: {}}]"])
    with pytest.raises(ScenarioError, match="noise levels must differ"):
        iotbed.load_scenario(DEFED, ["nodes.edge_servers.0.defenses=[{defed: {noise_levels: [20, 20]}}]"])


def test_a_new_model_gets_thresholds_fitted_for_it() -> None:
    """The denoisers stay; the thresholds are refitted on the calibration images for the model now in service."""
    from iotbed.defenses.defed import DefedEnsemble, DefedNet
    from iotbed.models.architectures import build_model
    from iotbed.nodes.classifier import EdgeClassifier, Guard

    torch.manual_seed(0)
    first, second = (
        build_model("lenet5", in_channels=1, num_classes=10, image_size=32, mean=(0.0,), std=(1.0,)).eval()
        for _ in range(2)
    )
    calibration = torch.rand(40, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    ensemble = DefedEnsemble(first, [DefedNet(1).eval()], k=2.0)
    ensemble.fit_thresholds(calibration)
    images = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    classifier = EdgeClassifier(first, 1, 1.0, images, guard=Guard(ensemble, calibration))
    before = classifier.guard.ensemble.thresholds.values.clone()  # type: ignore[union-attr]
    classifier.swap(second, 2)
    moved = classifier.guard.ensemble  # type: ignore[union-attr]
    assert moved.classifier is second and moved.denoisers[0] is ensemble.denoisers[0]
    assert not torch.allclose(moved.thresholds.values, before)  # type: ignore[union-attr]
    expected = DefedEnsemble(second, list(ensemble.denoisers), k=2.0)
    assert torch.allclose(moved.thresholds.values, expected.fit_thresholds(calibration).values)  # type: ignore[union-attr]
    assert np.isfinite(classifier.last_detection if classifier.last_detection is not None else np.zeros(1)).all()
