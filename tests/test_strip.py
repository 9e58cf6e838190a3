"""STRIP (iotbed.defenses.strip) and detection metrics (iotbed.analysis.detection).

Formula checks use hand-made probability vectors; behaviour checks use a LeNet-5 BadNet on sklearn
digits (the same cached model as tests/test_backdoor.py). Digits' 360 test images are split into a
calibration half (fits the threshold, never scored) and a scored half.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, RATIO, TARGET
from scipy import stats
from torch import nn

from iotbed.analysis.detection import (
    DetectionError,
    auroc,
    detection_report,
    far_at_frr,
    fit_threshold,
)
from iotbed.attacks.backdoor import Trigger, train_badnet, triggered_inputs
from iotbed.data import load_splits
from iotbed.defenses.strip import StripDetector, StripError, entropy_bits, screen_update, strip_entropy
from iotbed.models import get_or_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the entropy formula --------------------------------------------------------------------------


def test_entropy_matches_hand_computation_and_not_arts_axis() -> None:
    # One input, two blends, three classes.
    probs = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]]])
    # Blend 1: one-hot -> 0 bits (0 log 0 = 0). Blend 2: 0.5*1 + 2*0.25*2 = 1.5 bits. Mean: 0.75.
    assert torch.allclose(entropy_bits(probs[0]), torch.tensor([0.0, 1.5]))
    assert strip_entropy(probs).item() == pytest.approx(0.75)
    # ART: entropy(preds, base=2, axis=0) summed / N -- over blends per class. Class 0 column
    # [1, 0.5] normalises to [2/3, 1/3] -> 0.918; columns [0, .25] and [0, .25] -> 0 each; / 2.
    art = float(np.sum(stats.entropy(probs[0].numpy(), base=2, axis=0)) / probs.shape[1])
    assert art == pytest.approx(0.4591, abs=1e-4)
    assert art != pytest.approx(strip_entropy(probs).item())

    # ART's axis even ranks the two cases the wrong way round: identical near-one-hot predictions
    # (what a trojaned input gives) versus predictions scattered over classes (a benign input).
    trojan_like = torch.tensor([[0.91] + [0.01] * 9] * 10).unsqueeze(0)
    benign_like = torch.softmax(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)) * 2, dim=1).unsqueeze(0)
    ours_t, ours_b = strip_entropy(trojan_like).item(), strip_entropy(benign_like).item()
    art_t = float(np.sum(stats.entropy(trojan_like[0].numpy(), base=2, axis=0)) / 10)
    art_b = float(np.sum(stats.entropy(benign_like[0].numpy(), base=2, axis=0)) / 10)
    assert ours_t < ours_b
    assert art_t > art_b


def test_entropy_handles_exact_zeros_and_uniform() -> None:
    probs = torch.tensor([[[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    h = strip_entropy(probs)
    assert torch.isfinite(h).all()
    assert h.item() == pytest.approx((0.0 + 2.0) / 2)


class _Recorder(nn.Module):
    """A fake classifier: logits from the pixel sum, and it remembers the largest input value."""

    def __init__(self) -> None:
        super().__init__()
        self.max_seen = 0.0
        self.w = nn.Parameter(torch.linspace(-1, 1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.max_seen = max(self.max_seen, float(x.max()))
        return x.flatten(1).sum(1, keepdim=True) * self.w


def test_additive_blend_is_a_plain_unclipped_sum_and_convex_is_half_half() -> None:
    overlays = torch.ones(4, 1, 5, 5)
    x = torch.ones(2, 1, 5, 5)
    # channels_last=False: score the recorder itself, not the detector's channels-last copy.
    rec = _Recorder()
    StripDetector(rec, overlays, n_blends=3, channels_last=False).score(x)
    assert rec.max_seen == pytest.approx(2.0)  # 1 + 1, not clipped to 1
    rec = _Recorder()
    StripDetector(rec, overlays * 0.0, n_blends=3, blend="convex", alpha=0.5, channels_last=False).score(x)
    assert rec.max_seen == pytest.approx(0.5)


def test_scores_do_not_depend_on_chunking_and_follow_the_generator() -> None:
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    overlays, x = torch.rand(30, 1, 4, 4, generator=gen), torch.rand(9, 1, 4, 4, generator=gen)
    big = StripDetector(model, overlays, n_blends=7, generator=torch.Generator().manual_seed(1)).score(x)
    small = StripDetector(model, overlays, n_blends=7, max_batch=7, generator=torch.Generator().manual_seed(1)).score(x)
    other = StripDetector(model, overlays, n_blends=7, generator=torch.Generator().manual_seed(2)).score(x)
    assert torch.allclose(big, small)
    assert not torch.allclose(big, other)
    # Batched scoring equals scoring the inputs one at a time with the same overlay draws.
    det = StripDetector(model, overlays, n_blends=7, sampling="all")
    assert det.n_blends == 30
    together = det.score(x)
    alone = torch.cat([det.score(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(together, alone, atol=1e-6)


class _ViewNet(nn.Module):
    """Calls .view() on conv features, which a channels-last tensor does not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        return self.fc(f.view(f.shape[0], -1))


