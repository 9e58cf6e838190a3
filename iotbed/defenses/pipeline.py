"""The defenses an edge server runs before its model, built from the scenario, as one preprocessor.

`DefenseChain` applies its stages in order. A SUPER-IoT stage recovers frames that arrive pixel-dropped
with their own masks and drops whole frames itself first; every other stage sees whole images. The
chain is a `Preprocessor`, so `DefendedModel(chain, model)` is what adaptive attacks (BPDA, EOT) craft
against: its estimate is the composition of the stages' estimates (the identity for all of them).

`flops_per_image` is the compute the simulated edge charges for the chain. The figures are operation
counts of the algorithms as implemented here (multiply-adds counted as 2), not timings, so they scale
with the device profile like the model's FLOPs do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from iotbed.codecs.pixel_drop import drop_count
from iotbed.defenses.base import Preprocessor
from iotbed.defenses.baselines import FeatureSqueezing, JpegCompression, MedianSmoothing, PixelDeflection
from iotbed.defenses.superiot import FAITHFUL_MAX_ITERS, FAST_ITERS, SuperIoT

# Operations per pixel and channel of the non-recovery stages (see the module docstring).
WAVELET_OPS_PER_PIXEL = 40.0  # two Haar levels forward and back, the MAD of the finest band, YCbCr both ways
JPEG_OPS_PER_PIXEL = 70.0  # colour transform, 8x8 DCT and inverse (separable), quantisation, Huffman coding


def _denoise(name: str) -> str | None:
    return None if name == "none" else name


def build_stage(spec: Any, *, drop_window: int | None = None, drop_rate: float | None = None) -> Preprocessor:
    """One stage from its scenario entry. `drop_window`/`drop_rate` override a SUPER-IoT stage's own drop
    with the camera codec's, for crafting against what the camera really does."""
    kind = spec.kind
    if kind == "superiot":
        return SuperIoT(
            ws=drop_window or spec.window,
            rate=spec.rate if drop_rate is None else drop_rate,
            recovery=spec.recovery,
            denoise=_denoise(spec.denoise),
        )
    if kind == "jpeg":
        return JpegCompression(quality=spec.quality)
    if kind == "feature_squeezing":
        return FeatureSqueezing(bit_depth=spec.bit_depth, median_window=spec.median_window)
    if kind == "median_smoothing":
        return MedianSmoothing(window=spec.window)
    if kind == "pixel_deflection":
        return PixelDeflection(window=spec.window, rate=spec.rate, denoise=_denoise(spec.denoise))
    raise ValueError(f"unknown defense kind {kind!r}")


@dataclass(frozen=True)
class DefenseChain(Preprocessor):
    """Stages applied in order; `forward(x, generator, masks=...)` takes per-image drop masks for frames
    that arrived pixel-dropped (`masks` (N, H, W), `dropped` (N,) saying which images have one)."""

    name: ClassVar[str] = "chain"
    stages: tuple[Preprocessor, ...] = ()

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return any(stage.randomized for stage in self.stages)

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        masks: torch.Tensor | None = None,
        dropped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for stage in self.stages:
            if isinstance(stage, SuperIoT):
                x = self._superiot(stage, x, generator, masks, dropped)
            else:
                x = stage(x, generator)
        return x

    @staticmethod
    def _superiot(
        stage: SuperIoT,
        x: torch.Tensor,
        generator: torch.Generator | None,
        masks: torch.Tensor | None,
        dropped: torch.Tensor | None,
    ) -> torch.Tensor:
        if masks is None or dropped is None or not bool(dropped.any()):
            return stage(x, generator)
        if bool(dropped.all()):
            return stage.restore(x, masks)
        out = x.clone()
        out[dropped] = stage.restore(x[dropped], masks[dropped])
        out[~dropped] = stage(x[~dropped], generator)
        return out

    def estimate_forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage.estimate_forward(x)
        return x

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "stages": [stage.params() for stage in self.stages]}

    def flops_per_image(self, shape: tuple[int, int, int]) -> float:
        return sum(stage_flops(stage, shape) for stage in self.stages)


def stage_flops(stage: Preprocessor, shape: tuple[int, int, int]) -> float:
    """Operations one image costs in `stage` (see the module docstring for what is counted)."""
    c, h, w = shape
    pixels = float(c * h * w)
    wavelet = WAVELET_OPS_PER_PIXEL * pixels
    if isinstance(stage, SuperIoT):
        blocks = (h // stage.ws) * (w // stage.ws) * c
        n = stage.ws * stage.ws
        if stage.recovery == "fast":
            # per FISTA step two (n x n) GEMMs per block (the block DCT and its inverse) plus O(n) updates
            recovery = FAST_ITERS * blocks * (4.0 * n * n + 10.0 * n)
        else:
            # per iteration and dropped pixel, two block DCTs (separable: 4 ws^3 each); iterations at their cap
            recovery = FAITHFUL_MAX_ITERS * blocks * drop_count(stage.ws, stage.rate) * 2 * 4.0 * stage.ws**3
        return recovery + (wavelet if stage.denoise else 0.0)
    if isinstance(stage, JpegCompression):
        return JPEG_OPS_PER_PIXEL * pixels
    if isinstance(stage, FeatureSqueezing):
        window = stage.median_window or 0
        return pixels * (2.0 + window * window * math.log2(max(window * window, 2)))
    if isinstance(stage, MedianSmoothing):
        return pixels * stage.window * stage.window * math.log2(max(stage.window * stage.window, 2))
    if isinstance(stage, PixelDeflection):
        return 10.0 * stage.deflections(h, w) * c + (wavelet if stage.denoise else 0.0)
    return 0.0


def build_chain(
    specs: Sequence[Any], *, drop_window: int | None = None, drop_rate: float | None = None
) -> DefenseChain:
    return DefenseChain(tuple(build_stage(s, drop_window=drop_window, drop_rate=drop_rate) for s in specs))
