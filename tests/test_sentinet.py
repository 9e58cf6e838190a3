"""SentiNet (iotbed.defenses.sentinet).

Grad-CAM and the mask are checked on a hand-made two-channel network whose maps can be written down;
pasting on a model that records what it is fed. Behaviour checks use the LeNet-5 BadNet on sklearn
digits that tests/test_strip.py uses (same cached model); digits' 360 test images are split into a
calibration half (fits the curve and threshold, never scored) and a scored half.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from conftest import FAST, RATIO, TARGET
from torch import nn

from iotbed.analysis.detection import auroc
from iotbed.attacks.backdoor import Trigger, train_badnet, triggered_inputs
from iotbed.data import load_splits
from iotbed.defenses.sentinet import (
    SentinetDetector,
    SentinetError,
    SentinetScores,
    class_specific_mask,
    detection_scores,
    grad_cam,
    normalised_maps,
    saliency_layer,
    screen_update,
    sentinet_report,
)
from iotbed.models import get_or_train
from iotbed.models.architectures import build_model
from iotbed.models.flops import count_flops
from iotbed.sim.devices import BUILTIN_PROFILES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- Grad-CAM and the mask on a network small enough to do by hand ---------------------------------


class TwoChannelNet(nn.Module):
    """A = ReLU(identity 1x1 conv of the 2 input channels) on 4x4 images.
    logit 0 = sum of w0 * A_0 with w0 = 2 on the left half and 0 on the right (spatial mean 1);
    logit 1 = 2 * sum of A_1; logit 2 = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, kernel_size=1, bias=False)
        self.act = nn.ReLU()
        self.head = nn.Linear(32, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            w = torch.zeros(3, 2, 4, 4)
            w[0, 0, :, :2] = 2.0
            w[1, 1] = 2.0
            self.head.weight.copy_(w.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).flatten(1))


def test_grad_cam_is_the_mean_gradient_weighted_rectified_sum() -> None:
    net = TwoChannelNet()
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 1, 1], x[0, 0, 3, 3] = 2.0, 1.0, 1.0  # logit 0 = 2 * (2 + 1) = 6 (3,3 has weight 0)
    x[0, 1, 1, 1] = 1.0  # logit 1 = 2
    logits, classes, maps = grad_cam(net, net.act, x, 2)
    assert logits[0].tolist() == pytest.approx([6.0, 2.0, 0.0])
    assert classes[0].tolist() == [0, 1]
    # Class 0: d logit / d A_0 = w0, spatial mean 1; d / d A_1 = 0 -> map = A_0 everywhere, the right
    # half included (Grad-CAM weighs whole channels). Class 1: mean gradient 2 on A_1 -> map = 2 A_1.
    assert torch.equal(maps[0, 0], x[0, 0])
    assert torch.equal(maps[0, 1], 2.0 * x[0, 1])
    # The caller's network is left as it was: no hook, no gradients on its weights.
    assert not net.act._forward_hooks and net.conv.weight.grad is None


def test_mask_is_salient_for_the_prediction_and_for_no_proposed_class() -> None:
    net = TwoChannelNet()
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 1, 1], x[0, 0, 2, 2] = 2.0, 1.0, 0.5
    x[0, 1, 1, 1] = 1.0  # class 1 looks at (1, 1) as strongly as class 0's peak: taken away
    x[0, 1, 3, 0] = 0.1  # and weakly at (3, 0)
    _, _, raw = grad_cam(net, net.act, x, 2)
    maps = normalised_maps(raw, (4, 4))  # same size: the bilinear resize is the identity
    # One scale for both maps: the predicted class's peak (2).
    assert maps[0, 0, 0, 0] == 1.0 and maps[0, 1, 1, 1] == 1.0 and maps[0, 1, 3, 0] == pytest.approx(0.1)
    mask = class_specific_mask(maps, 0.5)
    assert mask.shape == (1, 1, 4, 4)
    # (0, 0): salient for 0 only; (1, 1): salient for 0 (0.5) but also for 1; (2, 2): 0.25 < 0.5.
    assert mask[0, 0].nonzero().tolist() == [[0, 0]]


