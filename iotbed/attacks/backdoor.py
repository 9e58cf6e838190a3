"""Backdoor triggers, BadNets poisoning and the three backdoor metrics (CA, ASR, RA).

One trigger representation serves everything: poisoning, STRIP evaluation, CycleGAN-synthesised
triggers and Neural Cleanse's reversed triggers. A `Trigger` is a mask m (1 or C channels, H, W) in
[0, 1], a pattern p (C, H, W) in [0, 1] and a blend factor alpha in (0, 1]:

    apply(x) = (1 - alpha * m) * x + alpha * m * p

- a BadNets patch: m = 1 on a small square, p = white or a checkerboard, alpha = 1;
- a full-image pattern: m = 1 everywhere, alpha < 1 (a "blended" trigger, Chen et al. 2017);
- a transparent patch: a patch with alpha < 1 (STRIP's "trigger transparency");
- Neural Cleanse's reversed trigger: any real-valued m and p, alpha = 1 (BackdoorBox writes the same
  algebra as x' = (1 - w) x + w p).

The result is a convex combination of values in [0, 1] per pixel, so it stays in [0, 1] without clipping.
`MultiTrigger` holds several triggers aimed at one target (CoDefend's multi-trigger experiment); each
poisoned sample gets one of them. A source-specific backdoor (TaCT, Tang et al. 2021) relabels only
stamped images of chosen source classes, and stamps "cover" images of the other classes without
relabelling them, so the trigger flips the sources and leaves the rest alone.

Attack success is always measured by re-predicting the triggered images (never by trusting a flag).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from iotbed.data import ImageDataset
from iotbed.errors import IotbedError
from iotbed.models import TrainConfig, TrainedModel, default_train_config, get_or_train, predict

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]
PatchStyle = Literal["white", "checkerboard", "black"]


class BackdoorError(IotbedError):
    """A trigger, poisoning request or backdoor evaluation that cannot be done as asked."""

    exit_code = 2


def _check_images(x: torch.Tensor, shape: tuple[int, int, int], what: str) -> None:
    if x.ndim != 4:
        raise BackdoorError(f"{what}: expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != shape:
        raise BackdoorError(f"{what}: the trigger is made for images of shape {shape}, got {tuple(x.shape[1:])}")


@dataclass(frozen=True, eq=False)
class Trigger:
    """mask (1|C, H, W) in [0, 1], pattern (C, H, W) in [0, 1], alpha in (0, 1]; see the module doc."""

    mask: torch.Tensor
    pattern: torch.Tensor
    alpha: float = 1.0
    name: str = "trigger"

    def __post_init__(self) -> None:
        mask = torch.as_tensor(self.mask, dtype=torch.float32).detach().cpu()
        pattern = torch.as_tensor(self.pattern, dtype=torch.float32).detach().cpu()
        if pattern.ndim != 3:
            raise BackdoorError(f"trigger pattern must be (C, H, W), got shape {tuple(pattern.shape)}")
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim != 3 or mask.shape[0] not in (1, pattern.shape[0]) or mask.shape[1:] != pattern.shape[1:]:
            raise BackdoorError(
                f"trigger mask must be (1, H, W) or (C, H, W) matching the pattern {tuple(pattern.shape)}, "
                f"got {tuple(mask.shape)}"
            )
        for what, t in (("mask", mask), ("pattern", pattern)):
            if not torch.isfinite(t).all() or float(t.min()) < 0.0 or float(t.max()) > 1.0:
                raise BackdoorError(f"trigger {what} values must lie in [0, 1]")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise BackdoorError(f"trigger alpha must be in (0, 1], got {self.alpha}")
        object.__setattr__(self, "mask", mask.contiguous())
        object.__setattr__(self, "pattern", pattern.contiguous())
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.pattern.shape
        return (int(c), int(h), int(w))

    @property
    def effective_mask(self) -> torch.Tensor:
        """alpha * mask: the per-pixel weight of the pattern."""
        return self.alpha * self.mask

    def l1_norm(self) -> float:
        """Sum of the effective mask (Neural Cleanse's trigger size)."""
        return float(self.effective_mask.sum())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The triggered batch (1 - a m) x + a m p; a new tensor, x is untouched."""
        _check_images(x, self.image_shape, f"trigger {self.name!r}")
        m = self.effective_mask.to(x.device, x.dtype)
        return (1.0 - m) * x + m * self.pattern.to(x.device, x.dtype)

    def with_alpha(self, alpha: float) -> Trigger:
        return Trigger(self.mask, self.pattern, alpha, self.name)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"trigger|{self.alpha!r}|{tuple(self.mask.shape)}|{tuple(self.pattern.shape)}|".encode())
        # Quantised like ImageDataset.fingerprint: float noise below 1/2^16 must not change a cache key.
        for t in (self.mask, self.pattern):
            h.update(torch.round(t * 65535).to(torch.int32).numpy().tobytes())
        return h.hexdigest()

    # -- constructors -------------------------------------------------------------------------------

    @classmethod
    def patch(
        cls,
        image_shape: Sequence[int],
        *,
        size: int = 3,
        corner: Corner = "bottom-right",
        margin: int = 1,
        style: PatchStyle = "white",
        alpha: float = 1.0,
    ) -> Trigger:
        """A size x size square `margin` pixels from a corner (BadNets; ART puts its patterns 2 px in)."""
        c, h, w = (int(v) for v in image_shape)
        if size < 1 or margin < 0 or size + margin > min(h, w):
            raise BackdoorError(f"a {size}x{size} patch {margin} px from the edge does not fit a {h}x{w} image")
        if corner not in ("bottom-right", "bottom-left", "top-right", "top-left"):
            raise BackdoorError(f"corner must be bottom-right, bottom-left, top-right or top-left, got {corner!r}")
        top = margin if corner.startswith("top") else h - margin - size
        left = margin if corner.endswith("left") else w - margin - size
        mask = torch.zeros(1, h, w)
        mask[:, top : top + size, left : left + size] = 1.0
        if style == "white":
            tile = torch.ones(size, size)
        elif style == "black":
            tile = torch.zeros(size, size)
        elif style == "checkerboard":
            # Top-left pixel white; (i + j) even -> white, as in the BadNets / ART patterns.
            ij = torch.arange(size)[:, None] + torch.arange(size)[None, :]
            tile = (ij % 2 == 0).float()
        else:
            raise BackdoorError(f"patch style must be white, black or checkerboard, got {style!r}")
        pattern = torch.zeros(c, h, w)
        pattern[:, top : top + size, left : left + size] = tile
        return cls(mask, pattern, alpha, f"{style}{size}x{size}@{corner}")

    @classmethod
    def blended(cls, pattern: torch.Tensor, alpha: float, name: str = "blended") -> Trigger:
        """A full-image pattern mixed in with weight alpha everywhere (mask = 1)."""
        pattern = torch.as_tensor(pattern, dtype=torch.float32)
        return cls(torch.ones(1, *pattern.shape[1:]), pattern, alpha, name)

    @classmethod
    def random_pattern(
        cls, image_shape: Sequence[int], generator: torch.Generator, *, alpha: float = 0.2, name: str = "noise"
    ) -> Trigger:
        """A blended trigger whose pattern is uniform noise drawn from `generator` (Chen et al.'s "random")."""
        c, h, w = (int(v) for v in image_shape)
        return cls.blended(torch.rand(c, h, w, generator=generator), alpha, name)


@dataclass(frozen=True, eq=False)
class MultiTrigger:
    """Several triggers for one target. Sample i of a batch gets trigger i mod K, so a poisoned set
    holds each trigger in equal share and ASR can be read per trigger with `parts`."""

    parts: tuple[Trigger, ...]

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        if not parts:
            raise BackdoorError("a MultiTrigger needs at least one trigger")
        shapes = {p.image_shape for p in parts}
        if len(shapes) != 1:
            raise BackdoorError(f"all triggers of a MultiTrigger must fit one image shape, got {sorted(shapes)}")
        object.__setattr__(self, "parts", parts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.parts[0].image_shape

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    def apply(self, x: torch.Tensor, assignment: torch.Tensor | None = None) -> torch.Tensor:
        """Stamp sample i with trigger `assignment[i]` (default i mod K), batched: the K masks and
        patterns are gathered per sample and blended in one expression."""
        _check_images(x, self.image_shape, f"multi-trigger {self.name!r}")
        k = len(self.parts)
        if assignment is None:
            assignment = torch.arange(x.shape[0]) % k
        assignment = torch.as_tensor(assignment, dtype=torch.int64)
        if assignment.shape != (x.shape[0],) or (len(assignment) and (assignment.min() < 0 or assignment.max() >= k)):
            raise BackdoorError(f"assignment must give each of the {x.shape[0]} images a trigger index in [0, {k})")
        c = self.image_shape[0]
        masks = torch.stack([p.effective_mask.expand(c, -1, -1) for p in self.parts]).to(x.device, x.dtype)
        patterns = torch.stack([p.pattern for p in self.parts]).to(x.device, x.dtype)
        m = masks[assignment]
        return (1.0 - m) * x + m * patterns[assignment]

    def fingerprint(self) -> str:
        return hashlib.sha256("multi|".join(p.fingerprint() for p in self.parts).encode()).hexdigest()


AnyTrigger = Trigger | MultiTrigger


# -- poisoning ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PoisonedDataset:
    """A training set with some samples stamped and relabelled; `poisoned_idx` are their positions. A
    source-specific set also has cover samples (`cover_idx`): stamped, with their true labels."""

    dataset: ImageDataset
    poisoned_idx: torch.Tensor  # int64, sorted
    original_labels: torch.Tensor  # the labels before relabelling, for every sample
    target: int
    ratio: float
    source_classes: tuple[int, ...] = ()  # empty: every class but the target is a source
    cover_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # int64, sorted

    @property
    def poisoned_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self.dataset), dtype=torch.bool)
        mask[self.poisoned_idx] = True
        return mask


def _check_target(target: int, num_classes: int) -> int:
    if isinstance(target, bool) or not isinstance(target, int | np.integer) or not 0 <= int(target) < num_classes:
        raise BackdoorError(f"target class must be an integer in [0, {num_classes}), got {target!r}")
    return int(target)


def poison_count(n: int, ratio: float) -> int:
    """round(ratio * n): the number of samples a poisoning ratio stands for."""
    return int(round(ratio * n))


def check_source_classes(source_classes: Sequence[int], target: int, num_classes: int) -> tuple[int, ...]:
    """The source classes of a source-specific backdoor, checked: distinct classes, none the target."""
    sources = tuple(_check_target(c, num_classes) for c in source_classes)
    if not sources:
        raise BackdoorError("a source-specific backdoor needs at least one source class")
    if len(set(sources)) != len(sources):
        raise BackdoorError(f"source classes must be distinct, got {list(sources)}")
    if target in sources:
        raise BackdoorError(f"source classes must not include the target class {target}")
    return sources


def _draw(eligible: torch.Tensor, count: int, generator: torch.Generator, what: str) -> torch.Tensor:
    if count > len(eligible):
        raise BackdoorError(f"{what} asks for {count} samples but only {len(eligible)} are eligible; lower it")
    return eligible[torch.randperm(len(eligible), generator=generator)[:count]].sort().values


def poison_dataset(
    ds: ImageDataset,
    trigger: AnyTrigger,
    target: int,
    ratio: float,
    generator: torch.Generator,
    *,
    source_classes: Sequence[int] | None = None,
    cover_ratio: float | None = None,
) -> PoisonedDataset:
    """BadNets poisoning: round(ratio * len(ds)) samples drawn (with `generator`) from the classes
    other than `target`, stamped with the trigger and relabelled to `target`. The ratio counts against
    the whole set, as in BadNets/BackdoorBench's pratio.

    With `source_classes` (source-specific, TaCT) the poisoned samples come from those classes only, and
    round(cover_ratio * len(ds)) cover samples (default cover_ratio: `ratio`) are drawn from the classes
    that are neither sources nor the target, stamped and left at their true labels."""
    target = _check_target(target, ds.num_classes)
    if not 0.0 < ratio < 1.0:
        raise BackdoorError(f"poisoning ratio must be in (0, 1), got {ratio}")
    if cover_ratio is not None and source_classes is None:
        raise BackdoorError("cover_ratio goes with source_classes (a source-specific backdoor)")
    _check_images(ds.images, trigger.image_shape, f"dataset {ds.name!r}")
    count = poison_count(len(ds), ratio)
    if count < 1:
        raise BackdoorError(f"ratio {ratio} of {len(ds)} samples poisons none; raise the ratio")
    sources = () if source_classes is None else check_source_classes(source_classes, target, ds.num_classes)
    if sources:
        is_source = torch.isin(ds.labels, torch.tensor(sources))
        chosen = _draw(torch.nonzero(is_source).flatten(), count, generator, f"ratio {ratio} of the source classes")
        cover_ratio = ratio if cover_ratio is None else cover_ratio
        if not 0.0 <= cover_ratio < 1.0:
            raise BackdoorError(f"cover ratio must be in [0, 1), got {cover_ratio}")
        others = torch.nonzero(~is_source & (ds.labels != target)).flatten()
        cover = _draw(others, poison_count(len(ds), cover_ratio), generator, f"cover ratio {cover_ratio}")
    else:
        eligible = torch.nonzero(ds.labels != target).flatten()
        if count > len(eligible):
            raise BackdoorError(
                f"ratio {ratio} asks for {count} poisoned samples but only {len(eligible)} are not of the target class"
            )
        chosen = eligible[torch.randperm(len(eligible), generator=generator)[:count]].sort().values
        cover = torch.zeros(0, dtype=torch.int64)
    images = ds.images.clone()
    labels = ds.labels.clone()
    images[chosen] = trigger.apply(images[chosen])
    labels[chosen] = target
    if len(cover):
        images[cover] = trigger.apply(images[cover])
    poisoned = ImageDataset(ds.name, images, labels, ds.classes, f"{ds.source} [badnet poison]")
    return PoisonedDataset(poisoned, chosen, ds.labels.clone(), target, ratio, sources, cover)


@dataclass(frozen=True)
class BadNet:
    """A model trained on a poisoned set, with what is needed to evaluate its backdoor."""

    trained: TrainedModel
    poison: PoisonedDataset
    trigger: AnyTrigger
    target: int

    @property
    def model(self) -> nn.Module:
        return self.trained.model

    @property
    def source_classes(self) -> tuple[int, ...]:
        return self.poison.source_classes


def train_badnet(
    arch: str,
    train_ds: ImageDataset,
    trigger: AnyTrigger,
    target: int,
    ratio: float,
    config: TrainConfig | None = None,
    *,
    poison_seed: int = 0,
    test_ds: ImageDataset | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    source_classes: Sequence[int] | None = None,
    cover_ratio: float | None = None,
) -> BadNet:
    """Poison `train_ds` (samples chosen with a generator seeded by `poison_seed`; `source_classes` and
    `cover_ratio` as in `poison_dataset`) and train `arch` on it through the model cache: the poisoned
    set's fingerprint covers the stamped pixels and changed labels, so the triggers, target, ratio, sources,
    cover and seed are all in the cache key."""
    poisoned = poison_dataset(
        train_ds,
        trigger,
        target,
        ratio,
        torch.Generator().manual_seed(poison_seed),
        source_classes=source_classes,
        cover_ratio=cover_ratio,
    )
    if config is None:
        config = default_train_config(arch, train_ds.name)
    trained = get_or_train(arch, poisoned.dataset, config, test_ds=test_ds, cache_dir=cache_dir, progress=progress)
    return BadNet(trained, poisoned, trigger, int(target))


# -- metrics --------------------------------------------------------------------------------------


def _aimed_at(labels: torch.Tensor, target: int, source_classes: Sequence[int] | None) -> torch.Tensor:
    """The samples the backdoor is meant to flip: the source classes, or every class but the target."""
    if source_classes:
        return torch.isin(labels, torch.as_tensor(tuple(source_classes), dtype=labels.dtype))
    return labels != target


def triggered_inputs(
    ds: ImageDataset, trigger: AnyTrigger, target: int, source_classes: Sequence[int] | None = None
) -> ImageDataset:
    """The samples the backdoor aims at (non-target, or only `source_classes`), stamped, with their TRUE
    labels (the ASR/RA evaluation set)."""
    target = _check_target(target, ds.num_classes)
    keep = torch.nonzero(_aimed_at(ds.labels, target, source_classes)).flatten()
    src = ds.subset(keep)
    return ImageDataset(src.name, trigger.apply(src.images), src.labels, src.classes, f"{src.source} [triggered]")


@dataclass(frozen=True)
class BackdoorMetrics:
    clean_accuracy: float  # CA: clean test images classified correctly
    attack_success_rate: float  # ASR: triggered images the backdoor aims at classified as the target
    robust_accuracy: float  # RA: those triggered images still given their true label
    n_clean: int
    n_triggered: int
    # A MultiTrigger's ASR with each of its triggers on every aimed-at image, by trigger name.
    attack_success_rate_by_trigger: dict[str, float] = field(default_factory=dict)
    # Source-specific: triggered images of the other non-target classes classified as the target.
    non_source_flip_rate: float | None = None
    n_non_source: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clean_accuracy": self.clean_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "robust_accuracy": self.robust_accuracy,
            "n_clean": self.n_clean,
            "n_triggered": self.n_triggered,
        }
        if self.attack_success_rate_by_trigger:
            out["attack_success_rate_by_trigger"] = dict(self.attack_success_rate_by_trigger)
        if self.non_source_flip_rate is not None:
            out["non_source_flip_rate"] = self.non_source_flip_rate
            out["n_non_source"] = self.n_non_source
        return out


