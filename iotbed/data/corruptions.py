"""Camera conditions: the CIFAR-10-C corruptions whose five severities Hendrycks and Dietterich published
(`make_cifar_c.py`), on batches of images (N, C, H, W) in [0, 1].

    gaussian_noise  x + N(0, s^2)                         s = .04 .06 .08 .09 .10
    brightness      HSV value + b (hue and saturation kept) b = .05 .10 .15 .20 .30
    contrast        (x - channel mean) * c + channel mean  c = .75 .50 .40 .30 .15
    jpeg            a JPEG round trip at quality q         q = 80 65 58 50 40
    pixelate        box-down to a fraction f, box-up       f = .95 .90 .85 .75 .65
    fog             x + a * plasma(decay d), rescaled      (a, d) = (.2, 3) (.5, 3) (.75, 2.5) (1, 2) (1.5, 1.75)

Outputs are clipped to [0, 1], keep the shape, and depend only on the generator (fog and noise draw from it).
Fog's plasma fractal is the diamond-square map `make_cifar_c.py` uses, on the smallest power-of-two square
that covers the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from iotbed.defenses.baselines import JpegCompression

SEVERITIES = range(1, 6)
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
JPEG_QUALITY = (80, 65, 58, 50, 40)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    sigma = GAUSSIAN_NOISE[severity - 1]
    return (x + torch.randn(x.shape, generator=generator) * sigma).clamp(0, 1)


def brightness(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    # Raising HSV's value V = max over channels, hue and saturation kept, scales every channel by (V + b) / V.
    value = x.amax(dim=1, keepdim=True)
    raised = (value + BRIGHTNESS[severity - 1]).clamp(max=1.0)
    scaled = torch.where(value > 0, x * raised / value.clamp(min=1e-12), raised.expand_as(x))
    return scaled.clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * CONTRAST[severity - 1] + means).clamp(0, 1)


def jpeg(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    return JpegCompression(quality=JPEG_QUALITY[severity - 1]).forward(x)


def pixelate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    small = (max(1, int(w * PIXELATE[severity - 1])), max(1, int(h * PIXELATE[severity - 1])))
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty_like(pixels)
    for i, img in enumerate(pixels):
        image = Image.fromarray(img[..., 0] if c == 1 else img)
        back = np.asarray(image.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX))
        out[i] = back[..., None] if c == 1 else back
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) diamond-square height map in [0, 1]; `size` a power of two. Each halving of the step
    divides the random displacement by `decay`: a larger decay gives smoother fog."""
    maparray = np.zeros((size, size), dtype=np.float64)
    step, scale = size, 100.0

    def wibble(shape: tuple[int, ...]) -> np.ndarray:
        return rng.uniform(-scale, scale, shape)

    while step >= 2:
        half = step // 2
        # Squares: each centre gets the mean of its four corners (the map wraps around).
        corners = maparray[0:size:step, 0:size:step]
        total = corners + np.roll(corners, -1, axis=0)
        total = total + np.roll(total, -1, axis=1)
        maparray[half:size:step, half:size:step] = total / 4 + wibble(total.shape)
        # Diamonds: each edge midpoint gets the mean of its two corners and the two centres beside it.
        corners = maparray[0:size:step, 0:size:step]
        centres = maparray[half:size:step, half:size:step]
        down = (corners + np.roll(corners, -1, axis=0) + centres + np.roll(centres, 1, axis=1)) / 4
        right = (corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=0)) / 4
        maparray[half:size:step, 0:size:step] = down + wibble(down.shape)
        maparray[0:size:step, half:size:step] = right + wibble(right.shape)
        step, scale = half, scale / decay
    maparray -= maparray.min()
    top = maparray.max()
    return maparray / top if top > 0 else maparray


def fog(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    amount, decay = FOG[severity - 1]
    n, _, h, w = x.shape
    size = 1 << max(1, math.ceil(math.log2(max(h, w))))
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    plasma = np.stack([plasma_fractal(size, decay, rng)[:h, :w] for _ in range(n)])
    top = x.amax(dim=(1, 2, 3), keepdim=True)
    fogged = x + amount * torch.from_numpy(plasma).float()[:, None]
    return (fogged * top / (top + amount)).clamp(0, 1)


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "brightness": brightness,
    "contrast": contrast,
    "jpeg": jpeg,
    "pixelate": pixelate,
    "fog": fog,
}


def corrupt(x: torch.Tensor, kind: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """`x` (N, C, H, W) in [0, 1] as a camera sees it under `kind` at `severity` (1 to 5)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown camera condition {kind!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1 to 5, got {severity}")
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    return CORRUPTIONS[kind](x.float(), severity, generator)
