"""Defed (Xiao et al., "Defed: An Edge Feature Enhanced Image Denoised Network Against Adversarial Attacks for
Secure Internet of Things", IEEE IoT Journal 10(8), 2023): a denoiser ensemble that detects and corrects
adversarial frames.

Each denoiser D_L is a small U-Net (about 123k parameters) whose edge-feature-enhanced (EFE) blocks add a
Gaussian-blur branch and a Laplacian (or Sobel) edge branch to a plain conv branch. One denoiser is trained
per noise level L (0-255 scale) on clean images with Gaussian noise of std L/255, through the frozen
classifier f, with loss alpha * CE(f(D(x~)), y) + MSE(x, D(x~)) and Adam at lr 1e-3. At run time, for each
denoiser:

    score_L(x) = alpha * CE(f(clamp(D_L(x))), argmax f(x)) + mean over pixels of (x - clamp(D_L(x)))^2,

flagged where score_L(x) > mean + k * std of the scores of clean calibration images; a frame is flagged when
ANY denoiser flags it. A flagged frame is classified by the argmax of the summed softmax of f(D_L(x)) over the
denoisers that flagged it; an unflagged frame keeps the bare prediction f(x). BaseNet, the authors'
ablation, is the same encoder/decoder with plain 3x3 conv blocks in place of the EFE blocks and no skip
blocks.

Built from the authors' code (lyu-shuo/Defed, as summarised in the project's reference notes); what differs:

- Thresholds are fitted on a calibration split passed separately from the scored frames (the authors fit on
  the very benign set they then score). `fit_thresholds` may take labels to keep only correctly classified
  calibration images, as the authors' benign set does. `k_for_frr` is ours: the k that meets a target FRR on
  the calibration split.
- Training is seeded: one seed and the noise level fix the initialisation, the shuffling and the noise. The
  weights kept are the last epoch's, which is what the authors' defender loads ("bestloss" is the last
  epoch, a checkpointing bug). Their optional MultiStepLR at epochs 100/200 is left out (it never acts
  within their 10-epoch example).
- The blur, Laplacian and Sobel operators are written here with torch (the authors use kornia 0.5.6) with the
  same kernels and borders: 3x3 Gaussian with sigma 1 and reflected borders; the unnormalised Laplacian
  [[1,1,1],[1,-8,1],[1,1,1]] with reflected borders; the unnormalised Sobel magnitude sqrt(gx^2+gy^2+1e-6)
  with replicated borders.
- Noise levels are whole numbers in 0-255, as the authors' command line takes them; a level may be listed
  once (the authors' equal pairs (L, L) are the single-level ensemble [L]).
- Denoisers are cached as safetensors in `<cache dir>/defed/<key>.safetensors` with a JSON beside it, one per
  noise level, under a key over everything the weights depend on (the classifier's weights included, since
  the CE term trains through it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from iotbed.errors import ModelError
from iotbed.models.cache import cache_folder, read_json, write_json_atomic
from iotbed.models.flops import count_flops
from iotbed.models.training import LabeledImages

log = logging.getLogger(__name__)

EdgeMethod = Literal["laplacian", "sobel"]
Variant = Literal["defed", "basenet"]
EDGE_METHODS: tuple[str, ...] = ("laplacian", "sobel")
VARIANTS: tuple[str, ...] = ("defed", "basenet")

# Bump when a change here (network, training, file layout) makes old cache entries wrong.
DEFED_CACHE_VERSION = 1
FILE_FORMAT = "iotbed-defed-denoiser"
# The denoiser downsamples twice by 2, so frames must be a multiple of 4 pixels on each side.
SIDE_MULTIPLE = 4
SOBEL_EPS = 1e-6  # kornia's, inside the square root, so the gradient at a flat patch stays finite


class DefedError(ModelError, ValueError):
    """A Defed setting or input that cannot work (an unknown edge operator, a bad noise level, a frame size
    the denoiser cannot take, thresholds used before they are fitted)."""


# --- the network -------------------------------------------------------------------------------------------


def _gaussian_kernel(size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def _laplacian_kernel() -> torch.Tensor:
    k = torch.ones(3, 3)
    k[1, 1] = -8.0  # 1 - 3^2: kornia's unnormalised 3x3 Laplacian
    return k


def _sobel_kernels() -> torch.Tensor:
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return torch.stack([gx, gx.t()])


class FixedFilter(nn.Module):
    """Fixed 3x3 filters applied to each channel on its own (no weights to learn).

    `combine="sum"` for one kernel (blur, Laplacian); `"magnitude"` for the two Sobel kernels: the gradient
    magnitude sqrt(gx^2 + gy^2 + eps). The kernels are non-persistent buffers, so they stay out of the saved
    weights and the parameter count.
    """

    def __init__(self, kernels: torch.Tensor, border: Literal["reflect", "replicate"], combine: str) -> None:
        super().__init__()
        if kernels.ndim == 2:
            kernels = kernels[None]
        self.register_buffer("kernels", kernels[:, None].contiguous(), persistent=False)  # (K, 1, 3, 3)
        self.border = border
        self.combine = combine

    @property
    def taps(self) -> int:
        """Multiply-adds per output pixel and channel."""
        return int(self.kernels.shape[0] * self.kernels.shape[-1] * self.kernels.shape[-2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        padded = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode=self.border)
        out = F.conv2d(padded, self.kernels.to(x.dtype))  # (n*c, K, h, w)
        if self.combine == "magnitude":
            out = torch.sqrt((out * out).sum(dim=1, keepdim=True) + SOBEL_EPS)
        return out.reshape(n, c, h, w)


def gaussian_blur() -> FixedFilter:
    return FixedFilter(_gaussian_kernel(), "reflect", "sum")


def edge_operator(edge: str) -> FixedFilter:
    if edge == "laplacian":
        return FixedFilter(_laplacian_kernel(), "reflect", "sum")
    if edge == "sobel":
        return FixedFilter(_sobel_kernels(), "replicate", "magnitude")
    raise DefedError(f"unknown edge operator {edge!r}; use one of {', '.join(EDGE_METHODS)}")


def _conv_bn_prelu(
    c_in: int, c_out: int, kernel: int, stride: int, padding: int, *, transposed: bool = False
) -> nn.Sequential:
    conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    conv = conv_cls(c_in, c_out, kernel_size=kernel, stride=stride, padding=padding)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.PReLU())


class EFEBlock(nn.Module):
    """Edge-feature-enhanced block: conv-BN-PReLU branches on blur(x), edge(x) and x, summed, then a 1x1 conv.
    Decoder blocks (`transposed=True`) use 3x3 transposed convs (stride 1, padding 1) in the branches."""

    def __init__(self, c_in: int, c_out: int, edge: str, *, transposed: bool = False) -> None:
        super().__init__()
        self.blur = gaussian_blur()
        self.edge = edge_operator(edge)
        self.blur_branch = _conv_bn_prelu(c_in, c_out, 3, 1, 1, transposed=transposed)
        self.edge_branch = _conv_bn_prelu(c_in, c_out, 3, 1, 1, transposed=transposed)
        self.plain_branch = _conv_bn_prelu(c_in, c_out, 3, 1, 1, transposed=transposed)
        self.mix = nn.Conv2d(c_out, c_out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summed = self.blur_branch(self.blur(x)) + self.edge_branch(self.edge(x)) + self.plain_branch(x)
        return self.mix(summed)


class SkipBlock(nn.Module):
    """A linear residual path: conv(in->mid), 2(num-1) convs mid->mid, conv(mid->out), all 3x3 with bias and
    no activation, plus the identity."""

    def __init__(self, c_in: int, c_out: int, mid: int, num: int) -> None:
        super().__init__()
        widths = [c_in] + [mid] * (2 * (num - 1) + 1) + [c_out]
        self.layers = nn.Sequential(*(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + x


class DefedNet(nn.Module):
    """The Defed denoiser (the authors' `ERN`): a two-level U-Net of EFE blocks with three linear skip paths.
    Returns an unclamped image; callers clamp to [0, 1] (`denoise`)."""

    def __init__(self, channels: int = 1, edge: str = "laplacian") -> None:
        super().__init__()
        self.channels = channels
        self.skip1 = SkipBlock(channels, channels, 16, 3)
        self.head = _conv_bn_prelu(channels, 16, 3, 1, 1)
        self.skip2 = SkipBlock(16, 16, 16, 2)
        self.enc1 = EFEBlock(16, 16, edge)
        self.down1 = _conv_bn_prelu(16, 32, 2, 2, 0)
        self.skip3 = SkipBlock(32, 32, 32, 1)
        self.enc2 = EFEBlock(32, 32, edge)
        self.down2 = _conv_bn_prelu(32, 32, 2, 2, 0)
        self.up2 = _conv_bn_prelu(32, 32, 2, 2, 0, transposed=True)
        self.dec2 = EFEBlock(32, 32, edge, transposed=True)
        self.up1 = _conv_bn_prelu(32, 16, 2, 2, 0, transposed=True)
        self.dec1 = EFEBlock(16, 16, edge, transposed=True)
        self.tail = _conv_bn_prelu(16, channels, 3, 1, 1, transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.skip1(x)
        h = self.head(x)
        s2 = self.skip2(h)
        h = self.down1(self.enc1(h))
        s3 = self.skip3(h)
        h = self.up2(self.down2(self.enc2(h)))
        h = self.up1(self.dec2(h) + s3)
        h = self.dec1(h) + s2
        return self.tail(h) + s1


class BaseNet(nn.Module):
    """The authors' ablation: DefedNet's encoder/decoder with a plain conv-BN-PReLU 3x3 block in place of each
    EFE block and no skip paths at all."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.head = _conv_bn_prelu(channels, 16, 3, 1, 1)
        self.body = nn.Sequential(
            _conv_bn_prelu(16, 16, 3, 1, 1),
            _conv_bn_prelu(16, 32, 2, 2, 0),
            _conv_bn_prelu(32, 32, 3, 1, 1),
            _conv_bn_prelu(32, 32, 2, 2, 0),
            _conv_bn_prelu(32, 32, 2, 2, 0, transposed=True),
            _conv_bn_prelu(32, 32, 3, 1, 1, transposed=True),
            _conv_bn_prelu(32, 16, 2, 2, 0, transposed=True),
            _conv_bn_prelu(16, 16, 3, 1, 1, transposed=True),
        )
        self.tail = _conv_bn_prelu(16, channels, 3, 1, 1, transposed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(self.head(x)))


def build_denoiser(variant: str, channels: int, edge: str = "laplacian") -> nn.Module:
    """A freshly initialised denoiser (from the global torch RNG; seed it, or use `train_denoiser`)."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise DefedError(f"channels must be a whole number >= 1 (got {channels!r})")
    if variant == "defed":
        return DefedNet(channels, edge)
    if variant == "basenet":
        return BaseNet(channels)
    raise DefedError(f"unknown Defed variant {variant!r}; use one of {', '.join(VARIANTS)}")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def denoise(denoiser: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The denoised frames clamped to [0, 1], as every use in the authors' code clamps them. Differentiable."""
    return denoiser(x).clamp(0.0, 1.0)


def check_frame_shape(shape: Sequence[int], channels: int | None = None) -> None:
    """DefedError unless frames of `shape` (C, H, W) can go through a denoiser (of `channels` channels)."""
    if len(shape) != 3 or min(shape) < 1:
        raise DefedError(f"frames must have a shape (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    if h % SIDE_MULTIPLE or w % SIDE_MULTIPLE:
        raise DefedError(
            f"the Defed denoiser halves the frame twice, so height and width must be multiples of {SIDE_MULTIPLE}; "
            f"got {h}x{w} (resize the dataset, e.g. to 28 or 32 pixels)"
        )
    if channels is not None and c != channels:
        raise DefedError(f"the denoiser takes {channels}-channel frames, got {c} channels")


def denoiser_flops(model: nn.Module, shape: Sequence[int]) -> int:
    """FLOPs (2 x multiply-adds) of one denoiser pass on a (C, H, W) frame: convolutions, transposed
    convolutions and the fixed blur/edge filters; BatchNorm, PReLU and the additions are left out, as
    `iotbed.models.flops.count_flops` leaves them out of the classifiers."""
    check_frame_shape(shape)
    macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.ConvTranspose2d):
            # Every input element is spread over (out_channels / groups) x kh x kw outputs.
            kh, kw = module.kernel_size
            macs += inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
        elif isinstance(module, FixedFilter):
            macs += output.numel() * module.taps

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, FixedFilter))
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *(int(s) for s in shape)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * macs


