"""Camera conditions on batches of images (N, C, H, W) in [0, 1], each at five severities.

The CIFAR-10-C corruptions keep the constants Hendrycks and Dietterich published (`make_cifar_c.py` in
hendrycks/robustness, ImageNet-C/create_c), the geometric ones MNIST-C's (`corruptions.py` in
google-research/mnist-c, Mu and Gilmer 2019), whose code has five severities for each although its static
data set uses one. Rain and dark have no published constants: theirs are iotbed's own.

    kind            what                                        severities 1 .. 5                     source
    gaussian_noise  x + N(0, s^2)                               s = .04 .06 .08 .09 .10               CIFAR-10-C
    shot_noise      Poisson(x * c) / c                          c = 500 250 100 75 50                 CIFAR-10-C
    impulse_noise   a share a of the values set to 0 or 1       a = .01 .02 .03 .05 .07               CIFAR-10-C
    defocus_blur    disk of radius r, antialiased by a 3x3      (r, a) = (.3, .4) (.4, .5) (.5, .6)   CIFAR-10-C
                    Gaussian of sigma a                                  (1, .2) (1.5, .1)
    gaussian_blur   Gaussian of sigma s (cut at 4 s)            s = .4 .6 .7 .8 1                     CIFAR-10-C
    motion_blur     one-sided line of half-Gaussian weights,    (r, s) = (6, 1) (6, 1.5) (6, 2)       CIFAR-10-C
                    radius r, sigma s, angle U(-45, 45) deg              (8, 2) (9, 2.5)
    brightness      HSV value + b (hue and saturation kept)     b = .05 .10 .15 .20 .30               CIFAR-10-C
    contrast        (x - channel mean) * c + channel mean       c = .75 .50 .40 .30 .15               CIFAR-10-C
    jpeg            a JPEG round trip at quality q              q = 80 65 58 50 40                    CIFAR-10-C
    pixelate        box-down to a fraction f, box-up            f = .95 .90 .85 .75 .65               CIFAR-10-C
    fog             x + a * plasma(decay d), rescaled           (a, d) = (.2, 3) (.5, 3) (.75, 2.5)   CIFAR-10-C
                                                                         (1, 2) (1.5, 1.75)
    rotate          by a radians, the sign at random            a = .2 .4 .6 .8 1                     MNIST-C
    shear           by a shear angle of a radians, sign random  a = .2 .4 .6 .8 1                     MNIST-C
    scale           shrunk about the centre by 1 / f            f = 1/.9 1/.8 1/.7 1/.6 1/.5          MNIST-C
    translate       d pixels along x and y, signs at random     d = 1 2 3 4 5                         MNIST-C
    rain            streaks from drops of density p per pixel,  (p, l, o) = (.005, 4, .5) (.01, 6, .6) iotbed
                    l px long, opacity o, slant U(-20, 20) deg             (.02, 8, .7) (.03, 10, .8)
                                                                           (.04, 12, .9)
    dark            HSV value * v (hue and saturation kept)     v = .6 .45 .3 .2 .1                   iotbed

How iotbed applies them where the sources used other tools:

- Lengths in pixels (the blurs, rain) are the published ones for images up to 32 px a side (CIFAR-10 is 32);
  a larger frame scales them by side / 32, so a severity blurs the same share of the frame. Translation
  likewise is MNIST-C's in pixels up to 28 px (MNIST's side) and scaled by side / 28 above.
- motion_blur: CIFAR-10-C calls ImageMagick's MotionBlurImage, which is not here. The same kernel is built
  directly: width 2 * ceil(r) + 1, weight exp(-i^2 / (2 s^2)) at step i = 0 .. width - 1 along the angle,
  steps rounded to whole pixels, edge pixels repeated past the border, as ImageMagick does.
- defocus_blur and gaussian_blur: the disk and Gaussian kernels of `make_cifar_c.py` (OpenCV's 3x3 Gaussian
  for the antialiasing; borders mirrored for the disk as OpenCV's filter2D, repeated for the Gaussian as
  skimage's `gaussian`).
- impulse_noise: skimage's `random_noise(mode="s&p")`: each value (each channel of each pixel) is hit with
  probability a, then set to 1 or 0 with even odds.
- rotate, shear, scale, translate: skimage's `warp` with MNIST-C's inverse maps about the image centre,
  bilinear, black outside the image. Shear is `AffineTransform(shear=a)` as skimage defined it when MNIST-C
  was written (later versions changed it): output pixel (x, y) reads (x - sin(a) y, cos(a) y) about the centre. Each image draws its
  own sign (rotate, shear) or signs (translate, one per axis), as MNIST-C draws per image.
- rain (iotbed's): drops fall on each pixel with probability p (also above and beside the frame, so streaks
  enter it), each drawn as a streak of l pixels down from it at the image's slant, blended toward white with
  opacity o.
- dark (iotbed's): a night scene, all channels scaled by v (which scales HSV's value and keeps hue and
  saturation).
- fog: the plasma fractal is the diamond-square map `make_cifar_c.py` uses, on the smallest power-of-two
  square that covers the image.

Outputs are clipped to [0, 1], keep the shape, and depend only on the input and the generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from iotbed.defenses.baselines import JpegCompression

SEVERITIES = range(1, 6)
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE = (500, 250, 100, 75, 50)
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
MOTION_BLUR = ((6.0, 1.0), (6.0, 1.5), (6.0, 2.0), (8.0, 2.0), (9.0, 2.5))
MOTION_ANGLE_DEG = 45.0
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
JPEG_QUALITY = (80, 65, 58, 50, 40)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))
ROTATE = (0.2, 0.4, 0.6, 0.8, 1.0)
SHEAR = (0.2, 0.4, 0.6, 0.8, 1.0)
SCALE = (1 / 0.9, 1 / 0.8, 1 / 0.7, 1 / 0.6, 1 / 0.5)
TRANSLATE = (1, 2, 3, 4, 5)
RAIN = ((0.005, 4, 0.5), (0.01, 6, 0.6), (0.02, 8, 0.7), (0.03, 10, 0.8), (0.04, 12, 0.9))
RAIN_SLANT_DEG = 20.0
DARK = (0.6, 0.45, 0.3, 0.2, 0.1)

CIFAR_SIDE = 32  # the side the CIFAR-10-C pixel lengths are for
MNIST_SIDE = 28  # the side MNIST-C's translations are for


def length_scale(x: torch.Tensor, published_side: int) -> float:
    """How much a published length in pixels grows on this frame: 1 up to `published_side`."""
    return max(1.0, max(x.shape[-2:]) / published_side)


# --- noise ------------------------------------------------------------------------------------------------


def gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    sigma = GAUSSIAN_NOISE[severity - 1]
    return (x + torch.randn(x.shape, generator=generator) * sigma).clamp(0, 1)


def shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    photons = SHOT_NOISE[severity - 1]
    return (torch.poisson(x.clamp(0, 1) * photons, generator=generator) / photons).clamp(0, 1)


def impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    hit = torch.rand(x.shape, generator=generator) < IMPULSE_NOISE[severity - 1]
    salt = torch.rand(x.shape, generator=generator) < 0.5
    return torch.where(hit, salt.float(), x).clamp(0, 1)


# --- blur -------------------------------------------------------------------------------------------------


def gaussian_taps(sigma: float, radius: int) -> np.ndarray:
    """Normalised weights of a Gaussian at offsets -radius .. radius."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def filter_channels(x: torch.Tensor, kernel: np.ndarray, border: str) -> torch.Tensor:
    """Every channel of every image correlated with the 2-D `kernel`; `border` is scipy.ndimage's mode
    (mirror: OpenCV's default reflection without the edge pixel, nearest: the edge pixel repeated)."""
    weights = np.asarray(kernel, dtype=np.float32)[None, None]
    return torch.from_numpy(ndimage.correlate(x.numpy(), weights, mode=border))


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """`make_cifar_c.py`'s defocus kernel: the pixels within `radius` of the centre, equal weights, smoothed
    by OpenCV's Gaussian of sigma `alias_blur` (3x3 up to radius 8, 5x5 above); zero rows and columns cut."""
    half = max(8, math.ceil(radius))
    offsets = np.arange(-half, half + 1)
    xs, ys = np.meshgrid(offsets, offsets)
    disk = (xs**2 + ys**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = gaussian_taps(alias_blur, 1 if radius <= 8 else 2)
    smooth = np.apply_along_axis(np.convolve, 0, disk, taps, mode="same")
    smooth = np.apply_along_axis(np.convolve, 1, smooth, taps, mode="same")
    rows, cols = np.nonzero(smooth > 0)
    cut = max(abs(rows - half).max(), abs(cols - half).max())
    return smooth[half - cut : half + cut + 1, half - cut : half + cut + 1]


def defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    radius, alias_blur = DEFOCUS_BLUR[severity - 1]
    kernel = disk_kernel(radius * length_scale(x, CIFAR_SIDE), alias_blur)
    return filter_channels(x, kernel, "mirror").clamp(0, 1)


def gaussian_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    # skimage's `gaussian` as make_cifar_c.py calls it: scipy's filter, truncated at 4 sigma, edges repeated.
    sigma = GAUSSIAN_BLUR[severity - 1] * length_scale(x, CIFAR_SIDE)
    blurred = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
    return torch.from_numpy(blurred).clamp(0, 1)


def along_lines(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, weights: torch.Tensor, border: str
) -> torch.Tensor:
    """out[n, :, i, j] = sum over steps k of weights[k] * x[n, :, i + dy[n, k], j + dx[n, k]]: each image
    filtered along its own line of whole-pixel steps (dy, dx: (N, steps)). Outside the image `border` is
    scipy.ndimage's mode: nearest repeats the edge, constant reads zeros. Images with the same steps share one
    sparse kernel (scipy visits only its non-zero taps)."""
    pixels = x.numpy()
    out = np.empty_like(pixels)
    patterns, group_of = torch.unique(torch.cat([dy, dx], dim=1), dim=0, return_inverse=True)
    order = torch.argsort(group_of, stable=True)
    bounds = torch.searchsorted(group_of[order], torch.arange(len(patterns) + 1)).tolist()
    steps = dy.shape[1]
    for g, pattern in enumerate(patterns.numpy()):
        members = order[bounds[g] : bounds[g + 1]].numpy()
        reach = int(np.abs(pattern).max())
        kernel = np.zeros((2 * reach + 1, 2 * reach + 1), dtype=np.float32)
        np.add.at(kernel, (reach + pattern[:steps], reach + pattern[steps:]), weights.numpy())  # steps may coincide
        out[members] = ndimage.correlate(pixels[members], kernel[None, None], mode=border, cval=0.0)
    return torch.from_numpy(out)


def line_steps(angles: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-pixel (dy, dx) of steps 0 .. steps - 1 along each angle (radians, 0 = to the right, y down),
    halves rounded down as ImageMagick's MotionBlurImage does: two (N, steps) tensors."""
    i = torch.arange(steps, dtype=torch.float64)[None, :]
    dy = torch.ceil(i * torch.sin(angles.double())[:, None] - 0.5).long()
    dx = torch.ceil(i * torch.cos(angles.double())[:, None] - 0.5).long()
    return dy, dx


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def motion_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    radius, sigma = (v * length_scale(x, CIFAR_SIDE) for v in MOTION_BLUR[severity - 1])
    width = 2 * math.ceil(radius) + 1
    weights = torch.from_numpy(np.exp(-(np.arange(width) ** 2) / (2 * sigma**2)))
    angles = torch.deg2rad(uniform(len(x), -MOTION_ANGLE_DEG, MOTION_ANGLE_DEG, generator))
    dy, dx = line_steps(angles, width)
    return along_lines(x, dy, dx, weights / weights.sum(), "nearest").clamp(0, 1)


# --- light and colour -------------------------------------------------------------------------------------


def brightness(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    # Raising HSV's value V = max over channels, hue and saturation kept, scales every channel by (V + b) / V.
    value = x.amax(dim=1, keepdim=True)
    raised = (value + BRIGHTNESS[severity - 1]).clamp(max=1.0)
    scaled = torch.where(value > 0, x * raised / value.clamp(min=1e-12), raised.expand_as(x))
    return scaled.clamp(0, 1)


def dark(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    # Scaling every channel by v scales V = max over channels by v and keeps hue and saturation.
    return (x * DARK[severity - 1]).clamp(0, 1)


def contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return ((x - means) * CONTRAST[severity - 1] + means).clamp(0, 1)


# --- compression and resolution ---------------------------------------------------------------------------


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


# --- weather ----------------------------------------------------------------------------------------------


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


def rain(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    density, length, opacity = RAIN[severity - 1]
    steps = max(1, round(length * length_scale(x, CIFAR_SIDE)))
    n, _, h, w = x.shape
    # Drops fall on a canvas wider than the frame and reaching above it, so streaks also enter from outside.
    drops = (torch.rand((n, 1, h + steps, w + 2 * steps), generator=generator) < density).float()
    # A streak runs down from its drop, slanted from the vertical (90 deg is straight down): a pixel is on it
    # when a drop sits 0 to steps - 1 pixels back up the line.
    slant = uniform(n, -RAIN_SLANT_DEG, RAIN_SLANT_DEG, generator)
    dy, dx = line_steps(torch.deg2rad(90.0 + slant), steps)
    streaks = along_lines(drops, -dy, -dx, torch.ones(steps), "constant")[:, :, steps:, steps : steps + w]
    cover = opacity * streaks.clamp(max=1.0)
    return (x * (1 - cover) + cover).clamp(0, 1)


# --- geometry ---------------------------------------------------------------------------------------------


def random_signs(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).double() * 2 - 1


WARP_CHUNK = 4096  # images per sampling grid: a grid is 16 bytes a pixel


def warp(x: torch.Tensor, source: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """skimage's `warp` with an inverse map about the centre: output pixel p = (col, row) reads the input at
    centre + source[n] @ (p - centre) + shift[n], bilinear, black outside. `source` (N, 2, 2) float64, `shift`
    (N, 2) in (col, row) pixels."""
    n, _, h, w = x.shape
    shift = torch.zeros((n, 2), dtype=torch.float64) if shift is None else shift
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    out_xy = torch.stack([cols, rows], dim=-1).reshape(-1, 2) - centre  # (H*W, 2)
    # grid_sample with align_corners=True puts -1 and 1 on the centres of the first and last pixels.
    to_grid = 2 / torch.tensor([max(w - 1, 1), max(h - 1, 1)], dtype=torch.float64)
    out = torch.empty_like(x)
    for lo in range(0, n, WARP_CHUNK):
        part = slice(lo, lo + WARP_CHUNK)
        src = torch.einsum("nij,pj->npi", source[part], out_xy) + centre + shift[part, None, :]
        grid = (src * to_grid - 1).reshape(-1, h, w, 2).float()
        out[part] = F.grid_sample(x[part], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.clamp(0, 1)


def rotate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    angle = ROTATE[severity - 1] * random_signs((len(x),), generator)
    cos, sin = torch.cos(angle), torch.sin(angle)
    source = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return warp(x, source)


def shear(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    angle = SHEAR[severity - 1] * random_signs((len(x),), generator)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    source = torch.stack([torch.stack([one, -torch.sin(angle)], -1), torch.stack([zero, torch.cos(angle)], -1)], -2)
    return warp(x, source)


def scale(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    source = SCALE[severity - 1] * torch.eye(2, dtype=torch.float64).expand(len(x), 2, 2)
    return warp(x, source)


def translate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    shift = TRANSLATE[severity - 1] * length_scale(x, MNIST_SIDE) * random_signs((len(x), 2), generator)
    return warp(x, torch.eye(2, dtype=torch.float64).expand(len(x), 2, 2), shift)


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "brightness": brightness,
    "contrast": contrast,
    "jpeg": jpeg,
    "pixelate": pixelate,
    "fog": fog,
    "rain": rain,
    "dark": dark,
    "rotate": rotate,
    "shear": shear,
    "scale": scale,
    "translate": translate,
}
SOURCES: dict[str, str] = {
    **dict.fromkeys(
        (
            "gaussian_noise",
            "shot_noise",
            "impulse_noise",
            "defocus_blur",
            "gaussian_blur",
            "motion_blur",
            "brightness",
            "contrast",
            "jpeg",
            "pixelate",
            "fog",
        ),
        "CIFAR-10-C",
    ),
    **dict.fromkeys(("rotate", "shear", "scale", "translate"), "MNIST-C"),
    **dict.fromkeys(("rain", "dark"), "iotbed"),
}
"""Where each kind's five severities come from."""
RANDOM_KINDS = frozenset(
    {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog", "rain", "rotate", "shear", "translate"}
)
"""The kinds that draw from the generator: another generator state gives other images."""


def corrupt(x: torch.Tensor, kind: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """`x` (N, C, H, W) in [0, 1] as a camera sees it under `kind` at `severity` (1 to 5)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown camera condition {kind!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1 to 5, got {severity}")
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if len(x) == 0:
        return x.float().clone()
    return CORRUPTIONS[kind](x.float(), severity, generator)
