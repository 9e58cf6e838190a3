"""The reject option: confidence scores, thresholds for a coverage and for a guaranteed risk (SGR), the
risk-coverage metrics against brute force, and an edge server that abstains in a run, simulated and live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCENARIOS

import iotbed
from iotbed.analysis.selective import aurc, e_aurc, risk_coverage
from iotbed.defenses.reject import RejectTargetError, confidence, for_coverage, guaranteed_risk
from iotbed.emulation.runner import emulate
from iotbed.errors import ScenarioError

QUICKSTART = SCENARIOS / "quickstart.yaml"


def test_scores_rank_a_confident_prediction_above_a_hesitant_one() -> None:
    logits = torch.tensor([[8.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 0.0, 0.0]])
    for score in ("msp", "margin", "entropy"):
        values = confidence(logits, score)
        assert values[0] > values[1] > values[2] or (score == "margin" and values[0] > values[1] >= values[2])
    assert confidence(logits, "msp")[2] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown score"):
        confidence(logits, "vibes")


def _population(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scores in [0, 1]; a frame with score s is right with probability 0.7 + 0.3 s (15% errors in all)."""
    scores = rng.uniform(0, 1, n)
    return scores, rng.uniform(0, 1, n) < 0.7 + 0.3 * scores


def test_a_coverage_threshold_accepts_that_share() -> None:
    scores, correct = _population(1000, np.random.default_rng(0))
    threshold = for_coverage("msp", scores, correct, 0.8)
    assert threshold.calibration_coverage == pytest.approx(0.8, abs=0.002)
    assert threshold.calibration_risk < 1 - correct.mean()


def test_guaranteed_risk_holds_on_new_data_in_all_but_about_delta_of_draws() -> None:
    """Geifman and El-Yaniv's guarantee: P(test selective risk > r*) <= delta. 300 independent calibration and
    test draws at r* = 0.12, delta = 0.1: at most delta of them, with a binomial margin (3 sigma = 0.05)."""
    rng = np.random.default_rng(1)
    risk, delta, draws, violations, refused = 0.12, 0.1, 300, 0, 0
    for _ in range(draws):
        try:
            threshold = guaranteed_risk("msp", *_population(1000, rng), risk, delta)
        except RejectTargetError:  # a draw whose best bound is above r*: refusing is safe, and rare here
            refused += 1
            continue
        scores, correct = _population(20_000, rng)  # the population's risk above the threshold, closely
        accepted = scores >= threshold.value
        violations += float(1 - correct[accepted].mean()) > risk
        assert threshold.risk_bound is not None and threshold.risk_bound < risk
    assert refused < 0.05 * draws
    assert violations / draws <= delta + 0.05


def test_an_unreachable_risk_names_the_best_bound() -> None:
    scores, correct = _population(100, np.random.default_rng(2))
    with pytest.raises(RejectTargetError, match=r"tightest bound there is 0\.\d+"):
        guaranteed_risk("msp", scores, correct, 1e-4, 0.001)


def test_aurc_matches_brute_force_and_the_oracle_has_no_excess() -> None:
    rng = np.random.default_rng(3)
    scores, correct = _population(200, rng)
    order = np.argsort(-scores, kind="stable")
    brute = np.mean([1 - correct[order[:k]].mean() for k in range(1, 201)])
    assert aurc(scores, correct) == pytest.approx(brute)
    assert e_aurc(scores, correct) > 0
    assert e_aurc(correct.astype(float), correct) == pytest.approx(0.0)
    coverage, risk = risk_coverage(scores, correct)
    assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(1 - correct.mean())


def test_an_unreachable_target_in_a_scenario_is_a_located_error() -> None:
    scenario = iotbed.load_scenario(
        QUICKSTART, ["nodes.edge_servers.0.reject={target: {risk: 0.0001, confidence: 0.999}, calibration: 50}"]
    )
    with pytest.raises(ScenarioError, match=r"edge server group 'edge', `reject.target.risk`: .* tightest bound"):
        iotbed.run(scenario, write=False, progress=False)


def test_bad_reject_entries_are_refused_at_validation() -> None:
    with pytest.raises(ScenarioError, match="one of them"):
        iotbed.load_scenario(QUICKSTART, ["nodes.edge_servers.0.reject={target: {coverage: 0.9, risk: 0.01}}"])
    with pytest.raises(ScenarioError, match="msp"):
        iotbed.load_scenario(QUICKSTART, ["nodes.edge_servers.0.reject={score: vibes}"])