# --- training and the cache --------------------------------------------------------------------------------


def _check_noise_levels(levels: Sequence[int]) -> tuple[int, ...]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise DefedError(f"noise_levels must be a non-empty list of whole numbers in 0-255 (got {levels!r})")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 255:
            raise DefedError(
                f"each noise level is the noise std on the 0-255 pixel scale, a whole number in 0-255 (got {level!r})"
            )
    if len(set(levels)) != len(levels):
        raise DefedError(
            f"noise_levels {list(levels)} repeats a level; a repeated level adds an identical denoiser, list it once"
        )
    return tuple(int(v) for v in levels)


@dataclass(frozen=True)
class DefedConfig:
    """A Defed ensemble: one denoiser per noise level, k for the thresholds, and the denoisers' training.

    Defaults: the authors' (alpha 1, Adam lr 1e-3, their README's 10 epochs of batch 256) and two of their
    SVHN levels. `variant="basenet"` trains the ablation (which has no edge operator, so `edge` is unused).
    """

    noise_levels: tuple[int, ...] = (20, 40)
    edge: EdgeMethod = "laplacian"
    k: float = 2.0
    variant: Variant = "defed"
    alpha: float = 1.0  # weight of the classification term, in training and in the score
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_levels", _check_noise_levels(self.noise_levels))
        if self.edge not in EDGE_METHODS:
            raise DefedError(f"unknown edge operator {self.edge!r}; use one of {', '.join(EDGE_METHODS)}")
        if self.variant not in VARIANTS:
            raise DefedError(f"unknown Defed variant {self.variant!r}; use one of {', '.join(VARIANTS)}")
        _check_k(self.k)
        _check_number("alpha", self.alpha)
        _check_number("lr", self.lr, positive=True)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DefedError(f"{name} must be a whole number >= 1 (got {value!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DefedError(f"seed must be a whole number >= 0 (got {self.seed!r})")

    def weights_payload(self) -> dict[str, Any]:
        """The settings the denoisers' weights depend on (not k, not the list of levels)."""
        return {
            "variant": self.variant,
            "edge": self.edge if self.variant == "defed" else None,
            "alpha": float(self.alpha),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": float(self.lr),
            "seed": self.seed,
        }


def _check_number(name: str, value: float, *, positive: bool = False) -> None:
    """DefedError unless `value` is a finite real number >= 0 (> 0 with `positive`)."""
    real = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not (real and (value > 0 if positive else value >= 0)):
        raise DefedError(f"{name} must be a finite number {'> 0' if positive else '>= 0'} (got {value!r})")


def _check_k(k: float) -> None:
    _check_number("k (thresholds at mean + k * std)", k)


@dataclass(frozen=True)
class DenoiserEpoch:
    epoch: int  # from 1
    loss: float  # means over the epoch's training images, with noise as trained
    mse: float
    cross_entropy: float
    wall_time_s: float


@dataclass(frozen=True)
class TrainedDenoiser:
    model: nn.Module  # in eval mode
    noise_level: int
    variant: str
    edge: str | None
    key: str
    path: Path | None
    trained_now: bool  # False when the weights came from the cache
    epochs: tuple[DenoiserEpoch, ...] = ()  # empty when loaded from the cache
    train_wall_time_s: float | None = None  # of the run that made the weights, when known


def level_seeds(seed: int, noise_level: int) -> tuple[int, int]:
    """(initialisation seed, data seed) of the denoiser for `noise_level`: a child stream of `seed` per level,
    so a denoiser does not depend on which other levels are in the ensemble."""
    state = np.random.SeedSequence(seed, spawn_key=(noise_level,)).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1)), int(state[1] >> np.uint64(1))