def test_weak_proposed_class_is_not_inflated_to_its_own_peak() -> None:
    net = TwoChannelNet()
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0] = 2.0
    x[0, 1, 0, 0] = 0.1  # class 1's only evidence sits on class 0's region, weakly
    _, _, raw = grad_cam(net, net.act, x, 2)
    mask = class_specific_mask(normalised_maps(raw, (4, 4)), 0.5)
    assert bool(mask[0, 0, 0, 0])  # divided by its own peak it would read 1.0 and erase the region


def test_maps_are_upsampled_to_the_image() -> None:
    raw = torch.zeros(1, 2, 2, 2)
    raw[0, 0, 0, 0] = 4.0
    maps = normalised_maps(raw, (8, 8))
    assert maps.shape == (1, 2, 8, 8)
    assert float(maps[0, 0].max()) == pytest.approx(1.0) and float(maps.min()) >= 0.0
    assert float(maps[0, 0, 0, 0]) > float(maps[0, 0, 7, 7])
    zero = normalised_maps(torch.zeros(1, 2, 2, 2), (8, 8))  # no evidence: an empty mask, no division by 0
    assert not class_specific_mask(zero, 0.5).any()


def test_saliency_layer_is_the_last_conv_blocks_activation() -> None:
    lenet = build_model("lenet5", in_channels=1, num_classes=10, image_size=28, mean=[0.0], std=[1.0])
    assert saliency_layer(lenet) is lenet.features[4]  # conv2 -> ReLU
    gtsrb = build_model("gtsrb_cnn", in_channels=3, num_classes=43, image_size=32, mean=[0.0] * 3, std=[1.0] * 3)
    assert saliency_layer(gtsrb) is gtsrb.features[10]  # conv3 -> BatchNorm -> ReLU


# -- pasting, on a model that records its inputs ---------------------------------------------------


class Recorder(nn.Module):
    """conv + linear on 3-channel 6x6 images; every batch it is fed is kept (on the class, so the
    detector's private copies record too)."""

    seen: ClassVar[list[torch.Tensor]] = []

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # fixed weights, the global stream left alone
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
            self.act = nn.ReLU()
            self.head = nn.Linear(4 * 36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Recorder.seen.append(x.detach().clone())
        return self.head(self.act(self.conv(x)).flatten(1))


def test_region_and_noise_are_pasted_on_every_channel_of_the_backgrounds() -> None:
    gen = torch.Generator().manual_seed(1)
    backgrounds = torch.rand(8, 3, 6, 6, generator=gen)
    x = torch.rand(2, 3, 6, 6, generator=gen)
    det = SentinetDetector(Recorder(), backgrounds, n_pastes=4, top_k=2, max_batch=1000)
    _, _, mask = det.saliency(x)
    Recorder.seen.clear()
    det.score(x)
    # After Grad-CAM's forward pass: one batch of pasted regions, one of inert noise, b x N images each.
    pasted, inert = Recorder.seen[-2].view(2, 4, 3, 6, 6), Recorder.seen[-1].view(2, 4, 3, 6, 6)
    m = mask[:, None].expand(2, 4, 3, 6, 6)
    assert m.any() and not m.all()
    assert torch.equal(pasted[m], x[:, None].expand(2, 4, 3, 6, 6)[m])
    assert torch.equal(pasted[~m], inert[~m])  # the same backgrounds under both tests
    assert float(inert[m].min()) >= 0.0 and float(inert[m].max()) <= 1.0
    on_a_background = [
        any(torch.equal(img[~mk], bg[~mk]) for bg in backgrounds)
        for img, mk in zip(pasted.flatten(0, 1), m.flatten(0, 1))
    ]
    assert all(on_a_background)


def test_backgrounds_labelled_like_the_input_are_left_out() -> None:
    gen = torch.Generator().manual_seed(2)
    backgrounds = torch.rand(30, 3, 6, 6, generator=gen)
    det = SentinetDetector(Recorder(), backgrounds, n_pastes=50, top_k=1)
    predicted = torch.tensor([0, 1, 2, 3, 4])
    idx, noise = det._draw(predicted, torch.Generator().manual_seed(0))
    assert idx.shape == (5, 50) and noise.shape == (50, 3, 6, 6)
    assert len(det.background_labels.unique()) >= 2  # else there is nothing to leave out
    for row, label in zip(idx, predicted.tolist()):
        if bool((det.background_labels != label).any()):
            assert not bool((det.background_labels[row] == label).any())


# -- on the digits BadNet ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    splits = load_splits("digits")
    trig = Trigger.patch(splits.train.image_shape, size=4)
    bad = train_badnet("lenet5", splits.train, trig, TARGET, RATIO, FAST)
    clean = get_or_train("lenet5", splits.train, FAST, progress=False)
    perm = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(0))
    cal, scored = splits.test.subset(perm[:180]), splits.test.subset(perm[180:])
    pool = splits.train.images[~bad.poison.poisoned_mask]
    backgrounds = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))[:100]]
    return {
        "trigger": trig,
        "bad": bad.model,
        "clean": clean.model,
        "cal": cal,
        "scored": scored,
        "trojaned": triggered_inputs(scored, trig, TARGET),
        "backgrounds": backgrounds,
    }