def test_the_edge_abstains_on_unsure_frames_simulated_and_live(plain_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    overrides = [
        "duration=12s",
        "links.0.loss=0",
        "nodes.edge_servers.0.reject={target: {coverage: 0.95}}",
        "nodes.cameras.0.conditions=[{kind: fog, severity: 4, start: 6s}]",
    ]
    scenario = iotbed.load_scenario(QUICKSTART, overrides)
    simulated = iotbed.run(scenario, tmp_path / "sim", progress=False)
    selective = simulated.summary["selective"]
    assert selective["clean"]["coverage"] == pytest.approx(0.95, abs=0.04)  # fitted on held-out images
    fog = selective["by_condition"]["fog-4"]
    assert fog["coverage"] < selective["clean"]["coverage"] - 0.2  # fog makes the model unsure
    assert selective["selective_risk"] < 1 - selective["accuracy_without_rejection"]
    assert "escalated" not in selective  # abstaining: nothing went to a cloud, so no escalation figures
    trace = simulated.trace
    threshold = simulated.summary["defenses"]["edge-0"]["reject"]["value"]
    assert ((trace["score"] < threshold) == trace["rejected"]).all()
    live = emulate(scenario, plain_broker.url, out_dir=tmp_path / "live", progress=False).summary["selective"]
    assert live["coverage"] == pytest.approx(selective["coverage"], abs=0.03)
    assert live["clean"]["coverage"] == pytest.approx(selective["clean"]["coverage"], abs=0.03)


ESCALATE = [
    "duration=20s",
    "nodes.edge_servers.0.reject={target: {coverage: 0.9}, action: escalate, to: cloud}",
    "nodes.clouds=[{name: cloud, model: {arch: lenet5, train: {seed: 7, epochs: 30}}}]",
    "links=[{between: [cam, gw], bandwidth: 20Mbps, latency: 2ms}, {between: [gw, edge], bandwidth: 100Mbps,"
    " latency: 5ms}, {between: [edge, cloud], bandwidth: 10Mbps, latency: 40ms}]",
    "nodes.cameras.0.conditions=[{kind: fog, severity: 4, start: 10s}]",
]


def test_rejected_frames_escalate_over_the_wan_to_the_cloud_simulated_and_live(plain_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scenario = iotbed.load_scenario(QUICKSTART, ESCALATE)
    simulated = iotbed.run(scenario, tmp_path / "sim", progress=False)
    trace, summary = simulated.trace, simulated.summary
    escalated = summary["selective"]["escalated"]
    rejected = trace[trace["rejected"]]
    assert escalated["rejected"] == len(rejected) > 100
    assert escalated["resolved"] >= escalated["rejected"] - 5  # all but those still on their way at the end
    assert (rejected["resolver"].isin(["", "cloud-0"])).all() and (
        trace.loc[~trace["rejected"], "resolver"] == ""
    ).all()
    done = rejected[rejected["resolver"] != ""]
    assert ((done["t_resolved"] - done["t_done"]) > 0.040).all()  # the WAN's 40 ms each way at least once
    wan = summary["bandwidth"]["links"]["edge->cloud"]["bytes"]
    assert wan >= escalated["resolved"] * trace["payload_bytes"].iloc[0]  # every escalated frame crossed the WAN
    assert (
        escalated["system_accuracy"] > summary["selective"]["system_accuracy"]
    )  # the cloud serves what the edge did not
    live = emulate(scenario, plain_broker.url, out_dir=tmp_path / "live", progress=False).summary["selective"]
    assert live["escalated"]["resolved"] >= live["escalated"]["rejected"] - 5
    assert live["escalated"]["accuracy"] == pytest.approx(escalated["accuracy"], abs=0.05)


def test_escalation_to_a_group_that_does_not_exist_is_refused() -> None:
    with pytest.raises(
        ScenarioError, match="not a `clouds:` or `reviewers:` group; add one under nodes.clouds or nodes.reviewers"
    ):
        iotbed.load_scenario(QUICKSTART, ["nodes.edge_servers.0.reject={action: escalate, to: sky}"])
    with pytest.raises(ScenarioError, match="needs `to:`"):
        iotbed.load_scenario(QUICKSTART, ["nodes.edge_servers.0.reject={action: escalate}"])


def test_the_reject_option_stops_minimal_adversarial_frames_but_not_high_confidence_ones() -> None:
    """DeepFool stops just past the decision boundary, where the softmax is unsure: the edge rejects nearly all
    of those frames. PGD with a large budget (and PGD on Carlini-Wagner's margin with kappa) ends far past it:
    the edge accepts most of them, and they are wrong, so MSP rejection is no defense against an attacker who
    knows it is there."""
    outcome = {}
    for name, attack in {
        "deepfool": "method: deepfool, steps: 20",
        "pgd": "method: pgd, eps: 0.15, steps: 20",
        "pgd_kappa": "method: pgd, eps: 0.15, steps: 20, confidence: 10",
    }.items():
        scenario = iotbed.load_scenario(
            QUICKSTART,
            [
                "duration=20s",
                "nodes.edge_servers.0.reject={target: {coverage: 0.95}}",
                f"attacks=[{{kind: compromised_camera, cameras: [cam-0, cam-1, cam-2], {attack}}}]",
            ],
        )
        outcome[name] = iotbed.run(scenario, write=False, progress=False).summary["selective"]["attacked"]
    assert outcome["deepfool"]["coverage"] < 0.1
    for name in ("pgd", "pgd_kappa"):
        assert outcome[name]["coverage"] > 0.8 and outcome[name]["selective_risk"] > 0.9


def test_pgd_with_kappa_wins_by_the_margin() -> None:
    from iotbed.attacks.evasion import pgd
    from iotbed.runner import prepare

    _, artefacts, _ = prepare(iotbed.load_scenario(QUICKSTART), progress=False)
    model = artefacts.model.eval()
    x, y = artefacts.images[:64], torch.as_tensor(artefacts.labels[:64])
    adv = pgd(model, x, y, eps=0.3, steps=40, kappa=5.0, random_start=False)
    with torch.no_grad():
        logits = model(adv)
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    assert float(((wrong - true) >= 5.0 - 1e-3).float().mean()) > 0.9
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6
    with pytest.raises(ValueError, match="untargeted"):
        pgd(model, x, y, eps=0.3, kappa=5.0, random_start=False, targeted=True)


def test_strip_entropy_as_the_reject_score_is_charged_and_fitted_like_the_others() -> None:
    """score: strip blends each frame with clean held-out images: the threshold still gives the asked
    coverage on clean frames, and the edge is charged a forward pass per blend."""
    scenario = iotbed.load_scenario(
        QUICKSTART, ["duration=15s", "nodes.edge_servers.0.reject={score: strip, strip: {n_blends: 8}}"]
    )
    result = iotbed.run(scenario, write=False, progress=False)
    summary, trace = result.summary, result.trace
    reject = summary["defenses"]["edge-0"]["reject"]
    assert reject["score"] == "strip"
    assert reject["score_flops_per_image"] == 8 * summary["defenses"]["edge-0"]["model_flops_per_image"]
    assert summary["selective"]["coverage"] == pytest.approx(0.9, abs=0.05)
    assert ((trace["score"] < reject["value"]) == trace["rejected"]).all()
    assert trace["score"].between(0, np.log2(10)).all()  # entropy in bits over ten classes
    again = iotbed.run(scenario, write=False, progress=False).trace
    assert (again["score"].to_numpy() == trace["score"].to_numpy()).all()  # one seed, the same blends


def test_a_score_setting_for_another_score_is_refused() -> None:
    with pytest.raises(ScenarioError, match="`strip:` sets up score strip, but this reject option scores by msp"):
        iotbed.load_scenario(QUICKSTART, ["nodes.edge_servers.0.reject={score: msp, strip: {n_blends: 4}}"])


def test_a_deep_gamblers_network_scores_frames_for_the_edge() -> None:
    """score: gambler trains (or fetches) a Deep Gamblers network beside the model; the edge is charged its
    forward pass, the threshold gives the asked coverage, and in fog the gambler abstains more."""
    scenario = iotbed.load_scenario(
        QUICKSTART,
        [
            "duration=20s",
            "nodes.edge_servers.0.reject={score: gambler, target: {coverage: 0.9}}",
            "nodes.cameras.0.conditions=[{kind: fog, severity: 4, start: 10s}]",
        ],
    )
    result = iotbed.run(scenario, write=False, progress=False)
    summary, trace = result.summary, result.trace
    reject = summary["defenses"]["edge-0"]["reject"]
    model_flops = summary["defenses"]["edge-0"]["model_flops_per_image"]
    assert reject["score_flops_per_image"] > 0.9 * model_flops  # a second network of the same architecture
    selective = summary["selective"]
    assert selective["clean"]["coverage"] == pytest.approx(0.9, abs=0.06)
    assert selective["by_condition"]["fog-4"]["coverage"] < selective["clean"]["coverage"] - 0.2
    assert trace["score"].between(0, 1).all()
    assert ((trace["score"] < reject["value"]) == trace["rejected"]).all()
