"""Classic input-transform defenses, as baselines for SUPER-IoT: JPEG compression, feature squeezing,
median smoothing, and pixel deflection + BayesShrink wavelet denoising (the SUPER-IoT authors' baseline).

All take and return batches (N, C, H, W) in [0, 1] and keep the default BPDA surrogate (identity) for
adaptive attacks: each is close to the identity on natural images, which is what BPDA needs.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
from PIL import Image

from iotbed.defenses.base import Preprocessor
from iotbed.defenses.superiot import bayes_shrink_denoise, denoise_from_spec, wavelet_flops


def _check_positive_int(value: object, what: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be a whole number >= {minimum}, got {value!r}")


def median_filter(x: torch.Tensor, window: int) -> torch.Tensor:
    """Per-channel window x window median of a batch, equal to scipy.ndimage.median_filter(x,
    size=(1, 1, window, window), mode='reflect'): symmetric padding, the window anchored like
    scipy's (for even sizes one more row/column before the pixel than after) and, for even windows,
    the upper of the two middle values (scipy's rank window**2 // 2)."""
    _check_positive_int(window, "median window")
    if window == 1:
        return x.clone()
    h, w = x.shape[-2:]
    before, after = window // 2, window - 1 - window // 2
    rows = torch.from_numpy(np.pad(np.arange(h), (before, after), mode="symmetric"))
    cols = torch.from_numpy(np.pad(np.arange(w), (before, after), mode="symmetric"))
    padded = x[..., rows, :][..., cols]
    patches = padded.unfold(-2, window, 1).unfold(-2, window, 1)  # (N, C, H, W, window, window)
    return patches.flatten(-2).kthvalue(window * window // 2 + 1, dim=-1).values


# Operations per pixel and channel of a JPEG round trip (see `Preprocessor.flops_per_image`).
JPEG_OPS_PER_PIXEL = 70.0  # colour transform, 8x8 DCT and inverse (separable), quantisation, Huffman coding


@dataclass(frozen=True)
class JpegCompression(Preprocessor):
    """JPEG round trip with Pillow at `quality` (1-95), as ART's JpegCompression; pixels are rounded to
    8 bits first. Grey (C = 1) and RGB (C = 3) only. One PIL call per image: JPEG has no batch API."""

    name: ClassVar[str] = "jpeg"
    kind: ClassVar[str] = "jpeg"
    quality: int = 75

    def __post_init__(self) -> None:
        _check_positive_int(self.quality, "JPEG quality")
        if self.quality > 95:
            raise ValueError(f"JPEG quality must be at most 95 (Pillow's useful range), got {self.quality}")

    @classmethod
    def from_spec(cls, spec: Any, *, drop_window: int | None = None, drop_rate: float | None = None) -> Self:
        return cls(quality=spec.quality)

    def flops_per_image(self, shape: tuple[int, int, int]) -> float:
        c, h, w = shape
        return JPEG_OPS_PER_PIXEL * float(c * h * w)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG needs 1 or 3 channels, got {x.shape[1]}")
        pixels = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        mode = "L" if x.shape[1] == 1 else "RGB"
        out = np.empty_like(pixels)
        for i, img in enumerate(pixels):
            buf = io.BytesIO()
            Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode).save(
                buf, format="JPEG", quality=self.quality
            )
            decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(mode))
            out[i] = decoded[..., None] if mode == "L" else decoded
        return torch.from_numpy(out).permute(0, 3, 1, 2).to(dtype=x.dtype, device=x.device) / 255


@dataclass(frozen=True)
class FeatureSqueezing(Preprocessor):
    """Xu et al.'s squeezers: bit-depth reduction to `bit_depth` bits, then a `median_window` median
    filter (None or 1 skips it). Defaults are their CIFAR-10 joint squeezer (5 bits, 2x2 median)."""

    name: ClassVar[str] = "feature_squeezing"
    kind: ClassVar[str] = "feature_squeezing"
    bit_depth: int = 5
    median_window: int | None = 2

    def __post_init__(self) -> None:
        _check_positive_int(self.bit_depth, "bit_depth")
        if self.bit_depth > 8:
            raise ValueError(f"bit_depth must be at most 8, got {self.bit_depth}")
        if self.median_window is not None:
            _check_positive_int(self.median_window, "median_window")

    @classmethod
    def from_spec(cls, spec: Any, *, drop_window: int | None = None, drop_rate: float | None = None) -> Self:
        return cls(bit_depth=spec.bit_depth, median_window=spec.median_window)

    def flops_per_image(self, shape: tuple[int, int, int]) -> float:
        # per value: 2 for the bit-depth rounding, then the median's sort of its window (w^2 log2 w^2)
        c, h, w = shape
        window = self.median_window or 0
        return float(c * h * w) * (2.0 + window * window * math.log2(max(window * window, 2)))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        levels = 2**self.bit_depth - 1
        out = torch.round(x * levels) / levels
        if self.median_window and self.median_window > 1:
            out = median_filter(out, self.median_window)
        return out