def test_channels_last_copy_falls_back_for_models_that_need_nchw() -> None:
    gen = torch.Generator().manual_seed(4)
    model = _ViewNet()
    overlays, x = torch.rand(10, 1, 4, 4, generator=gen), torch.rand(5, 1, 4, 4, generator=gen)
    fast = StripDetector(model, overlays, n_blends=4, generator=torch.Generator().manual_seed(0)).score(x)
    plain = StripDetector(
        model, overlays, n_blends=4, channels_last=False, generator=torch.Generator().manual_seed(0)
    ).score(x)
    assert torch.allclose(fast, plain, atol=1e-6)
    assert model.training  # the caller's mode is given back


def test_detector_rejects_misuse() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(StripError, match="blend"):
        StripDetector(model, torch.rand(3, 1, 4, 4), blend="max")  # type: ignore[arg-type]
    det = StripDetector(model, torch.rand(3, 1, 4, 4), n_blends=2)
    with pytest.raises(StripError, match="calibrate"):
        det.flag(torch.rand(2, 1, 4, 4))
    with pytest.raises(StripError, match="inputs must be"):
        det.score(torch.rand(2, 1, 5, 5))


# -- detection metrics ----------------------------------------------------------------------------


def test_threshold_is_norm_ppf_of_the_calibration_fit_or_a_quantile() -> None:
    cal = np.random.default_rng(0).normal(0.3, 0.08, size=400)
    mu, sigma = stats.norm.fit(cal)
    assert fit_threshold(cal, 0.01) == pytest.approx(stats.norm.ppf(0.01, mu, sigma))
    q = fit_threshold(cal, 0.02, method="quantile")
    assert np.mean(cal <= q) == pytest.approx(0.02, abs=1 / 400)
    with pytest.raises(DetectionError, match="FRR"):
        fit_threshold(cal, 0.7)
    with pytest.raises(DetectionError, match="degenerate"):
        fit_threshold(np.ones(10), 0.01)


def test_auroc_uses_continuous_scores() -> None:
    rng = np.random.default_rng(1)
    benign, trojan = rng.normal(1.0, 0.3, 300), rng.normal(0.5, 0.3, 200)
    a = auroc(benign, trojan)
    # Mann-Whitney: P(trojan score < benign score).
    u = stats.mannwhitneyu(benign, trojan).statistic / (len(benign) * len(trojan))
    assert a == pytest.approx(u)
    # A hard-label "AUC" (TrojanZoo) is one ROC point: (TPR + TNR) / 2 at the threshold.
    t = fit_threshold(benign, 0.01)
    hard = (np.mean(trojan <= t) + np.mean(benign > t)) / 2
    assert abs(a - hard) > 0.05
    # Depends on the order of scores only.
    assert auroc(np.exp(benign), np.exp(trojan)) == pytest.approx(a)


def test_report_uses_strip_names_and_gives_codefend_names_swapped() -> None:
    cal = np.linspace(0.2, 1.0, 200)
    benign = np.array([0.1, 0.5, 0.9, 0.95])
    trojan = np.array([0.0, 0.01, 0.6])
    points = far_at_frr(cal, benign, trojan, (0.05,), method="quantile")
    t = np.quantile(cal, 0.05)
    assert points[0].frr == pytest.approx(np.mean(benign <= t))  # benign flagged
    assert points[0].far == pytest.approx(np.mean(trojan > t))  # trojaned accepted
    report = detection_report(cal, benign, trojan, (0.05,), method="quantile")
    cd = report.codefend_names()[0]
    assert cd["fnr"] == points[0].frr and cd["fpr"] == points[0].far


