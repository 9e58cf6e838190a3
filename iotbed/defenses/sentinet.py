"""SentiNet (Chou, Tramèr, Pellegrino, IEEE S&P Workshops 2020) for one model, batched and seeded.

SentiNet looks for a small image region that decides the model's answer on its own, whatever else is
in the picture. For an input x the model predicts y:

1. Class proposal (paper Alg. 1): y and the `top_k` next most likely classes of x. The paper proposes
   classes by running the model on selective-search segments of x; on 28-32 px images segments are a
   few pixels, so we take the model's own top-k on the whole image (as public reproductions do).
2. Mask (Alg. 2): Grad-CAM (Selvaraju et al.) for y and for each proposed class on the last
   convolutional layer's activation (after its BatchNorm/ReLU, as Grad-CAM takes rectified feature
   maps): ReLU(sum_c alpha_c A_c), alpha_c the spatial mean of d logit / d A_c, upsampled bilinearly to
   the image. Every map of an input is divided by the peak of y's map, and a pixel is salient for a
   class where its map reaches `saliency_threshold` (0.5: our choice, the paper gives no value). The
   mask is the region salient for y and for none of the proposed classes: the paper subtracts each
   proposed class's region from y's and tests one mask per class; we keep their intersection, one
   mask and one test per input. Our choice of a common scale matters: with each map divided by its
   own peak, a proposed class with weak evidence everywhere gets "salient" regions, often on the
   trigger itself (Grad-CAM's weights are per channel, so a trigger-detecting channel shows up in
   every class's map); on the tests' digits BadNet that left FAR 25% at FRR 1% (AUROC 0.92), the
   common scale 1% (AUROC 0.99). The defaults (`top_k` 3, threshold 0.5) were picked there, among
   1-5 and 0.3-0.7, and are used unchanged on MNIST and GTSRB.
3. Tests (Alg. 3), with N = `n_pastes` clean backgrounds drawn with replacement from a held-out pool:
   - fooled rate: x's masked region pasted onto each background; the share the model labels y.
     Backgrounds the model itself labels y are left out (our choice: they would count as fooled
     with nothing pasted; the pool is labelled by the model once, `SentinetCost.setup`);
   - average confidence: the region filled with an inert pattern, Gaussian noise (paper) N(0.5, 0.25)
     clipped to [0, 1] (our parameters; N noise images per call, shared by its inputs), on the same
     backgrounds; the mean top-class probability.
     A big benign region (the whole digit) fools the model but noise in it also ruins the picture
     (low confidence); a trigger is small, so noise in its place leaves the confidence high.
4. Boundary (Alg. 4): on clean calibration inputs the points (confidence, fooled) are put in
   `n_bins` equal confidence bins; the point of highest fooled rate in each bin is kept and a quadratic
   fitted to them (least squares), an upper envelope of benign behaviour. An input's `excess` is its
   fooled rate minus the curve at its confidence (vertical distance; the paper measures the Euclidean
   distance to the curve). The curve is evaluated at confidences clamped to the calibration range, so
   a parabola's extrapolated tail never decides. An input is flagged when its excess exceeds the
   threshold, the (1 - FRR) empirical quantile of the calibration excesses (the paper thresholds at
   the mean distance of the points above the curve; a preset FRR makes it comparable with STRIP).

Scores are "high = suspicious"; `detection_scores` negates them for `iotbed.analysis.detection`,
whose convention (STRIP's) is "low = trojaned".

Cost per input (`SentinetCost`): one forward pass (prediction, top-k and Grad-CAM's activations),
1 + top_k backward passes through the layers after the saliency layer (activation gradients only:
one product per conv/linear layer, as many multiply-adds as its forward), and 2 N forward passes for
the two tests. FLOPs count Conv2d and Linear layers only, as `iotbed.models.flops` does.

`screen_update` judges a candidate model on relayed frames with the same binomial count test as
`iotbed.defenses.strip.screen_update`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iotbed.analysis.detection import DetectionReport, detection_report
from iotbed.defenses.strip import flagged_count_test
from iotbed.errors import IotbedError
from iotbed.models.flops import count_flops


class SentinetError(IotbedError):
    """SentiNet used with inputs or settings it cannot work with."""

    exit_code = 2


def last_conv_layer(model: nn.Module) -> nn.Conv2d:
    """The last `nn.Conv2d` registered in `model`."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise SentinetError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM; pass `layer=` explicitly")
    return convs[-1]


