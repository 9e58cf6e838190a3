"""The attacks on Defed: budgets hold exactly, the reported success is Defed's own verdict re-predicted by
`DefedEnsemble.classify`, the detector-aware attack slips under the thresholds more often than plain PGD of the
same budget, the adaptive attack does at least as well as PGD crafted on the bare model, runs are seeded, the
deployed decision serves the black-box attacks, and bad arguments raise ValueError.

As in test_defed.py: sklearn digits at their native 8x8 behind a small MLP, two denoisers (noise levels 20 and
40) trained for two epochs of batch 32, thresholds at k = 2 fitted on half of the test split, attacks on 100
frames of the other half. The denoisers go to the tests' model cache, so a rerun loads them.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from iotbed.attacks.blackbox import square_attack
from iotbed.attacks.defed_attacks import (
    DefedAttackResult,
    DefedDecision,
    adaptive_pgd,
    decision_outcomes,
    detector_aware_pgd,
)
from iotbed.attacks.evasion import pgd
from iotbed.data import load_splits
from iotbed.defenses.defed import DefedConfig, DefedEnsemble, get_or_train_denoisers, thresholds_from_scores
from iotbed.models import TrainConfig, train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = DefedConfig(noise_levels=(20, 40), edge="laplacian", k=2.0, epochs=2, batch_size=32)
N = 100


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", None, seed=0, image_size=8, test_fraction=0.5)


@pytest.fixture(scope="module")
def calibration(digits) -> tuple[torch.Tensor, torch.Tensor]:
    """Half of the test split (450 frames and labels): the thresholds are fitted on it, never attacked."""
    order = torch.randperm(len(digits.test), generator=gen(0))[:450]
    return digits.test.images[order], digits.test.labels[order]


@pytest.fixture(scope="module")
def ensemble(digits, calibration) -> DefedEnsemble:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the MLP's initial weights, so its digest (and the denoisers' cache key) repeat
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    train_model(model, digits.train, TrainConfig(epochs=10, batch_size=32, lr=3e-3), progress=False)
    model.eval()
    denoisers = get_or_train_denoisers(model, digits.train, CONFIG, progress=False)
    ens = DefedEnsemble.from_trained(model, denoisers, CONFIG)
    ens.fit_thresholds(*calibration)
    return ens


@pytest.fixture(scope="module")
def frames(digits) -> tuple[torch.Tensor, torch.Tensor]:
    """N held-out test frames (never used for the thresholds) and their labels."""
    order = torch.randperm(len(digits.test), generator=gen(0))[450 : 450 + N]
    return digits.test.images[order], digits.test.labels[order]


def test_the_ensemble_is_usable(ensemble, frames) -> None:
    x, y = frames
    verdict = ensemble.classify(x)
    assert float((verdict.labels == y).float().mean()) > 0.85
    assert float(verdict.flagged.float().mean()) < 0.3


@pytest.mark.parametrize("norm, eps", [("inf", 0.15), ("2", 1.0)])
@pytest.mark.parametrize("attack", [adaptive_pgd, detector_aware_pgd])
def test_budgets_hold_exactly(ensemble, frames, attack, norm: str, eps: float) -> None:
    x, y = frames
    extra = {"search_steps": 2} if attack is detector_aware_pgd else {}
    r = attack(ensemble, x, y, eps=eps, alpha=eps / 4, steps=6, norm=norm, generator=gen(1), **extra)
    delta = r.x_adv - x
    size = delta.abs().flatten(1).amax(1) if norm == "inf" else delta.flatten(1).norm(dim=1)
    assert bool((size <= eps).all()), float(size.max())  # exact, no tolerance
    assert torch.equal(size, r.distance)
    assert float(r.x_adv.min()) >= 0 and float(r.x_adv.max()) <= 1
    assert r.x_adv.shape == x.shape and r.x_adv.dtype == x.dtype
    assert r.settings["eps"] == eps and r.settings["norm"] == norm and r.settings["steps"] == 6
    assert bool((r.steps <= 6 * (2 if attack is detector_aware_pgd else 1)).all())
    assert r.success_rate > 0  # the budgets are large enough to do something


@pytest.mark.parametrize("attack", [adaptive_pgd, detector_aware_pgd])
def test_success_is_the_classify_verdict(ensemble, frames, attack) -> None:
    x, y = frames
    r = attack(ensemble, x, y, eps=0.15, steps=8, generator=gen(2))
    verdict = ensemble.classify(r.x_adv)
    assert torch.equal(r.labels, verdict.labels) and torch.equal(r.flagged, verdict.flagged)
    assert torch.equal(r.scores, verdict.scores)
    wrong = verdict.labels != y
    expected = wrong & ~verdict.flagged if attack is detector_aware_pgd else wrong
    assert torch.equal(r.success, expected)
    # an image stopped early only because it had succeeded, so it kept a successful iterate
    early = r.steps < r.settings["steps"] * r.settings.get("search_steps", 1)
    assert float(r.success[early].float().mean()) > 0.95 if bool(early.any()) else True


def test_detector_aware_stays_under_the_thresholds_more_often_than_pgd(ensemble, frames) -> None:
    x, y = frames
    eps, steps = 0.2, 10
    thresholds = ensemble.thresholds.values

    plain = ensemble.classify(pgd(ensemble.classifier, x, y, eps=eps, steps=steps, generator=gen(3)))
    aware = detector_aware_pgd(ensemble, x, y, eps=eps, steps=steps, generator=gen(3))

    def under(scores: torch.Tensor) -> float:
        return float((scores <= thresholds[:, None]).all(dim=0).float().mean())

    plain_success = float(((plain.labels != y) & ~plain.flagged).float().mean())
    assert under(aware.scores) > under(plain.scores) + 0.1
    assert aware.success_rate > plain_success + 0.1
    # among the frames each attack gets past the bare model, the detector-aware ones are flagged less
    assert float(aware.flagged[aware.labels != y].float().mean()) < float(
        plain.flagged[plain.bare_labels != y].float().mean()
    )


def test_adaptive_does_at_least_as_well_as_oblivious_pgd(ensemble, frames) -> None:
    x, y = frames
    for eps in (0.1, 0.2):
        oblivious = ensemble.classify(pgd(ensemble.classifier, x, y, eps=eps, steps=10, generator=gen(4)))
        adaptive = adaptive_pgd(ensemble, x, y, eps=eps, steps=10, generator=gen(4))
        assert adaptive.success_rate >= float((oblivious.labels != y).float().mean())


def test_adaptive_with_several_thresholds_stops_only_when_wrong_at_each(ensemble, frames, calibration) -> None:
    x, y = frames
    own = ensemble.thresholds
    higher = thresholds_from_scores(ensemble.calibration_scores(*calibration), 3.0)
    r = adaptive_pgd(ensemble, x, y, eps=0.15, steps=8, generator=gen(6), stop_thresholds=[own.values, higher.values])
    stopped = r.steps < 8
    assert bool(stopped.any())
    try:
        ensemble.thresholds = higher
        at_higher = ensemble.classify(r.x_adv).labels
    finally:
        ensemble.thresholds = own
    assert bool((r.labels[stopped] != y[stopped]).all()) and bool((at_higher[stopped] != y[stopped]).all())
    assert r.settings["stop_thresholds"] == [own.values.tolist(), higher.values.tolist()]
    with pytest.raises(ValueError, match="stop_thresholds"):
        adaptive_pgd(ensemble, x[:4], y[:4], eps=0.1, generator=gen(0), stop_thresholds=[])
    with pytest.raises(ValueError, match="shape"):
        adaptive_pgd(ensemble, x[:4], y[:4], eps=0.1, generator=gen(0), stop_thresholds=[torch.ones(3)])


def test_targeted_adaptive_reaches_the_target(ensemble, frames) -> None:
    x, y = frames
    target = (y + 1) % 10
    r = adaptive_pgd(ensemble, x[:40], target[:40], eps=0.3, steps=10, generator=gen(5), targeted=True)
    assert torch.equal(r.success, r.labels == target[:40])
    assert r.success_rate > 0.5


def test_runs_are_seeded(ensemble, frames) -> None:
    x, y = frames[0][:30], frames[1][:30]
    for attack in (adaptive_pgd, detector_aware_pgd):
        a = attack(ensemble, x, y, eps=0.1, steps=3, generator=gen(7))
        b = attack(ensemble, x, y, eps=0.1, steps=3, generator=gen(7))
        c = attack(ensemble, x, y, eps=0.1, steps=3, generator=gen(8))
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.steps, b.steps)
        assert not torch.equal(a.x_adv, c.x_adv)
        fixed = attack(ensemble, x, y, eps=0.1, steps=0, random_start=False)
        assert torch.equal(fixed.x_adv, x) and bool((fixed.steps == 0).all())


def test_outcomes_cover_the_bare_model_and_every_flagging_subset(ensemble, frames) -> None:
    x = frames[0][:5]
    with torch.no_grad():
        p = ensemble(x)
    outcomes = decision_outcomes(p)
    assert outcomes.shape == (1 + 3, 5, 10)  # bare, {20}, {40}, {20, 40}
    assert torch.allclose(outcomes.exp().sum(dim=2), torch.ones(4, 5), atol=1e-5)
    soft = torch.softmax(p.denoised_logits, dim=2)
    assert torch.equal(outcomes[3].argmax(1), soft.sum(0).argmax(1))


def test_the_deployed_decision_serves_black_box_attacks(ensemble, frames) -> None:
    x, y = frames
    decision = DefedDecision(ensemble)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=gen(9))).clamp(0, 1)
    for frames_ in (x, noisy):
        verdict = ensemble.classify(frames_)
        assert torch.equal(decision(frames_).argmax(1), verdict.labels)
    assert decision.flag_count > 0
    r = square_attack(decision, x[:20], y[:20], eps=0.2, max_queries=60, generator=gen(10))
    assert int(r.queries.max()) <= 60
    assert torch.equal(r.success, ensemble.classify(r.x_adv).labels != y[:20])
    assert (r.x_adv - x[:20]).abs().max() <= 0.2


def test_attacks_leave_every_module_in_its_mode(ensemble, frames) -> None:
    """The ensemble itself is in training mode (nn.Module's default) around eval-mode denoisers: an attack that
    gave it its mode back with train(True) would switch the denoisers' BatchNorm to batch statistics."""
    x, y = frames[0][:10], frames[1][:10]
    before = [(m, m.training) for m in ensemble.modules()]
    assert not any(m.training for d in ensemble.denoisers for m in d.modules())
    adaptive_pgd(ensemble, x, y, eps=0.1, steps=2, generator=gen(0))
    detector_aware_pgd(ensemble, x, y, eps=0.1, steps=2, search_steps=1, generator=gen(0))
    square_attack(DefedDecision(ensemble), x, y, eps=0.1, max_queries=5, generator=gen(0))
    assert all(m.training == mode for m, mode in before)


def test_an_empty_batch_gives_an_empty_result(ensemble, frames) -> None:
    x, y = frames[0][:0], frames[1][:0]
    for attack in (adaptive_pgd, detector_aware_pgd):
        r = attack(ensemble, x, y, eps=0.1, steps=2, generator=gen(0))
        assert isinstance(r, DefedAttackResult)
        assert r.x_adv.shape == x.shape and r.success.shape == (0,) and r.scores.shape == (2, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"eps": 0.1, "steps": -1}, "steps"),
        ({"eps": 0.1, "steps": 2.5}, "steps"),
        ({"eps": 0.1, "norm": "l3"}, "norm"),
        ({"eps": 0.1, "alpha": -1.0}, "alpha"),
        ({"eps": 0.1, "kappa": -1.0}, "kappa"),
        ({"eps": 0.1, "random_start": True, "generator": None}, "generator"),
        ({"eps": 0.1, "random_start": 1}, "random_start"),
    ],
)
@pytest.mark.parametrize("attack", [adaptive_pgd, detector_aware_pgd])
def test_bad_arguments_raise(ensemble, frames, attack, kwargs: dict, message: str) -> None:
    x, y = frames[0][:4], frames[1][:4]
    kwargs = {"generator": gen(0), **kwargs}
    with pytest.raises(ValueError, match=message):
        attack(ensemble, x, y, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"c": 0.0}, "c must"), ({"search_steps": 0}, "search_steps"), ({"rho": 1.0}, "rho"), ({"rho": -0.1}, "rho")],
)
def test_bad_detector_settings_raise(ensemble, frames, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detector_aware_pgd(ensemble, frames[0][:4], frames[1][:4], eps=0.1, generator=gen(0), **kwargs)


def test_bad_inputs_and_unfitted_ensembles_raise(ensemble, frames) -> None:
    x, y = frames[0][:4], frames[1][:4]
    unfitted = DefedEnsemble(ensemble.classifier, list(ensemble.denoisers))
    with pytest.raises(ValueError, match="thresholds"):
        adaptive_pgd(unfitted, x, y, eps=0.1, generator=gen(0))
    with pytest.raises(ValueError, match="thresholds"):
        DefedDecision(unfitted)
    with pytest.raises(ValueError, match="DefedEnsemble"):
        adaptive_pgd(ensemble.classifier, x, y, eps=0.1, generator=gen(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adaptive_pgd(ensemble, x * 2, y, eps=0.1, generator=gen(0))
    with pytest.raises(ValueError, match="labels"):
        adaptive_pgd(ensemble, x, y[:3], eps=0.1, generator=gen(0))
    with pytest.raises(ValueError, match="class 10"):
        detector_aware_pgd(ensemble, x, y.clone().fill_(10), eps=0.1, generator=gen(0))
    with pytest.raises(ValueError, match="multiples of 4"):
        adaptive_pgd(ensemble, x[:, :, :6, :6].contiguous(), y, eps=0.1, generator=gen(0))