# -- on the digits BadNet -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    splits = load_splits("digits")
    trig = Trigger.patch(splits.train.image_shape, size=4)
    bad = train_badnet("lenet5", splits.train, trig, TARGET, RATIO, FAST)
    clean = get_or_train("lenet5", splits.train, FAST, progress=False)
    perm = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(0))
    cal_idx, scored_idx = perm[:180], perm[180:]
    overlays = splits.train.images[~bad.poison.poisoned_mask]  # the device's clean held-out pool
    return {
        "trigger": trig,
        "bad": bad.model,
        "clean": clean.model,
        "cal_idx": cal_idx,
        "scored_idx": scored_idx,
        "cal": splits.test.subset(cal_idx),
        "scored": splits.test.subset(scored_idx),
        "overlays": overlays,
    }


@pytest.fixture(scope="module")
def bad_scores(setup):  # type: ignore[no-untyped-def]
    det = StripDetector(setup["bad"], setup["overlays"], n_blends=100, generator=torch.Generator().manual_seed(0))
    trojaned = triggered_inputs(setup["scored"], setup["trigger"], TARGET)
    return det, det.score(setup["cal"].images), det.score(setup["scored"].images), det.score(trojaned.images)


def test_trojaned_inputs_have_lower_entropy(bad_scores) -> None:  # type: ignore[no-untyped-def]
    _, h_cal, h_benign, h_troj = bad_scores
    assert float(h_troj.mean()) < 0.5 * float(h_benign.mean())
    assert float(torch.median(h_troj)) < float(torch.quantile(h_benign, 0.05))


def test_threshold_comes_from_a_calibration_split_disjoint_from_the_scored_one(setup, bad_scores) -> None:  # type: ignore[no-untyped-def]
    det, h_cal, h_benign, _ = bad_scores
    assert not set(setup["cal_idx"].tolist()) & set(setup["scored_idx"].tolist())
    th = det.calibrate_scores(h_cal, frr=0.01)
    assert th.boundary == pytest.approx(fit_threshold(h_cal, 0.01))
    assert th.n_calibration == len(setup["cal"])
    # The scored split plays no part: scoring other inputs leaves the boundary where it is.
    det.flag(setup["scored"].images[:10])
    assert det.threshold is th
    # Flags are exactly "entropy <= boundary".
    assert torch.equal(det.flag_scores(h_benign), h_benign <= th.boundary)


def test_far_at_one_percent_frr_is_small_and_auroc_high(bad_scores) -> None:  # type: ignore[no-untyped-def]
    _, h_cal, h_benign, h_troj = bad_scores
    report = detection_report(h_cal, h_benign, h_troj)
    assert [p.frr_preset for p in report.points] == [0.02, 0.01, 0.005]
    assert report.far_at(0.01) <= 0.06
    assert report.points[1].frr <= 0.05
    assert report.auroc >= 0.98
    # FAR can only grow as the preset FRR shrinks (the boundary moves down).
    fars = [p.far for p in report.points]
    assert fars == sorted(fars)


def test_clean_model_shows_no_entropy_gap(setup) -> None:  # type: ignore[no-untyped-def]
    det = StripDetector(setup["clean"], setup["overlays"], n_blends=50, generator=torch.Generator().manual_seed(0))
    trojaned = triggered_inputs(setup["scored"], setup["trigger"], TARGET)
    a = auroc(det.score(setup["scored"].images), det.score(trojaned.images))
    assert a < 0.8


def test_update_screen_flags_the_badnet_and_accepts_the_clean_model(setup) -> None:  # type: ignore[no-untyped-def]
    # Relayed frames: 120 clean + 40 triggered frames of the scored split.
    scored = setup["scored"]
    trojaned = triggered_inputs(scored, setup["trigger"], TARGET)
    frames = torch.cat([scored.images[:120], trojaned.images[:40]])
    kwargs = {"n_blends": 50, "generator": torch.Generator().manual_seed(3)}
    bad = screen_update(setup["bad"], frames, setup["cal"].images, setup["overlays"], **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(3)
    good = screen_update(setup["clean"], frames, setup["cal"].images, setup["overlays"], **kwargs)
    assert bad.backdoored and bad.p_value < 1e-3
    assert bad.flagged_fraction > 0.15
    assert not good.backdoored and good.p_value > 1e-3
    assert good.entropies.shape == (160,) and good.entropies.dtype == torch.float32
    # The documented limit: without the trigger among the relayed frames, STRIP sees nothing.
    kwargs["generator"] = torch.Generator().manual_seed(3)
    unseen = screen_update(setup["bad"], scored.images[:160], setup["cal"].images, setup["overlays"], **kwargs)
    assert not unseen.backdoored