# Modules that may follow a convolution inside its block: Grad-CAM reads the block's rectified output.
_BLOCK_FOLLOWERS = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU)


def saliency_layer(model: nn.Module) -> nn.Module:
    """The last convolutional layer's activation: the last Conv2d, or the BatchNorm/activation modules
    that directly follow it in the same `nn.Sequential`."""
    conv = last_conv_layer(model)
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent.children())
            if any(c is conv for c in children):
                i = next(j for j, c in enumerate(children) if c is conv)
                while i + 1 < len(children) and isinstance(children[i + 1], _BLOCK_FOLLOWERS):
                    i += 1
                return children[i]
    return conv


def _find_layer(net: nn.Module, original: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    """The module of the private copy `net` that stands where `layer` is in `original`."""
    if layer is None:
        layer = saliency_layer(original)
    if isinstance(layer, str):
        name = layer
    else:
        names = [n for n, m in original.named_modules() if m is layer]
        if not names:
            raise SentinetError("the saliency layer is not a module of the model")
        name = names[0]
    modules = dict(net.named_modules())
    if name not in modules:
        raise SentinetError(f"the model has no module named {name!r}")
    return modules[name]


def grad_cam(
    net: nn.Module, layer: nn.Module, x: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM of the `n_classes` most likely classes of each input.

    Returns (logits (B, K), classes (B, n_classes) most likely first, maps (B, n_classes, h, w) at the
    layer's resolution, >= 0, unnormalised). One forward pass; one backward pass per class through
    the layers after `layer` only (its output is cut from the graph before it).
    """
    captured: dict[str, torch.Tensor] = {}

    def cut(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        leaf = output.detach().requires_grad_(True)
        captured["a"] = leaf
        return leaf.clone()  # in-place activations after the layer must not change A itself

    handle = layer.register_forward_hook(cut)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits = net(x.detach().clone())
            if "a" not in captured:
                raise SentinetError("the saliency layer was not run by the model's forward pass")
            a = captured["a"]
            if a.ndim != 4:
                raise SentinetError(f"the saliency layer must output (B, C, h, w) maps, got {tuple(a.shape)}")
            classes = logits.detach().topk(n_classes, dim=1).indices
            maps = []
            for j in range(n_classes):
                chosen = logits.gather(1, classes[:, j : j + 1]).sum()
                (grad,) = torch.autograd.grad(chosen, a, retain_graph=j < n_classes - 1)
                weights = grad.mean(dim=(2, 3), keepdim=True)
                maps.append(torch.relu((weights * a).sum(dim=1)).detach())
    finally:
        handle.remove()
    return logits.detach(), classes, torch.stack(maps, dim=1)


def normalised_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (B, J, h, w) upsampled bilinearly to `size`, all divided by the peak of the first (the
    predicted class's) map, so one threshold means the same strength for every class of an input.
    An input whose first map is all zero gets all-zero maps."""
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).clamp_min(0.0)
    peak = up[:, :1].amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, up / peak.clamp_min(1e-12), torch.zeros_like(up))


def class_specific_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1, H, W) bool: salient (>= threshold) for the first class and for none of the others."""
    salient = maps >= threshold
    others = salient[:, 1:].any(dim=1, keepdim=True)
    return salient[:, :1] & ~others


@dataclass(frozen=True)
class SentinetScores:
    """What SentiNet measured on each input (all (B,))."""

    predicted: torch.Tensor  # y, the model's label for the input
    fooled: torch.Tensor  # share of backgrounds labelled y with the region pasted
    confidence: torch.Tensor  # mean top-class probability with noise in the region
    mask_area: torch.Tensor  # share of the image's pixels in the mask

    def __len__(self) -> int:
        return int(self.fooled.numel())


@dataclass(frozen=True)
class SentinetBoundary:
    """The benign upper envelope fooled = a conf^2 + b conf + c and the excess threshold above it."""

    coefficients: tuple[float, float, float]
    confidence_range: tuple[float, float]  # where the curve was fitted; evaluated clamped to it
    threshold: float  # flag when fooled - curve(confidence) > threshold
    frr: float
    n_bins: int
    n_calibration: int
    calibration_frr: float  # share of calibration excesses above the threshold

    def curve(self, confidence: torch.Tensor) -> torch.Tensor:
        a, b, c = self.coefficients
        low, high = self.confidence_range
        conf = confidence.double().clamp(low, high)
        return a * conf * conf + b * conf + c

    def excess(self, scores: SentinetScores) -> torch.Tensor:
        return (scores.fooled.double() - self.curve(scores.confidence)).float()


def fit_envelope(
    confidence: torch.Tensor, fooled: torch.Tensor, n_bins: int
) -> tuple[tuple[float, float, float], tuple[float, float]]:
    """Alg. 4's curve: the highest-fooled point of each of `n_bins` equal confidence bins, fitted with
    a quadratic by least squares. Returns (a, b, c) and the confidence range."""
    conf = confidence.double().numpy()
    fool = fooled.double().numpy()
    low, high = float(conf.min()), float(conf.max())
    if not high > low:
        raise SentinetError("the calibration confidences are all equal; SentiNet's curve needs them to spread")
    edges = np.linspace(low, high, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    xs, ys = [], []
    for b in range(n_bins):
        members = np.flatnonzero(bins == b)
        if members.size:
            top = members[np.argmax(fool[members])]
            xs.append(conf[top])
            ys.append(fool[top])
    if len(xs) < 3:
        raise SentinetError(f"only {len(xs)} confidence bins hold calibration points; a quadratic needs 3")
    a, b, c = np.polyfit(np.array(xs), np.array(ys), 2)
    return (float(a), float(b), float(c)), (low, high)


@dataclass(frozen=True)
class SentinetCost:
    """FLOPs (Conv2d + Linear, 2 x MACs) SentiNet spends, to charge a device profile."""

    forward: float  # one forward pass of the model
    backward: float  # one backward pass behind the saliency layer (activation gradients)
    top_k: int
    n_pastes: int
    pool: int  # backgrounds labelled once per model

    @property
    def grad_cam(self) -> float:
        return self.forward + (1 + self.top_k) * self.backward

    @property
    def tests(self) -> float:
        return 2 * self.n_pastes * self.forward  # fooled + inert, one forward pass per pasted image

    @property
    def per_input(self) -> float:
        return self.grad_cam + self.tests

    @property
    def setup(self) -> float:
        return self.pool * self.forward

    def as_dict(self) -> dict[str, float]:
        return {
            "forward": self.forward,
            "backward": self.backward,
            "grad_cam": self.grad_cam,
            "tests": self.tests,
            "per_input": self.per_input,
            "setup": self.setup,
            "forward_equivalents_per_input": self.per_input / self.forward if self.forward else float("nan"),
        }


def flops_after(model: nn.Module, layer: nn.Module, input_shape: tuple[int, int, int]) -> float:
    """FLOPs of the Conv2d/Linear layers run after `layer` in one forward pass (what a backward pass
    to `layer`'s output goes through)."""
    order: list[tuple[nn.Module, int]] = []

    def record(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        macs = 0
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
        order.append((module, macs))

    watched = {m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))} | {layer}
    handles = [m.register_forward_hook(record) for m in watched]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in handles:
            h.remove()
    seen = [i for i, (m, _) in enumerate(order) if m is layer]
    if not seen:
        raise SentinetError("the saliency layer was not run by the model's forward pass")
    return float(2 * sum(macs for _, macs in order[seen[-1] + 1 :]))