@pytest.fixture(scope="module")
def bad_scores(setup):  # type: ignore[no-untyped-def]
    det = SentinetDetector(setup["bad"], setup["backgrounds"], n_pastes=50, generator=torch.Generator().manual_seed(0))
    return det, det.score(setup["cal"].images), det.score(setup["scored"].images), det.score(setup["trojaned"].images)


def test_stamped_inputs_fool_far_more_and_keep_their_confidence(bad_scores) -> None:  # type: ignore[no-untyped-def]
    _, _, benign, trojaned = bad_scores
    assert (trojaned.predicted == TARGET).float().mean() > 0.95
    assert float(trojaned.fooled.mean()) > 0.9 and float(benign.fooled.mean()) < 0.2
    assert float(torch.median(trojaned.fooled)) > float(torch.quantile(benign.fooled, 0.95))
    # The trigger is small: noise in its place leaves the confidence about where a benign region's does.
    assert float(trojaned.confidence.mean()) > 0.8
    assert float(trojaned.mask_area.mean()) < float(benign.mask_area.mean())


def test_stamped_inputs_are_flagged_and_clean_ones_at_about_the_preset_rate(bad_scores) -> None:  # type: ignore[no-untyped-def]
    det, cal, benign, trojaned = bad_scores
    boundary = det.calibrate_scores(cal, frr=0.05)
    assert boundary.n_calibration == 180 and boundary.calibration_frr == pytest.approx(0.05, abs=0.01)
    frr = float(det.flag_scores(benign).float().mean())
    flagged = float(det.flag_scores(trojaned).float().mean())
    assert frr <= 0.10
    assert flagged >= 0.9
    # The scored split plays no part in the boundary: flagging leaves it where it is.
    det.flag(torch.zeros(1, 1, 32, 32))
    assert det.boundary is boundary


def test_report_gives_far_at_preset_frr_and_auroc(bad_scores) -> None:  # type: ignore[no-untyped-def]
    det, cal, benign, trojaned = bad_scores
    report = sentinet_report(det, cal, benign, trojaned, (0.05, 0.02, 0.01))
    assert [p.frr_preset for p in report.points] == [0.05, 0.02, 0.01]
    assert report.auroc >= 0.97
    assert report.far_at(0.05) <= 0.1
    assert det.boundary is not None
    assert report.auroc == pytest.approx(
        auroc(detection_scores(det.boundary, benign), detection_scores(det.boundary, trojaned))
    )
    fars = [p.far for p in report.points]
    assert fars == sorted(fars)  # a lower preset FRR moves the threshold up


def test_scores_are_deterministic_for_a_seed_and_independent_of_chunking(setup) -> None:  # type: ignore[no-untyped-def]
    x = torch.cat([setup["scored"].images[:6], setup["trojaned"].images[:6]])

    def scores(seed: int, max_batch: int) -> SentinetScores:
        det = SentinetDetector(
            setup["bad"],
            setup["backgrounds"],
            n_pastes=20,
            generator=torch.Generator().manual_seed(seed),
            max_batch=max_batch,
        )
        return det.score(x)

    a, b, c = scores(5, 1024), scores(5, 40), scores(6, 1024)
    assert torch.equal(a.fooled, b.fooled) and torch.allclose(a.confidence, b.confidence, atol=1e-6)
    assert torch.equal(a.predicted, c.predicted) and torch.equal(a.mask_area, c.mask_area)  # saliency has no dice
    assert not torch.equal(a.confidence, c.confidence)


