"""Triggers, BadNets poisoning and the CA/ASR/RA metrics (iotbed.attacks.backdoor).

The end-to-end check trains LeNet-5 on sklearn digits (1437 train / 360 test, 32x32) with a short
config; both models go through the model cache, so only the first run pays for training.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, RATIO, TARGET

from iotbed.attacks.backdoor import (
    BackdoorError,
    MultiTrigger,
    Trigger,
    backdoor_metrics,
    poison_count,
    poison_dataset,
    train_badnet,
    triggered_inputs,
)
from iotbed.data import load_splits
from iotbed.models import get_or_train, predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_splits("digits")


def _rand_images(n: int, c: int = 1, side: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed))


# -- trigger algebra ----------------------------------------------------------------------------


def test_zero_mask_is_identity() -> None:
    x = _rand_images(5, c=3)
    trig = Trigger(torch.zeros(1, 8, 8), torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)), alpha=0.7)
    assert torch.equal(trig.apply(x), x)


def test_alpha_one_patch_equals_pattern_inside_and_keeps_pixels_outside() -> None:
    x = _rand_images(4, c=3)
    x_before = x.clone()
    trig = Trigger.patch((3, 8, 8), size=3, style="checkerboard", corner="top-left", margin=1)
    y = trig.apply(x)
    inside = trig.mask[0].bool()
    assert int(inside.sum()) == 9
    assert torch.equal(y[:, :, inside], trig.pattern[:, inside].expand(4, -1, -1))
    assert torch.equal(y[:, :, ~inside], x[:, :, ~inside])
    # Checkerboard: top-left white, its right neighbour black.
    assert trig.pattern[0, 1, 1] == 1.0 and trig.pattern[0, 1, 2] == 0.0
    assert torch.equal(x, x_before)  # apply returns a new tensor and leaves x alone


def test_blend_formula_and_unit_interval() -> None:
    gen = torch.Generator().manual_seed(2)
    x = _rand_images(16, c=3)
    mask, pattern = torch.rand(1, 8, 8, generator=gen), torch.rand(3, 8, 8, generator=gen)
    for alpha in (0.1, 0.5, 1.0):
        y = Trigger(mask, pattern, alpha).apply(x)
        assert torch.allclose(y, (1 - alpha * mask) * x + alpha * mask * pattern)
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # A blended (full-image) trigger at alpha a is the convex mix (1 - a) x + a p everywhere.
    blended = Trigger.blended(pattern, 0.2)
    assert torch.allclose(blended.apply(x), 0.8 * x + 0.2 * pattern)
    # Extremes stay in range too.
    for extreme in (torch.zeros_like(x), torch.ones_like(x)):
        y = Trigger(torch.ones(3, 8, 8), pattern, 0.9).apply(extreme)
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_multitrigger_assigns_round_robin_and_matches_single_triggers() -> None:
    x = _rand_images(7)
    a = Trigger.patch((1, 8, 8), size=2, corner="top-left")
    b = Trigger.patch((1, 8, 8), size=2, corner="bottom-right", style="checkerboard", alpha=0.5)
    multi = MultiTrigger((a, b))
    y = multi.apply(x)
    assert torch.allclose(y[0::2], a.apply(x[0::2]))
    assert torch.allclose(y[1::2], b.apply(x[1::2]))
    explicit = multi.apply(x, torch.ones(7, dtype=torch.int64))
    assert torch.allclose(explicit, b.apply(x))
    assert multi.fingerprint() != a.fingerprint()


def test_trigger_rejects_bad_inputs() -> None:
    with pytest.raises(BackdoorError, match=r"\[0, 1\]"):
        Trigger(torch.full((1, 8, 8), 1.5), torch.zeros(1, 8, 8))
    with pytest.raises(BackdoorError, match="alpha"):
        Trigger(torch.ones(1, 8, 8), torch.zeros(1, 8, 8), alpha=0.0)
    with pytest.raises(BackdoorError, match="mask"):
        Trigger(torch.ones(2, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(BackdoorError, match="does not fit"):
        Trigger.patch((1, 8, 8), size=8, margin=1)
    with pytest.raises(BackdoorError, match="shape"):
        Trigger.patch((1, 8, 8)).apply(torch.zeros(2, 1, 9, 9))


def test_fingerprint_tracks_content() -> None:
    a = Trigger.patch((1, 8, 8), size=3)
    assert a.fingerprint() == Trigger.patch((1, 8, 8), size=3).fingerprint()
    assert a.fingerprint() != Trigger.patch((1, 8, 8), size=2).fingerprint()
    assert a.fingerprint() != a.with_alpha(0.5).fingerprint()


# -- poisoning ----------------------------------------------------------------------------------


def test_poisoning_ratio_is_exact_and_only_poisoned_samples_change(digits) -> None:  # type: ignore[no-untyped-def]
    ds = digits.train
    trig = Trigger.patch(ds.image_shape, size=4)
    p = poison_dataset(ds, trig, TARGET, 0.1, torch.Generator().manual_seed(3))
    assert len(p.poisoned_idx) == poison_count(len(ds), 0.1) == round(0.1 * len(ds))
    assert len(torch.unique(p.poisoned_idx)) == len(p.poisoned_idx)
    mask = p.poisoned_mask
    # Poisoned samples came from non-target classes and now carry the target label and the trigger.
    assert bool((ds.labels[mask] != TARGET).all())
    assert bool((p.dataset.labels[mask] == TARGET).all())
    assert torch.equal(p.dataset.images[mask], trig.apply(ds.images[mask]))
    # Everything else is untouched, labels and pixels.
    assert torch.equal(p.dataset.labels[~mask], ds.labels[~mask])
    assert torch.equal(p.dataset.images[~mask], ds.images[~mask])
    assert int((p.dataset.labels != ds.labels).sum()) == len(p.poisoned_idx)
    assert torch.equal(p.original_labels, ds.labels)
    # The generator decides which samples: same seed, same choice; another seed, another choice.
    again = poison_dataset(ds, trig, TARGET, 0.1, torch.Generator().manual_seed(3))
    other = poison_dataset(ds, trig, TARGET, 0.1, torch.Generator().manual_seed(4))
    assert torch.equal(again.poisoned_idx, p.poisoned_idx)
    assert not torch.equal(other.poisoned_idx, p.poisoned_idx)
    assert p.dataset.fingerprint() != ds.fingerprint() != other.dataset.fingerprint()


def test_poisoning_with_several_triggers_shares_them_out(digits) -> None:  # type: ignore[no-untyped-def]
    ds = digits.train
    a = Trigger.patch(ds.image_shape, size=3, corner="top-left")
    b = Trigger.patch(ds.image_shape, size=3, corner="bottom-right", style="checkerboard")
    p = poison_dataset(ds, MultiTrigger((a, b)), TARGET, 0.1, torch.Generator().manual_seed(5))
    idx = p.poisoned_idx
    # Poisoned sample k (in index order) carries trigger k mod 2: half the poison each.
    assert torch.equal(p.dataset.images[idx[0::2]], a.apply(ds.images[idx[0::2]]))
    assert torch.equal(p.dataset.images[idx[1::2]], b.apply(ds.images[idx[1::2]]))
    assert bool((p.dataset.labels[idx] == TARGET).all())


def test_poisoning_rejects_impossible_requests(digits) -> None:  # type: ignore[no-untyped-def]
    ds = digits.train
    trig = Trigger.patch(ds.image_shape, size=4)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(BackdoorError, match="ratio"):
        poison_dataset(ds, trig, TARGET, 0.0, gen)
    with pytest.raises(BackdoorError, match="not of the target class"):
        poison_dataset(ds, trig, TARGET, 0.95, gen)
    with pytest.raises(BackdoorError, match="target class"):
        poison_dataset(ds, trig, 10, 0.1, gen)


# -- end to end on digits -------------------------------------------------------------------------


def test_badnet_on_digits_reaches_high_asr_and_keeps_clean_accuracy(digits) -> None:  # type: ignore[no-untyped-def]
    trig = Trigger.patch(digits.train.image_shape, size=4)
    clean = get_or_train("lenet5", digits.train, FAST, test_ds=digits.test, progress=False)
    bad = train_badnet("lenet5", digits.train, trig, TARGET, RATIO, FAST, test_ds=digits.test)
    m_bad = backdoor_metrics(bad.model, digits.test, trig, TARGET)
    m_clean = backdoor_metrics(clean.model, digits.test, trig, TARGET)

    assert m_bad.attack_success_rate >= 0.95
    assert abs(m_bad.clean_accuracy - m_clean.clean_accuracy) <= 0.02
    assert m_bad.robust_accuracy + m_bad.attack_success_rate <= 1.0 + 1e-6  # disjoint outcomes
    # The clean model does not answer the trigger: ASR measures the backdoor, not the patch.
    assert m_clean.attack_success_rate < 0.2
    assert m_clean.robust_accuracy > 0.8

    # ASR is a re-prediction on the non-target test images with the trigger applied.
    trig_ds = triggered_inputs(digits.test, trig, TARGET)
    assert len(trig_ds) == m_bad.n_triggered == int((digits.test.labels != TARGET).sum())
    pred, _ = predict(bad.model, trig.apply(digits.test.images[digits.test.labels != TARGET]))
    assert m_bad.attack_success_rate == pytest.approx(float((pred == TARGET).float().mean()))

    # Cached like any model, under a key that differs from the clean model's.
    again = train_badnet("lenet5", digits.train, trig, TARGET, RATIO, FAST)
    assert not again.trained.trained_now
    assert again.trained.key == bad.trained.key != clean.key
    other_ratio = poison_dataset(digits.train, trig, TARGET, 0.05, torch.Generator().manual_seed(0))
    assert other_ratio.dataset.fingerprint() != bad.poison.dataset.fingerprint()