@dataclass(frozen=True)
class MedianSmoothing(Preprocessor):
    """Local median filter of `window` x `window` per channel (ART's SpatialSmoothing, window 3)."""

    name: ClassVar[str] = "median_smoothing"
    kind: ClassVar[str] = "median_smoothing"
    window: int = 3

    def __post_init__(self) -> None:
        _check_positive_int(self.window, "window")

    @classmethod
    def from_spec(cls, spec: Any, *, drop_window: int | None = None, drop_rate: float | None = None) -> Self:
        return cls(window=spec.window)

    def flops_per_image(self, shape: tuple[int, int, int]) -> float:
        # per value, a sort of its window (w^2 log2 w^2)
        c, h, w = shape
        return float(c * h * w) * self.window * self.window * math.log2(max(self.window * self.window, 2))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return median_filter(x, self.window)


@dataclass(frozen=True)
class PixelDeflection(Preprocessor):
    """Pixel deflection (Prakash et al. 2018) then BayesShrink wavelet denoising, as the SUPER-IoT
    authors' baseline: window 8, round(H * W * rate) deflections.

    As in the original code (without a class-activation map), each deflection picks, for every channel
    separately, a uniform target pixel and replaces it with the value of a uniform pixel within
    +-window rows and columns, the source kept strictly inside the image (rows and columns >= 1, the
    original's `x + a > 0` test). Deviation for batching: all deflections read the undeflected image,
    and when a target is drawn twice the later draw wins (the original copies one at a time, so a
    deflected pixel can be copied again; with ~10% of pixels deflected that touches ~1 in 10 draws).
    """

    name: ClassVar[str] = "pixel_deflection"
    kind: ClassVar[str] = "pixel_deflection"
    randomized: ClassVar[bool] = True
    window: int = 8
    rate: float = 0.05
    denoise: Literal["bayes_shrink"] | None = "bayes_shrink"

    def __post_init__(self) -> None:
        _check_positive_int(self.window, "window")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 <= self.rate <= 1:
            raise ValueError(f"rate must be a number in [0, 1], got {self.rate!r}")
        if self.denoise not in ("bayes_shrink", None):
            raise ValueError(f"denoise must be 'bayes_shrink' or None, got {self.denoise!r}")

    @classmethod
    def from_spec(cls, spec: Any, *, drop_window: int | None = None, drop_rate: float | None = None) -> Self:
        return cls(window=spec.window, rate=spec.rate, denoise=denoise_from_spec(spec.denoise))

    def deflections(self, height: int, width: int) -> int:
        return round(height * width * self.rate)

    def flops_per_image(self, shape: tuple[int, int, int]) -> float:
        # 10 per deflection and channel (drawing the target and source, clamping, the copy), then the denoising
        c, h, w = shape
        return 10.0 * self.deflections(h, w) * c + (wavelet_flops(shape) if self.denoise else 0.0)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        count = self.deflections(h, w)
        out = x.clone(memory_format=torch.contiguous_format)
        if count > 0 and h > 1 and w > 1 and n > 0:
            shape = (n, count, c)
            ty = torch.randint(0, h, shape, generator=generator)
            tx = torch.randint(0, w, shape, generator=generator)
            sy = _uniform_between((ty - self.window).clamp(min=1), (ty + self.window).clamp(max=h - 1), generator)
            sx = _uniform_between((tx - self.window).clamp(min=1), (tx + self.window).clamp(max=w - 1), generator)
            plane = (torch.arange(n)[:, None, None] * c + torch.arange(c)[None, None, :]).expand(shape) * (h * w)
            target = (plane + ty * w + tx).flatten()
            source = (plane + sy * w + sx).flatten()
            # later draws win: for each target keep the source of its last draw (draw order = flat order)
            unique, inverse = torch.unique(target, return_inverse=True)
            last = torch.full(unique.shape, -1, dtype=torch.long).scatter_reduce(
                0, inverse, torch.arange(target.numel()), reduce="amax"
            )
            flat = out.view(-1)
            flat[unique] = x.reshape(-1)[source[last]]
        return bayes_shrink_denoise(out) if self.denoise == "bayes_shrink" else out


def _uniform_between(lo: torch.Tensor, hi: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform integer in [lo, hi] (inclusive) per element: what rejection-sampling the offset gives."""
    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
    return lo + (u * (hi - lo + 1).to(torch.float64)).long().clamp(max=hi - lo)
