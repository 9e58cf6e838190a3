"""Tests of SUPER-IoT recovery and denoising at the edge (iotbed.defenses.superiot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch

from iotbed.codecs import decode, drop_mask, encode
from iotbed.defenses.superiot import (
    SuperIoT,
    bayes_shrink_denoise,
    dct_matrix,
    recover_faithful,
    recover_faithful_reference,
    recover_fast,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1] (skimage's compare_psnr, data range 1)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def smooth_images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish test images: low-frequency patterns plus a little noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    f = torch.rand(n, c, 4, generator=g, dtype=torch.float64) * 4
    img = 0.5 + 0.25 * torch.sin(f[..., 0, None, None] * 3 * yy + f[..., 1, None, None] * 2 * xx)
    img = img + 0.15 * torch.cos(f[..., 2, None, None] * 5 * xx * yy + f[..., 3, None, None])
    img = img + 0.02 * torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return img.clamp(0, 1).float()


@pytest.fixture(scope="module")
def gtsrb_images(shared_datasets: Path) -> torch.Tensor:
    folder = shared_datasets / "gtsrb"
    if not folder.is_dir():
        pytest.skip(f"GTSRB is not at {folder}")
    from iotbed.data import load_splits

    test = load_splits("gtsrb", folder).test
    return test.images[::500][:12]  # 12 images spread over the test set


def authors_port(x: torch.Tensor, mask: torch.Tensor, ws: int, **kwargs: int) -> torch.Tensor:
    """`recover_faithful_reference` (the authors' loop, one HWC image at a time) over a batch."""
    out = []
    for img, m in zip(x, mask, strict=True):
        dropped = (img * ~m).permute(1, 2, 0).double().numpy()
        out.append(torch.from_numpy(recover_faithful_reference(dropped, m.numpy().astype(float), ws, **kwargs)))
    return torch.stack(out).permute(0, 3, 1, 2)


def test_dct_matrix_is_the_orthonormal_dct_ii() -> None:
    block = np.random.default_rng(0).random((8, 8))
    d = dct_matrix(8).numpy()
    assert np.allclose(d @ block @ d.T, scipy.fft.dctn(block, norm="ortho"), atol=1e-12)
    assert np.allclose(d @ d.T, np.eye(8), atol=1e-12)


@pytest.mark.parametrize(("ws", "rate", "max_iters"), [(4, 0.1, 100), (8, 0.1, 100), (8, 0.25, 4)])
def test_faithful_matches_a_line_by_line_port_of_the_authors_code(ws: int, rate: float, max_iters: int) -> None:
    # Bit-level agreement holds until the step sizes have been cut a few times: then the finite
    # differences divide rounding noise by a tiny delta and trajectories part (as they would between
    # cv2's and scipy's DCT). At rate 0.1 these images stay within rounding for the whole run.
    x = smooth_images(2, 3, 16, 16, seed=1)
    mask = drop_mask(2, 16, 16, ws, rate, torch.Generator().manual_seed(2))
    ours = recover_faithful(x, mask, ws, max_iters=max_iters)
    assert (ours - authors_port(x, mask, ws, max_iters=max_iters)).abs().max() < 1e-9


def test_faithful_reaches_the_same_quality_as_the_port_where_runs_part() -> None:
    x = smooth_images(2, 3, 16, 16, seed=1)
    mask = drop_mask(2, 16, 16, 8, 0.25, torch.Generator().manual_seed(2))
    ours = recover_faithful(x, mask, 8)
    ref = authors_port(x, mask, 8)  # at rate 0.25 single runs part after a few step-size cuts
    assert abs(float(psnr(ours, x).mean() - psnr(ref, x).mean())) < 0.05


def test_recovery_keeps_kept_pixels_and_starts_dropped_at_zero() -> None:
    x = smooth_images(3, 3, 20, 20)
    mask = drop_mask(3, 20, 20, 8, 0.25, torch.Generator().manual_seed(0))
    keep = ~mask[:, None].expand_as(x)
    start = recover_faithful(x, mask, 8, max_iters=0)
    assert torch.equal(start[keep], x[keep].double()) and not start[~keep].any()
    for out in (recover_faithful(x, mask, 8), recover_fast(x, mask, 8)):
        assert torch.equal(out[keep].float(), x[keep])
        assert out.min() >= 0 and out.max() <= 1
        assert (psnr(out, x) > psnr(x * ~mask[:, None], x) + 10).all()


def test_recovery_rejects_masks_it_cannot_use() -> None:
    x = smooth_images(2, 3, 20, 20)
    outside = torch.zeros(2, 20, 20, dtype=torch.bool)
    outside[:, 18, 18] = True  # 20 = 2 * 8 + 4: row 18 is outside the full windows
    with pytest.raises(ValueError, match="outside"):
        recover_fast(x, outside, 8)
    with pytest.raises(ValueError, match="mask"):
        recover_faithful(x, torch.zeros(3, 20, 20, dtype=torch.bool), 8)
    with pytest.raises(ValueError, match="iters"):
        recover_fast(x[..., :16, :16], outside[:, :16, :16].clone(), 8, iters=0)


@pytest.mark.parametrize(("ws", "rate"), [(8, 0.1), (4, 0.1)])
def test_fast_recovery_is_at_least_as_good_as_faithful_on_gtsrb(
    gtsrb_images: torch.Tensor, ws: int, rate: float
) -> None:
    x = gtsrb_images
    mask = drop_mask(len(x), 32, 32, ws, rate, torch.Generator().manual_seed(0))
    faithful = psnr(recover_faithful(x, mask, ws), x).mean()
    fast = psnr(recover_fast(x, mask, ws), x).mean()
    assert fast >= faithful - 0.5, f"fast {fast:.2f} dB vs faithful {faithful:.2f} dB"


def test_wavelet_denoising_matches_skimage() -> None:
    restoration = pytest.importorskip("skimage.restoration")
    # Modern skimage spells skimage 0.16's `multichannel=True` as `channel_axis=-1`; `rescale_sigma`
    # only rescales a user-given sigma (or an integer image), so with sigma=None on floats it is moot.
    x = smooth_images(3, 3, 32, 32, seed=3)
    ours = bayes_shrink_denoise(x.double()).numpy()
    for i in range(3):
        ref = restoration.denoise_wavelet(
            x[i].double().permute(1, 2, 0).numpy(),
            channel_axis=-1,
            convert2ycbcr=True,
            method="BayesShrink",
            mode="soft",
            rescale_sigma=True,
        )
        assert np.abs(ours[i].transpose(1, 2, 0) - ref).max() < 1e-9
    grey = smooth_images(2, 1, 27, 33, seed=4).double()  # odd sizes: symmetric padding, cropped back
    ours = bayes_shrink_denoise(grey).numpy()
    for i in range(2):
        ref = restoration.denoise_wavelet(grey[i, 0].numpy(), method="BayesShrink", mode="soft")
        assert np.abs(ours[i, 0] - ref).max() < 1e-9


def test_wavelet_denoising_removes_noise_and_handles_flat_images() -> None:
    clean = smooth_images(4, 3, 32, 32, seed=5)
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert (psnr(bayes_shrink_denoise(noisy), clean) > psnr(noisy, clean)).all()
    flat = torch.full((1, 3, 16, 16), 0.25)
    out = bayes_shrink_denoise(flat)  # skimage 0.16 returns NaN here; we return the image
    assert torch.isfinite(out).all() and torch.allclose(out, flat, atol=1e-6)
    assert bayes_shrink_denoise(clean).dtype == torch.float32


def test_superiot_drop_restore_and_edge_path() -> None:
    x = smooth_images(4, 3, 32, 32, seed=6)
    defense = SuperIoT(ws=8, rate=0.1)
    a = defense(x, torch.Generator().manual_seed(1))
    b = defense(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    dropped, mask = defense.drop(x, torch.Generator().manual_seed(1))
    assert torch.equal(defense.forward(dropped, mask=mask), a)
    assert defense.real_rate(32, 32) == 6 / 64
    # the edge receives bytes: decode, then recover and denoise
    frame = (x[0] * 255).round().to(torch.uint8)
    pixels, m = decode(encode(frame, mask[0], ws=8, rate=0.1))
    restored = defense.restore(torch.from_numpy(pixels)[None].float() / 255, torch.from_numpy(m))
    assert psnr(restored, x[:1]).item() > 25
    assert torch.equal(defense.estimate_forward(x), x)


def test_superiot_eot_samples_and_modes() -> None:
    x = smooth_images(2, 3, 16, 16, seed=7)
    samples = SuperIoT(ws=4, rate=0.25, denoise=None).eot_samples(x, 3, torch.Generator().manual_seed(0))
    assert samples.shape == (3, 2, 3, 16, 16)
    assert not torch.equal(samples[0], samples[1])  # independent drops
    faithful = SuperIoT(ws=4, rate=0.25, recovery="faithful", denoise=None)
    assert faithful(x, torch.Generator().manual_seed(0)).shape == x.shape
    assert SuperIoT().params() == {
        "name": "superiot",
        "ws": 8,
        "rate": 0.1,
        "recovery": "fast",
        "denoise": "bayes_shrink",
    }


@pytest.mark.parametrize(
    "kwargs", [{"ws": 0}, {"rate": 1.5}, {"recovery": "ista"}, {"denoise": "nl_means"}, {"ws": 2.0}]
)
def test_superiot_rejects_bad_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SuperIoT(**kwargs)  # type: ignore[arg-type]


def test_superiot_needs_a_generator_or_a_mask() -> None:
    x = smooth_images(1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"(?i)generator"):
        SuperIoT()(x)
    with pytest.raises(ValueError, match=r"(?i)generator"):
        SuperIoT().forward(x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SuperIoT()(x * 2, torch.Generator())