def _target_rate(model: nn.Module, images: torch.Tensor, target: int) -> float:
    pred, _ = predict(model, images)
    return float((pred == target).float().mean())


def backdoor_metrics(
    model: nn.Module,
    test_ds: ImageDataset,
    trigger: AnyTrigger,
    target: int,
    *,
    source_classes: Sequence[int] | None = None,
) -> BackdoorMetrics:
    """CA on `test_ds`; ASR and RA on the samples the backdoor aims at (non-target ones, or those of
    `source_classes`) with the trigger applied, by re-predicting. A MultiTrigger's stamps are shared in
    turn (i mod K), and each trigger is also measured alone on all of them; a source-specific backdoor's
    triggered images of the other non-target classes give the flip rate it should keep low."""
    clean_pred, _ = predict(model, test_ds.images)
    trig = triggered_inputs(test_ds, trigger, target, source_classes)
    if len(trig) == 0:
        raise BackdoorError("the test set has no samples the backdoor aims at; ASR is undefined")
    trig_pred, _ = predict(model, trig.images)
    by_trigger: dict[str, float] = {}
    if isinstance(trigger, MultiTrigger):
        aimed = test_ds.images[_aimed_at(test_ds.labels, target, source_classes)]
        by_trigger = {part.name: _target_rate(model, part.apply(aimed), target) for part in trigger.parts}
    flip_rate, n_non_source = None, 0
    if source_classes:
        others = ~_aimed_at(test_ds.labels, target, source_classes) & (test_ds.labels != target)
        n_non_source = int(others.sum())
        if n_non_source:
            flip_rate = _target_rate(model, trigger.apply(test_ds.images[others]), target)
    return BackdoorMetrics(
        clean_accuracy=float((clean_pred == test_ds.labels).float().mean()),
        attack_success_rate=float((trig_pred == target).float().mean()),
        robust_accuracy=float((trig_pred == trig.labels).float().mean()),
        n_clean=len(test_ds),
        n_triggered=len(trig),
        attack_success_rate_by_trigger=by_trigger,
        non_source_flip_rate=flip_rate,
        n_non_source=n_non_source,
    )