class SentinetDetector:
    """SentiNet for one model: `score` measures, `calibrate` fits the boundary, `flag` applies it.

    `backgrounds` (M, C, H, W) are clean held-out images the regions are pasted onto; the model labels
    them once here. Random draws (backgrounds per input, the noise) come from `generator`, drawn for a
    whole call before any chunking, so scores do not depend on `max_batch`.
    """

    def __init__(
        self,
        model: nn.Module,
        backgrounds: torch.Tensor,
        *,
        n_pastes: int = 100,
        top_k: int = 3,
        saliency_threshold: float = 0.5,
        noise_mean: float = 0.5,
        noise_std: float = 0.25,
        n_bins: int = 20,
        layer: nn.Module | str | None = None,
        generator: torch.Generator | None = None,
        max_batch: int = 1024,
    ) -> None:
        if backgrounds.ndim != 4 or backgrounds.shape[0] < 2:
            raise SentinetError(
                f"backgrounds must be a batch of at least 2 clean images (M, C, H, W), got {tuple(backgrounds.shape)}"
            )
        if n_pastes < 1:
            raise SentinetError(f"n_pastes must be >= 1, got {n_pastes}")
        if top_k < 1:
            raise SentinetError(f"top_k must be >= 1 (classes whose saliency is taken away), got {top_k}")
        if not 0.0 < saliency_threshold <= 1.0:
            raise SentinetError(f"saliency_threshold must be in (0, 1] of a map's peak, got {saliency_threshold}")
        if not 0.0 <= noise_mean <= 1.0 or noise_std < 0.0:
            raise SentinetError(f"the inert noise needs a mean in [0, 1] and std >= 0, got {noise_mean}, {noise_std}")
        if n_bins < 3:
            raise SentinetError(f"n_bins must be >= 3 to fit a quadratic, got {n_bins}")
        if max_batch < 1:
            raise SentinetError(f"max_batch must be >= 1, got {max_batch}")
        # A private eval-mode copy without parameter gradients: Grad-CAM needs only activation gradients,
        # and the caller's model (its mode, its weights' flags) stays untouched.
        self._net = copy.deepcopy(model).eval().requires_grad_(False)
        self._layer = _find_layer(self._net, model, layer)
        # The tests' forward passes go through a channels-last copy: 1.3-2x faster for small CNNs on CPU
        # (as in `iotbed.defenses.strip`); Grad-CAM keeps the NCHW copy its hook is on.
        self._fast: nn.Module | None = copy.deepcopy(self._net).to(memory_format=torch.channels_last)
        self.backgrounds = backgrounds.detach().float().contiguous()
        self.n_pastes = int(n_pastes)
        self.top_k = int(top_k)
        self.saliency_threshold = float(saliency_threshold)
        self.noise_mean = float(noise_mean)
        self.noise_std = float(noise_std)
        self.n_bins = int(n_bins)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.max_batch = int(max_batch)
        self.background_labels = self._predict(self.backgrounds)
        self.num_classes = int(self._logits(self.backgrounds[:1]).shape[1])
        if self.top_k + 1 > self.num_classes:
            raise SentinetError(
                f"top_k = {self.top_k} needs at least {self.top_k + 1} classes; the model has {self.num_classes}"
            )
        self.boundary: SentinetBoundary | None = None
        self.cost = self._cost()

    # -- model passes ------------------------------------------------------------------------------

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self._fast is not None:
                try:
                    return self._fast(images.contiguous(memory_format=torch.channels_last)).float()
                except RuntimeError:  # e.g. a model that calls .view() on its feature maps
                    self._fast = None
            return self._net(images.contiguous()).float()

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._logits(c).argmax(dim=1) for c in images.split(self.max_batch)])

    def _cost(self) -> SentinetCost:
        shape = tuple(int(s) for s in self.backgrounds.shape[1:])
        return SentinetCost(
            forward=float(count_flops(self._net, shape)),
            backward=flops_after(self._net, self._layer, shape),  # type: ignore[arg-type]
            top_k=self.top_k,
            n_pastes=self.n_pastes,
            pool=int(self.backgrounds.shape[0]),
        )

    # -- saliency ----------------------------------------------------------------------------------

    def saliency(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(predicted (B,), normalised Grad-CAM maps (B, 1 + top_k, H, W), mask (B, 1, H, W) bool)."""
        self._check_inputs(x)
        predicted, maps, masks = [], [], []
        for chunk in x.float().split(self.max_batch):
            _, classes, raw = grad_cam(self._net, self._layer, chunk, 1 + self.top_k)
            norm = normalised_maps(raw, (int(x.shape[2]), int(x.shape[3])))
            predicted.append(classes[:, 0])
            maps.append(norm)
            masks.append(class_specific_mask(norm, self.saliency_threshold))
        return torch.cat(predicted), torch.cat(maps), torch.cat(masks)

    # -- the two tests -----------------------------------------------------------------------------

    def _draw(self, predicted: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Background positions (B, N), none labelled like its input where the pool allows, and the
        inert noise (N, C, H, W) shared by the call."""
        u = torch.rand(predicted.shape[0], self.n_pastes, generator=generator, dtype=torch.float64)
        noise = torch.randn(self.n_pastes, *self.backgrounds.shape[1:], generator=generator)
        noise = (self.noise_mean + self.noise_std * noise).clamp(0.0, 1.0)
        idx = torch.empty(predicted.shape[0], self.n_pastes, dtype=torch.long)
        everyone = torch.arange(self.backgrounds.shape[0])
        for label in predicted.unique().tolist():
            allowed = (self.background_labels != label).nonzero().flatten()
            if allowed.numel() == 0:  # the model labels every background y: nothing better to paste on
                allowed = everyone
            rows = predicted == label
            idx[rows] = allowed[(u[rows] * allowed.numel()).long().clamp_max(allowed.numel() - 1)]
        return idx, noise

    def _tests(
        self, x: torch.Tensor, mask: torch.Tensor, predicted: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_chunk = max(1, self.max_batch // self.n_pastes)
        fooled = torch.empty(x.shape[0])
        confidence = torch.empty(x.shape[0])
        for start in range(0, x.shape[0], per_chunk):
            stop = min(x.shape[0], start + per_chunk)
            m = mask[start:stop, None].float()  # (b, 1, 1, H, W)
            bg = self.backgrounds[idx[start:stop]]  # (b, N, C, H, W)
            pasted = m * x[start:stop, None] + (1.0 - m) * bg
            inert = m * noise[None] + (1.0 - m) * bg
            labels = self._logits(pasted.flatten(0, 1)).argmax(dim=1).view(stop - start, self.n_pastes)
            probs = torch.softmax(self._logits(inert.flatten(0, 1)), dim=1).amax(dim=1)
            fooled[start:stop] = (labels == predicted[start:stop, None]).float().mean(dim=1)
            confidence[start:stop] = probs.view(stop - start, self.n_pastes).mean(dim=1)
        return fooled, confidence

    def score(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> SentinetScores:
        """Fooled rate and inert-pattern confidence of each input (see the module doc)."""
        predicted, _, mask = self.saliency(x)
        idx, noise = self._draw(predicted, generator if generator is not None else self.generator)
        fooled, confidence = self._tests(x.float(), mask, predicted, idx, noise)
        area = mask.float().mean(dim=(1, 2, 3))
        return SentinetScores(predicted=predicted, fooled=fooled, confidence=confidence, mask_area=area)

    def _check_inputs(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.backgrounds.shape[1:]) or x.shape[0] == 0:
            shape = ", ".join(map(str, self.backgrounds.shape[1:]))
            raise SentinetError(
                f"inputs must be a non-empty (B, {shape}) batch like the backgrounds, got {tuple(x.shape)}"
            )

    # -- boundary and flags ------------------------------------------------------------------------

    def calibrate(self, benign: torch.Tensor, *, frr: float = 0.01) -> SentinetBoundary:
        """Fit the curve and the threshold on clean `benign` inputs (a split you will NOT score)."""
        return self.calibrate_scores(self.score(benign), frr=frr)

    def calibrate_scores(self, benign: SentinetScores, *, frr: float = 0.01) -> SentinetBoundary:
        if not 0.0 < frr < 0.5:
            raise SentinetError(f"a preset FRR must lie in (0, 0.5), got {frr}")
        if len(benign) < 3:
            raise SentinetError(f"calibration needs at least 3 clean inputs, got {len(benign)}")
        coefficients, conf_range = fit_envelope(benign.confidence, benign.fooled, self.n_bins)
        unthresholded = SentinetBoundary(coefficients, conf_range, 0.0, frr, self.n_bins, len(benign), 0.0)
        excess = unthresholded.excess(benign).double()
        threshold = float(np.quantile(excess.numpy(), 1.0 - frr))
        self.boundary = SentinetBoundary(
            coefficients,
            conf_range,
            threshold,
            float(frr),
            self.n_bins,
            len(benign),
            float((excess > threshold).double().mean()),
        )
        return self.boundary

    def excess(self, scores: SentinetScores) -> torch.Tensor:
        if self.boundary is None:
            raise SentinetError("calibrate the detector on clean inputs before flagging")
        return self.boundary.excess(scores)

    def flag_scores(self, scores: SentinetScores) -> torch.Tensor:
        excess = self.excess(scores)  # raises when uncalibrated
        assert self.boundary is not None
        return excess > self.boundary.threshold

    def flag(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """True where an input lies above the benign curve by more than the threshold."""
        return self.flag_scores(self.score(x, generator=generator))


def detection_scores(boundary: SentinetBoundary, scores: SentinetScores) -> torch.Tensor:
    """Negated excess, for `iotbed.analysis.detection` (low = trojaned, flag when <= threshold)."""
    return -boundary.excess(scores)


@dataclass(frozen=True)
class SentinetVerdict:
    """Outcome of screening a candidate model on relayed frames (binomial rule of the STRIP screen)."""

    backdoored: bool
    p_value: float  # P(K >= n_flagged) under Binomial(n_frames, null_rate)
    n_frames: int
    n_flagged: int
    null_rate: float
    boundary: SentinetBoundary
    excess: torch.Tensor  # of the relayed frames: higher = more suspicious
    flagged: torch.Tensor  # bool, per relayed frame

    @property
    def flagged_fraction(self) -> float:
        return self.n_flagged / self.n_frames


def screen_update(
    model: nn.Module,
    frames: torch.Tensor,
    calibration: torch.Tensor,
    backgrounds: torch.Tensor,
    *,
    frr: float = 0.01,
    significance: float = 1e-3,
    n_pastes: int = 100,
    top_k: int = 3,
    saliency_threshold: float = 0.5,
    generator: torch.Generator | None = None,
) -> SentinetVerdict:
    """Decide whether `model` is backdoored from the `frames` a device relayed: boundary fitted for this
    model on clean `calibration` frames, then P(K >= flagged) under Binomial(n, max(frr, calibration
    FRR)) below `significance` (as `iotbed.defenses.strip.screen_update`)."""
    if not 0.0 < significance < 1.0:
        raise SentinetError(f"significance must be in (0, 1), got {significance}")
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise SentinetError(f"frames must be a non-empty batch (B, C, H, W), got {tuple(frames.shape)}")
    detector = SentinetDetector(
        model,
        backgrounds,
        n_pastes=n_pastes,
        top_k=top_k,
        saliency_threshold=saliency_threshold,
        generator=generator,
    )
    boundary = detector.calibrate(calibration, frr=frr)
    excess = detector.excess(detector.score(frames))
    flagged = excess > boundary.threshold
    k, n = int(flagged.sum()), int(flagged.numel())
    p0, p_value = flagged_count_test(k, n, boundary.frr, boundary.calibration_frr)
    return SentinetVerdict(p_value < significance, p_value, n, k, p0, boundary, excess, flagged)


def sentinet_report(
    detector: SentinetDetector,
    calibration: SentinetScores,
    benign: SentinetScores,
    trojaned: SentinetScores,
    frrs: Sequence[float] = (0.05, 0.02, 0.01),
) -> DetectionReport:
    """FAR at each preset FRR and AUROC, as `iotbed.analysis.detection.detection_report` gives them for
    STRIP: the curve is fitted on `calibration` (clean, not scored), each threshold is the empirical
    quantile of the calibration excesses, and FRR/FAR are measured on `benign` and `trojaned`."""
    boundary = detector.calibrate_scores(calibration, frr=min(frrs))
    return detection_report(
        detection_scores(boundary, calibration),
        detection_scores(boundary, benign),
        detection_scores(boundary, trojaned),
        frrs,
        method="quantile",
    )