def weights_digest(model: nn.Module) -> str:
    """sha256 over a module's class, state-dict names, dtypes, shapes and bytes (the classifier's identity)."""
    h = hashlib.sha256(type(model).__name__.encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def denoiser_cache_key(
    config: DefedConfig, noise_level: int, channels: int, dataset_fingerprint: str, classifier_digest: str
) -> str:
    payload = {
        "defed_version": DEFED_CACHE_VERSION,
        "dataset": dataset_fingerprint,
        "classifier": classifier_digest,
        "channels": channels,
        "noise_level": noise_level,
        **config.weights_payload(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _frozen(classifier: nn.Module) -> nn.Module:
    """An eval-mode copy of the classifier with its weights frozen: gradients reach the denoiser through it,
    and the caller's module (its mode, its .grad) is left untouched."""
    frozen = copy.deepcopy(classifier).eval()
    frozen.requires_grad_(False)
    return frozen


def _dataset_tensors(ds: LabeledImages) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = ds.images, ds.labels
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise DefedError(
            f"the training set must hold images (N, C, H, W) and labels (N,), N > 0; "
            f"got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    check_frame_shape(images.shape[1:])
    return images.float(), labels.long()


def defed_loss(
    denoised: torch.Tensor, clean: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, MSE, CE) of the authors' training: alpha * CE(f(D(x~)), y) + MSE(x, D(x~)), both batch means."""
    ce = F.cross_entropy(logits, labels)
    mse = F.mse_loss(denoised, clean)
    return alpha * ce + mse, mse, ce


def _train_epoch(
    model: nn.Module,
    frozen: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
    level: int,
    config: DefedConfig,
    bar: tqdm,
) -> np.ndarray:
    """One pass over the data; returns the summed (loss, MSE, CE) over its images."""
    images, labels = data
    model.train()
    order = torch.randperm(images.shape[0], generator=generator)
    sums = np.zeros(3)
    for start in range(0, images.shape[0], config.batch_size):
        idx = order[start : start + config.batch_size]
        x, y = images[idx], labels[idx]
        noisy = (x + torch.randn(x.shape, generator=generator) * (level / 255.0)).clamp(0.0, 1.0)
        out = denoise(model, noisy)
        loss, mse, ce = defed_loss(out, x, frozen(out), y, config.alpha)
        if not torch.isfinite(loss):
            raise DefedError(f"denoiser training for L={level} diverged (loss {loss.item()}); lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += np.array([loss.item(), mse.item(), ce.item()]) * len(idx)
        bar.set_postfix_str(f"loss {loss.item():.4f}", refresh=False)
        bar.update(1)
    return sums


def train_denoiser(
    classifier: nn.Module,
    train_ds: LabeledImages,
    noise_level: int,
    config: DefedConfig,
    *,
    progress: bool = True,
) -> tuple[nn.Module, tuple[DenoiserEpoch, ...]]:
    """One denoiser for `noise_level`, trained as the authors do: x~ = clamp(x + N(0, 1) * L / 255, 0, 1),
    loss alpha * CE(f(clamp(D(x~))), y) + MSE(x, clamp(D(x~))) through the frozen classifier f, Adam. The
    seed and the level fix the result. Returns the model (eval mode) and per-epoch statistics."""
    images, labels = _dataset_tensors(train_ds)
    (level,) = _check_noise_levels([noise_level])
    init_seed, data_seed = level_seeds(config.seed, level)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # module constructors draw their initial weights from the global RNG
        model = build_denoiser(config.variant, int(images.shape[1]), config.edge)
    generator = torch.Generator().manual_seed(data_seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    frozen = _frozen(classifier)
    history: list[DenoiserEpoch] = []
    bar = tqdm(
        total=config.epochs * math.ceil(images.shape[0] / config.batch_size),
        desc=f"train {config.variant} denoiser L={level}",
        unit="batch",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    try:
        for epoch in range(config.epochs):
            start = time.perf_counter()
            sums = _train_epoch(model, frozen, optimizer, (images, labels), generator, level, config, bar)
            loss, mse, ce = (float(v) for v in sums / images.shape[0])
            history.append(DenoiserEpoch(epoch + 1, loss, mse, ce, time.perf_counter() - start))
    finally:
        bar.close()
    return model.eval(), tuple(history)


def _save_denoiser(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        safetensors.torch.save_file(tensors, tmp, metadata={"format": FILE_FORMAT, **metadata})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
        tmp = None
    except OSError as exc:
        raise DefedError(f"cannot write the denoiser file {path}: {exc}") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _load_denoiser(path: Path, key: str, variant: str, channels: int, edge: str) -> nn.Module | None:
    """The denoiser cached at `path` under `key`, or None (with a warning where the file is unusable)."""
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FILE_FORMAT or metadata.get("cache_key") != key:
            raise DefedError(f"it records format {metadata.get('format')!r}, key {metadata.get('cache_key')!r}")
        tensors = safetensors.torch.load_file(str(path))
        model = build_denoiser(variant, channels, edge)
        own = model.state_dict()
        retyped = [k for k in own if k in tensors and tensors[k].dtype != own[k].dtype]
        if retyped:
            raise DefedError(f"dtype mismatch in {', '.join(retyped)}")
        model.load_state_dict(tensors, strict=True)
    except (DefedError, OSError, RuntimeError, safetensors.SafetensorError) as exc:
        log.warning("cached denoiser %s is unusable (%s); retraining it", path, exc)
        return None
    return model.eval()


def get_or_train_denoiser(
    classifier: nn.Module,
    train_ds: LabeledImages,
    noise_level: int,
    config: DefedConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TrainedDenoiser:
    """The denoiser for `noise_level`, from the cache or trained now (on the clean `train_ds`) and cached."""
    images, _ = _dataset_tensors(train_ds)
    (level,) = _check_noise_levels([noise_level])
    channels = int(images.shape[1])
    fingerprint = train_ds.fingerprint()
    digest = weights_digest(classifier)
    key = denoiser_cache_key(config, level, channels, fingerprint, digest)
    folder = cache_folder(cache_dir, "defed")
    path = folder / f"{key}.safetensors"
    info_path = folder / f"{key}.json"
    edge = config.edge if config.variant == "defed" else None

    model = _load_denoiser(path, key, config.variant, channels, config.edge)
    if model is not None:
        wall = read_json(info_path).get("train_wall_time_s")
        return TrainedDenoiser(
            model=model,
            noise_level=level,
            variant=config.variant,
            edge=edge,
            key=key,
            path=path,
            trained_now=False,
            train_wall_time_s=float(wall) if isinstance(wall, (int, float)) else None,
        )
    start = time.perf_counter()
    model, history = train_denoiser(classifier, train_ds, level, config, progress=progress)
    wall = time.perf_counter() - start
    _save_denoiser(path, model, {"cache_key": key, "noise_level": str(level), "variant": config.variant})
    info = {
        "key": key,
        "kind": config.variant,
        "noise_level": level,
        "channels": channels,
        "settings": config.weights_payload(),
        "dataset": str(getattr(train_ds, "name", "")),
        "dataset_fingerprint": fingerprint,
        "classifier_digest": digest,
        "parameters": parameter_count(model),
        "train_wall_time_s": wall,
        "epochs": [dataclasses.asdict(e) for e in history],
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    try:
        write_json_atomic(info_path, info)
    except OSError as exc:
        log.warning("could not write %s: %s", info_path, exc)
    return TrainedDenoiser(model, level, config.variant, edge, key, path, True, history, wall)


def get_or_train_denoisers(
    classifier: nn.Module,
    train_ds: LabeledImages,
    config: DefedConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[TrainedDenoiser, ...]:
    """One denoiser per noise level of `config`, in its order."""
    return tuple(
        get_or_train_denoiser(classifier, train_ds, level, config, cache_dir=cache_dir, progress=progress)
        for level in config.noise_levels
    )


# --- the detector and corrector ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DefedPass:
    """Everything one pass of the ensemble computes for a batch of N frames through D denoisers. Built with
    autograd where the caller's input asks for it (an adaptive attack can back-propagate through it)."""

    bare_logits: torch.Tensor  # (N, K) f(x)
    denoised: torch.Tensor  # (D, N, C, H, W) clamp(D_i(x))
    denoised_logits: torch.Tensor  # (D, N, K) f(clamp(D_i(x)))
    scores: torch.Tensor  # (D, N) alpha * CE(f(D_i(x)), argmax f(x)) + MSE(x, D_i(x))


@dataclass(frozen=True)
class DefedThresholds:
    values: torch.Tensor  # (D,) mean + k * std of each denoiser's calibration scores
    means: torch.Tensor  # (D,)
    stds: torch.Tensor  # (D,) sample std (n - 1), as the authors' torch .std()
    k: float
    n_calibration: int
    calibration_frr: float  # share of the calibration frames flagged by at least one denoiser

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": self.values.tolist(),
            "means": self.means.tolist(),
            "stds": self.stds.tolist(),
            "k": self.k,
            "n_calibration": self.n_calibration,
            "calibration_frr": self.calibration_frr,
        }


@dataclass(frozen=True)
class DefedVerdict:
    flagged: torch.Tensor  # (N,) bool: at least one denoiser's score is over its threshold
    flagged_by: torch.Tensor  # (D, N) bool: which denoisers flagged each frame
    labels: torch.Tensor  # (N,) int64: the bare prediction if unflagged, else the flagging denoisers' vote
    bare_labels: torch.Tensor  # (N,) int64: argmax f(x)
    scores: torch.Tensor  # (D, N)


def thresholds_from_scores(scores: torch.Tensor, k: float) -> DefedThresholds:
    """Per-denoiser mean + k * std of clean calibration scores (D, M)."""
    _check_k(k)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise DefedError(
            f"thresholds need the scores of at least 2 calibration frames per denoiser, got shape {tuple(scores.shape)}"
        )
    s = scores.detach().double()
    means, stds = s.mean(dim=1), s.std(dim=1)
    values = means + k * stds
    frr = float((s > values[:, None]).any(dim=0).double().mean())
    return DefedThresholds(values, means, stds, float(k), int(s.shape[1]), frr)


def k_for_frr(scores: torch.Tensor, frr: float) -> float:
    """The smallest k whose thresholds flag at most a share `frr` of the calibration frames (any-denoiser
    rule), from their scores (D, M). Ours, not the authors' (they pick k in {1, 2, 3})."""
    if not (math.isfinite(frr) and 0 < frr < 1):
        raise DefedError(f"the target FRR must lie strictly between 0 and 1 (got {frr})")
    base = thresholds_from_scores(scores, 0.0)
    s = scores.detach().double()
    stds = base.stds.clamp(min=1e-12)
    # A frame passes at k exactly when k >= its largest standardised score over the denoisers.
    z = ((s - base.means[:, None]) / stds[:, None]).amax(dim=0).clamp(min=0.0)
    allowed = math.floor(frr * s.shape[1])  # frames that may stay over the thresholds
    ordered = torch.sort(z, descending=True).values
    if allowed >= len(ordered):
        return 0.0
    # A hair above the boundary frame's own z, so rounding in mean + k * std cannot flag it after all.
    return float(ordered[allowed]) * (1 + 1e-9) + 1e-12


def ensemble_decision(
    scores: torch.Tensor, denoised_logits: torch.Tensor, bare_logits: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flagged (N,), flagged_by (D, N), labels (N,)): any score over its threshold flags a frame; a flagged
    frame takes the argmax of the summed softmax of the flagging denoisers, the others f(x)'s argmax."""
    flagged_by = scores > thresholds.to(scores.dtype)[:, None]
    flagged = flagged_by.any(dim=0)
    votes = (torch.softmax(denoised_logits, dim=2) * flagged_by[:, :, None]).sum(dim=0)
    labels = torch.where(flagged, votes.argmax(dim=1), bare_logits.argmax(dim=1))
    return flagged, flagged_by, labels


class DefedEnsemble(nn.Module):
    """A classifier behind Defed denoisers: `forward` scores a batch (differentiable), `fit_thresholds` fits the
    thresholds on clean calibration frames, `classify` flags and labels a batch."""

    def __init__(
        self,
        classifier: nn.Module,
        denoisers: Sequence[nn.Module],
        *,
        k: float = 2.0,
        alpha: float = 1.0,
        noise_levels: Sequence[int] | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if len(denoisers) == 0:
            raise DefedError("a Defed ensemble needs at least one denoiser")
        _check_k(k)
        if noise_levels is not None and len(noise_levels) != len(denoisers):
            raise DefedError(f"{len(noise_levels)} noise levels for {len(denoisers)} denoisers")
        if batch_size < 1:
            raise DefedError(f"batch_size must be >= 1 (got {batch_size})")
        self.classifier = classifier.eval()
        self.denoisers = nn.ModuleList(d.eval() for d in denoisers)
        self.k = float(k)
        self.alpha = float(alpha)
        self.noise_levels = tuple(noise_levels) if noise_levels is not None else None
        self.batch_size = int(batch_size)
        self.thresholds: DefedThresholds | None = None

    def train(self, mode: bool = True) -> DefedEnsemble:
        """Sets this wrapper's flag only: the ensemble infers with frozen networks (the denoisers are trained by
        `train_denoiser`), so their BatchNorm must stay in eval mode whatever a caller switches."""
        self.training = mode
        return self

    @classmethod
    def from_trained(
        cls, classifier: nn.Module, denoisers: Sequence[TrainedDenoiser], config: DefedConfig
    ) -> DefedEnsemble:
        return cls(
            classifier,
            [d.model for d in denoisers],
            k=config.k,
            alpha=config.alpha,
            noise_levels=[d.noise_level for d in denoisers],
        )

    def behind(
        self, classifier: nn.Module, calibration: torch.Tensor, labels: torch.Tensor | None = None
    ) -> DefedEnsemble:
        """The same denoisers and settings in front of another classifier (a model update), with thresholds
        refitted for it on `calibration`. The denoisers were trained through the first classifier."""
        moved = DefedEnsemble(
            classifier,
            list(self.denoisers),
            k=self.k,
            alpha=self.alpha,
            noise_levels=self.noise_levels,
            batch_size=self.batch_size,
        )
        moved.fit_thresholds(calibration, labels)
        return moved

    def detection_score(self, scores: torch.Tensor) -> torch.Tensor:
        """(N,) the largest score over threshold ratio across the denoisers: above 1 where the frame is flagged.
        One number per frame, for ROC curves and AUROC."""
        if self.thresholds is None:
            raise DefedError("fit the thresholds on clean calibration frames (fit_thresholds) first")
        return (scores.double() / self.thresholds.values.clamp(min=1e-12)[:, None]).amax(dim=0)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise DefedError(f"frames must be a floating tensor (N, C, H, W), got {getattr(x, 'shape', type(x))}")
        check_frame_shape(x.shape[1:], getattr(self.denoisers[0], "channels", None))

    def forward(self, x: torch.Tensor) -> DefedPass:
        """The whole pass on a batch, with autograd where the input or weights ask for it (no chunking, no
        no_grad): what an adaptive attack differentiates."""
        self._check(x)
        bare = self.classifier(x)
        target = bare.argmax(dim=1).detach()
        denoised = torch.stack([denoise(d, x) for d in self.denoisers])  # (D, N, C, H, W)
        d_count, n = denoised.shape[:2]
        logits = self.classifier(denoised.flatten(0, 1)).unflatten(0, (d_count, n))
        ce = F.cross_entropy(logits.flatten(0, 1), target.repeat(d_count), reduction="none").unflatten(0, (d_count, n))
        mse = (denoised - x[None]).pow(2).flatten(2).mean(dim=2)
        return DefedPass(bare, denoised, logits, self.alpha * ce + mse)

    def _chunks(self, x: torch.Tensor) -> Iterator[DefedPass]:
        with torch.inference_mode():
            for start in range(0, max(x.shape[0], 1), self.batch_size):  # an empty batch still gives shapes
                yield self(x[start : start + self.batch_size].float())

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """(D, N) scores, without autograd, in chunks of `batch_size`."""
        self._check(x)
        return torch.cat([p.scores for p in self._chunks(x)], dim=1)

    def fit_thresholds(self, calibration: torch.Tensor, labels: torch.Tensor | None = None) -> DefedThresholds:
        """Fit mean + k * std per denoiser on clean calibration frames, a split you will NOT score. With
        `labels`, only the frames the bare classifier gets right are used (the authors' benign set)."""
        scores = self.calibration_scores(calibration, labels)
        self.thresholds = thresholds_from_scores(scores, self.k)
        return self.thresholds

    def calibration_scores(self, calibration: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(D, M) scores of the calibration frames (those classified right, when labels are given)."""
        self._check(calibration)
        passes = list(self._chunks(calibration))
        scores = torch.cat([p.scores for p in passes], dim=1)
        if labels is not None:
            if labels.shape != (calibration.shape[0],):
                raise DefedError(f"{calibration.shape[0]} calibration frames but labels of shape {tuple(labels.shape)}")
            bare = torch.cat([p.bare_logits.argmax(dim=1) for p in passes])
            scores = scores[:, bare == labels.to(bare.device)]
        return scores

    def set_k(self, k: float, calibration_scores: torch.Tensor) -> DefedThresholds:
        """Refit the thresholds for a new k from calibration scores already computed."""
        _check_k(k)
        self.k = float(k)
        self.thresholds = thresholds_from_scores(calibration_scores, self.k)
        return self.thresholds

    def classify(self, x: torch.Tensor) -> DefedVerdict:
        """Flag and label a batch (no autograd). Thresholds must be fitted first."""
        if self.thresholds is None:
            raise DefedError("fit the thresholds on clean calibration frames (fit_thresholds) before classifying")
        self._check(x)
        parts = []
        for p in self._chunks(x):
            flagged, flagged_by, labels = ensemble_decision(
                p.scores, p.denoised_logits, p.bare_logits, self.thresholds.values
            )
            parts.append((flagged, flagged_by, labels, p.bare_logits.argmax(dim=1), p.scores))
        return DefedVerdict(
            flagged=torch.cat([q[0] for q in parts]),
            flagged_by=torch.cat([q[1] for q in parts], dim=1),
            labels=torch.cat([q[2] for q in parts]),
            bare_labels=torch.cat([q[3] for q in parts]),
            scores=torch.cat([q[4] for q in parts], dim=1),
        )

    def flops_per_image(self, shape: Sequence[int]) -> int:
        """FLOPs the ensemble adds to one (C, H, W) frame: every denoiser pass plus one classifier pass per
        denoised frame. The bare classifier pass is not included: the edge runs it anyway."""
        shape = tuple(int(s) for s in shape)
        denoising = sum(denoiser_flops(d, shape) for d in self.denoisers)
        return denoising + len(self.denoisers) * count_flops(self.classifier, shape)


def prepare_defed(
    classifier: nn.Module,
    train_ds: LabeledImages,
    calibration: torch.Tensor,
    config: DefedConfig,
    *,
    calibration_labels: torch.Tensor | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> DefedEnsemble:
    """Denoisers from the cache (or trained now), put behind `classifier`, thresholds fitted on `calibration`."""
    denoisers = get_or_train_denoisers(classifier, train_ds, config, cache_dir=cache_dir, progress=progress)
    ensemble = DefedEnsemble.from_trained(classifier, denoisers, config)
    ensemble.fit_thresholds(calibration, calibration_labels)
    return ensemble