def test_update_screen_flags_the_badnet_and_accepts_the_clean_model(setup) -> None:  # type: ignore[no-untyped-def]
    frames = torch.cat([setup["scored"].images[:60], setup["trojaned"].images[:20]])
    kwargs = {"n_pastes": 30, "frr": 0.05, "generator": torch.Generator().manual_seed(3)}
    bad = screen_update(setup["bad"], frames, setup["cal"].images, setup["backgrounds"], **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(3)
    good = screen_update(setup["clean"], frames, setup["cal"].images, setup["backgrounds"], **kwargs)
    assert bad.backdoored and bad.p_value < 1e-3 and bad.flagged[60:].float().mean() > 0.8
    assert not good.backdoored and good.p_value > 1e-3
    assert bad.excess.shape == (80,) and bad.flagged_fraction == bad.n_flagged / 80


# -- cost -----------------------------------------------------------------------------------------


def test_flops_are_grad_cam_plus_two_tests_of_n_forward_passes() -> None:
    lenet = build_model("lenet5", in_channels=1, num_classes=10, image_size=28, mean=[0.0], std=[1.0])
    det = SentinetDetector(lenet, torch.rand(10, 1, 28, 28), n_pastes=100, top_k=3)
    # conv1 28*28*6 outputs x 25, conv2 10*10*16 x 150, fc 400*120 + 120*84 + 84*10 multiply-adds.
    forward = 2 * (28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10)
    behind = 2 * (400 * 120 + 120 * 84 + 84 * 10)  # Grad-CAM's backward: the fc layers after conv2's ReLU
    cost = det.cost
    assert cost.forward == forward == count_flops(lenet, (1, 28, 28))
    assert cost.backward == behind
    assert cost.grad_cam == forward + 4 * behind
    assert cost.per_input == forward + 4 * behind + 200 * forward
    assert cost.setup == 10 * forward  # the backgrounds, labelled once per model
    pi = BUILTIN_PROFILES["raspberry_pi_4"]
    assert pi.seconds_for(1, cost.per_input) == pytest.approx(0.5e-3 + cost.per_input / (4 * 12e9 * 0.10))


# -- misuse -----------------------------------------------------------------------------------------


def test_bad_arguments_are_refused_with_clear_errors() -> None:
    lenet = build_model("lenet5", in_channels=1, num_classes=10, image_size=28, mean=[0.0], std=[1.0])
    bg = torch.rand(10, 1, 28, 28)
    for kwargs, words in (
        ({"n_pastes": 0}, "n_pastes"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 10}, "needs at least 11 classes"),
        ({"saliency_threshold": 0.0}, "saliency_threshold"),
        ({"saliency_threshold": 1.5}, "saliency_threshold"),
        ({"noise_std": -1.0}, "inert noise"),
        ({"n_bins": 2}, "n_bins"),
        ({"max_batch": 0}, "max_batch"),
        ({"layer": "features.99"}, "no module named"),
    ):
        with pytest.raises(SentinetError, match=words):
            SentinetDetector(lenet, bg, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SentinetError, match="backgrounds"):
        SentinetDetector(lenet, torch.rand(1, 28, 28))
    with pytest.raises(SentinetError, match="no Conv2d"):
        SentinetDetector(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), bg)
    det = SentinetDetector(lenet, bg, n_pastes=5)
    with pytest.raises(SentinetError, match=r"inputs must be a non-empty \(B, 1, 28, 28\)"):
        det.score(torch.rand(2, 3, 28, 28))
    scores = det.score(torch.rand(4, 1, 28, 28))
    with pytest.raises(SentinetError, match="calibrate the detector"):
        det.flag_scores(scores)
    with pytest.raises(SentinetError, match="preset FRR"):
        det.calibrate_scores(scores, frr=0.6)
    flat = SentinetScores(torch.zeros(5, dtype=torch.long), torch.rand(5), torch.full((5,), 0.5), torch.zeros(5))
    with pytest.raises(SentinetError, match="all equal"):
        det.calibrate_scores(flat)
    with pytest.raises(SentinetError, match="significance"):
        screen_update(lenet, torch.rand(3, 1, 28, 28), bg, bg, significance=0.0)
