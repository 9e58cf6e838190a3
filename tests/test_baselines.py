"""Tests of the baseline input-transform defenses and the Preprocessor / DefendedModel interface."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import nn

from iotbed.defenses.base import DefendedModel, Preprocessor
from iotbed.defenses.baselines import (
    FeatureSqueezing,
    JpegCompression,
    MedianSmoothing,
    PixelDeflection,
    median_filter,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(n: int = 4, c: int = 3, h: int = 24, w: int = 24, seed: int = 0) -> torch.Tensor:
    """Smooth images with a little texture, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, c, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return (base + 0.03 * torch.randn(n, c, h, w, generator=g)).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a.double() - b.double()).pow(2).mean()))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("window", [1, 2, 3, 4, 5])
def test_median_filter_matches_scipy(window: int) -> None:
    x = torch.rand(2, 3, 11, 9, generator=torch.Generator().manual_seed(window))
    expected = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, window, window), mode="reflect")
    assert np.array_equal(median_filter(x, window).numpy(), expected)


def test_feature_squeezing_reduces_bit_depth_then_filters() -> None:
    x = images()
    only_bits = FeatureSqueezing(bit_depth=3, median_window=None)(x)
    levels = only_bits * 7
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    assert (only_bits - x).abs().max() <= 0.5 / 7 + 1e-6
    both = FeatureSqueezing(bit_depth=3, median_window=2)(x)
    assert torch.equal(both, median_filter(only_bits, 2))
    assert torch.equal(MedianSmoothing(window=3)(x), median_filter(x, 3))


def test_jpeg_round_trip_is_close_at_high_quality_and_worse_at_low() -> None:
    x = images(3, 3, 32, 32)
    high, low = JpegCompression(quality=95)(x), JpegCompression(quality=10)(x)
    assert high.shape == x.shape and high.dtype == x.dtype and high.min() >= 0 and high.max() <= 1
    assert psnr(high, x) > 30 and psnr(low, x) < psnr(high, x)
    grey = JpegCompression(quality=75)(x[:, :1])
    assert grey.shape == (3, 1, 32, 32) and psnr(grey, x[:, :1]) > 25
    with pytest.raises(ValueError, match="channels"):
        JpegCompression()(torch.rand(1, 2, 8, 8))


def test_pixel_deflection_copies_pixels_from_the_window() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # all values distinct
    defense = PixelDeflection(window=2, rate=0.1, denoise=None)
    out = defense(x, torch.Generator().manual_seed(2))
    changed = (out != x).nonzero().tolist()
    assert 0 < len(changed) <= 3 * 3 * defense.deflections(16, 16)
    assert defense.deflections(16, 16) == round(256 * 0.1)
    for n, c, i, j in changed:
        lo_i, hi_i, lo_j, hi_j = max(i - 2, 1), min(i + 2, 15), max(j - 2, 1), min(j + 2, 15)
        assert (x[n, c, lo_i : hi_i + 1, lo_j : hi_j + 1] == out[n, c, i, j]).any()
    again = defense(x, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)
    with_wd = PixelDeflection(window=8, rate=0.05)(images(), torch.Generator().manual_seed(0))
    assert with_wd.shape == (4, 3, 24, 24) and with_wd.min() >= 0 and with_wd.max() <= 1


def test_defended_model_predicts_with_the_real_transform_and_differentiates_through_the_surrogate() -> None:
    with torch.random.fork_rng():  # the toy network's init, without touching the caller's RNG
        torch.manual_seed(0)
        net = TinyNet().eval()
    defense = FeatureSqueezing(bit_depth=2, median_window=3)
    defended = DefendedModel(defense, net)
    x = images(2, 3, 12, 12)
    y = torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(defended(x), net(defense(x)))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(defended(xg), y), xg)
    z = defense(x).requires_grad_(True)
    (expected,) = torch.autograd.grad(F.cross_entropy(net(z), y), z)  # BPDA, identity surrogate
    assert torch.allclose(grad, expected, atol=1e-7)
    assert all(p.grad is None for p in net.parameters())


def test_random_defenses_need_a_generator_and_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="Generator"):
        DefendedModel(PixelDeflection(), TinyNet())
    with pytest.raises(ValueError, match="Generator"):
        PixelDeflection()(images())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MedianSmoothing()(images() + 1)
    with pytest.raises(ValueError, match="Preprocessor"):
        DefendedModel(object(), TinyNet())  # type: ignore[arg-type]
    for bad in (
        lambda: JpegCompression(quality=0),
        lambda: JpegCompression(quality=100),
        lambda: FeatureSqueezing(bit_depth=9),
        lambda: FeatureSqueezing(median_window=0),
        lambda: MedianSmoothing(window=2.5),  # type: ignore[arg-type]
        lambda: PixelDeflection(rate=2.0),
        lambda: PixelDeflection(window=0),
        lambda: PixelDeflection(denoise="tv"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError):
            bad()


def test_params_name_every_defense() -> None:
    for defense in (JpegCompression(), FeatureSqueezing(), MedianSmoothing(), PixelDeflection()):
        assert isinstance(defense, Preprocessor)
        params = defense.params()
        assert params["name"] == defense.name and len(params) > 1
        assert torch.equal(defense.estimate_forward(images(1)), images(1))
