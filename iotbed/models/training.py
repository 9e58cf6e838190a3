"""Deterministic training, evaluation and batched prediction on in-memory image tensors.

Every random draw of a training run (weight init, shuffling, augmentation, dropout) comes from
`config.seed`, so the same seed gives bit-identical weights on the same CPU build and thread count.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from iotbed.errors import ModelError

Optimizer = Literal["adam", "sgd"]
Schedule = Literal["none", "cosine", "step"]
Augmentation = Literal["none", "shift"]

# Pixels a "shift" augmentation may move an image in x and y.
MAX_SHIFT = 2

# A training objective: (logits (N, K), labels (N,)) -> scalar loss to minimise.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A loss that also sees which training samples are in the batch (their indices into the training set).
IndexedLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LabeledImages(Protocol):
    """What training needs from a dataset; `iotbed.data.ImageDataset` satisfies it."""

    @property
    def images(self) -> torch.Tensor: ...  # float32 (N, C, H, W) in [0, 1]

    @property
    def labels(self) -> torch.Tensor: ...  # int64 (N,)

    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run. Part of the model cache key, so keep it plain data."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: Optimizer = "adam"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    lr_schedule: Schedule = "none"
    step_milestones: tuple[int, ...] = ()  # epochs after which "step" multiplies the lr by step_gamma
    step_gamma: float = 0.1
    seed: int = 0
    augmentation: Augmentation = "none"

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; normalise so equality and hashing still hold.
        object.__setattr__(self, "step_milestones", tuple(int(m) for m in self.step_milestones))
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.optimizer not in ("adam", "sgd"):
            problems.append(f"optimizer must be 'adam' or 'sgd' (got {self.optimizer!r})")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1) (got {self.momentum})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0 (got {self.weight_decay})")
        if self.lr_schedule not in ("none", "cosine", "step"):
            problems.append(f"lr_schedule must be 'none', 'cosine' or 'step' (got {self.lr_schedule!r})")
        if list(self.step_milestones) != sorted(set(self.step_milestones)) or any(m < 1 for m in self.step_milestones):
            problems.append(f"step_milestones must be increasing epochs >= 1 (got {list(self.step_milestones)})")
        if not 0 < self.step_gamma <= 1:
            problems.append(f"step_gamma must be in (0, 1] (got {self.step_gamma})")
        if self.augmentation not in ("none", "shift"):
            problems.append(f"augmentation must be 'none' or 'shift' (got {self.augmentation!r})")
        if problems:
            raise ModelError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        return d

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): stable input for cache keys."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ModelError(f"unknown training config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def lr_at(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
        """Learning rate for a step (epoch counts from 0). Cosine decays per step, step per epoch."""
        if self.lr_schedule == "cosine":
            progress = (epoch * steps_per_epoch + step_in_epoch) / (self.epochs * steps_per_epoch)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_schedule == "step":
            return self.lr * self.step_gamma ** sum(1 for m in self.step_milestones if epoch >= m)
        return self.lr


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # from 1
    loss: float  # mean training loss over the epoch (with augmentation and dropout)
    train_accuracy: float  # on the augmented batches as seen during training
    val_accuracy: float | None
    lr: float  # at the end of the epoch
    wall_time_s: float


@dataclass(frozen=True)
class TrainReport:
    config: TrainConfig
    epochs: tuple[EpochStats, ...]
    wall_time_s: float
    num_train: int

    @property
    def final_loss(self) -> float:
        return self.epochs[-1].loss

    @property
    def final_val_accuracy(self) -> float | None:
        return self.epochs[-1].val_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "epochs": [asdict(e) for e in self.epochs],
            "wall_time_s": self.wall_time_s,
            "num_train": self.num_train,
        }


def _check_dataset(ds: LabeledImages, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = ds.images, ds.labels
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ModelError(
            f"{what}: expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if images.shape[0] == 0:
        raise ModelError(f"{what} is empty")
    return images.float(), labels.long()


def check_input_shape(model: nn.Module, images: torch.Tensor) -> None:
    """ModelError if `images` cannot feed `model` (for models that record their input shape)."""
    in_channels = getattr(model, "in_channels", None)
    image_size = getattr(model, "image_size", None)
    if in_channels is None or image_size is None:
        return
    if tuple(images.shape[1:]) != (in_channels, image_size, image_size):
        raise ModelError(
            f"images of shape {tuple(images.shape[1:])} do not fit a model built for "
            f"{(in_channels, image_size, image_size)} (channels, height, width)"
        )


def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise Conv2d, Linear and BatchNorm layers as PyTorch does, drawing from `generator`."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # PyTorch's default: kaiming_uniform(a=sqrt(5)) and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Each image moved by its own random (dx, dy) in [-max_shift, max_shift], edges replicated."""
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (n, 1, 1, w)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed the global CPU RNG for the run (dropout takes no generator argument) and give the
    caller's RNG state back afterwards. CPU kernels are deterministic for a fixed thread count, so
    nothing else needs pinning."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def train_model(
    model: nn.Module,
    train_ds: LabeledImages,
    config: TrainConfig,
    *,
    val_ds: LabeledImages | None = None,
    progress: bool = True,
    reinit: bool = True,
    loss: LossFn = F.cross_entropy,
    indexed_loss: IndexedLossFn | None = None,
) -> TrainReport:
    """Train `model` in place on the CPU with `loss(logits, labels)` (cross-entropy unless given) and
    return per-epoch statistics. With `indexed_loss`, `indexed_loss(logits, labels, indices)` replaces it,
    for losses with per-sample targets besides the label (distillation).

    With `reinit` (the default) the weights are first re-initialised from `config.seed`, which makes
    the result depend on the seed alone; pass `reinit=False` to fine-tune an already-trained model.
    The model is left in eval mode. `val_ds`, if given, is evaluated after every epoch.
    """
    images, labels = _check_dataset(train_ds, "training set")
    check_input_shape(model, images)
    num_classes = getattr(model, "num_classes", None)
    if int(labels.min()) < 0 or (num_classes is not None and int(labels.max()) >= num_classes):
        raise ModelError(
            f"training labels span {int(labels.min())}..{int(labels.max())} but the model has {num_classes} classes"
        )
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    generator = torch.Generator().manual_seed(config.seed)
    # One draw for the global RNG (dropout); the rest of the stream drives init, shuffling, augmentation.
    dropout_seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    start = time.perf_counter()
    history: list[EpochStats] = []
    with _seeded_global_rng(dropout_seed):
        if reinit:
            init_weights(model, generator)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if config.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            # Nesterov momentum whenever there is momentum: a free, usually small, gain.
            optimizer = torch.optim.SGD(
                params,
                lr=config.lr,
                momentum=config.momentum,
                weight_decay=config.weight_decay,
                nesterov=config.momentum > 0,
            )
        bar = tqdm(
            total=config.epochs * steps_per_epoch,
            desc=f"train {type(model).__name__}",
            unit="batch",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
            leave=False,
        )
        try:
            for epoch in range(config.epochs):
                epoch_start = time.perf_counter()
                model.train()
                order = torch.randperm(n, generator=generator)
                loss_sum = 0.0
                correct = 0
                lr = config.lr
                for step in range(steps_per_epoch):
                    idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                    x, y = images[idx], labels[idx]
                    if config.augmentation == "shift":
                        x = random_shift(x, generator)
                    lr = config.lr_at(epoch, step, steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    logits = model(x)
                    batch_loss = loss(logits, y) if indexed_loss is None else indexed_loss(logits, y, idx)
                    if not torch.isfinite(batch_loss):
                        raise ModelError(
                            f"training diverged (loss {batch_loss.item()}) in epoch {epoch + 1}; lower the learning rate"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    batch_loss.backward()
                    optimizer.step()
                    loss_sum += batch_loss.item() * len(idx)
                    correct += int((logits.argmax(1) == y).sum())
                    bar.set_postfix_str(
                        f"epoch {epoch + 1}/{config.epochs} loss {batch_loss.item():.3f}", refresh=False
                    )
                    bar.update(1)
                val_acc = evaluate(model, val_ds) if val_ds is not None else None
                history.append(
                    EpochStats(
                        epoch=epoch + 1,
                        loss=loss_sum / n,
                        train_accuracy=correct / n,
                        val_accuracy=val_acc,
                        lr=lr,
                        wall_time_s=time.perf_counter() - epoch_start,
                    )
                )
        finally:
            bar.close()
    model.eval()
    return TrainReport(config=config, epochs=tuple(history), wall_time_s=time.perf_counter() - start, num_train=n)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block (BatchNorm's running statistics, no dropout), every submodule given
    back its own mode afterwards. Not `train(was_training)`: a wrapper built in training mode around frozen
    eval-mode networks would switch them to training mode on the way out."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    with evaluating(model), torch.inference_mode():
        yield


def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels (int64, (N,)) and softmax probabilities (float32, (N, classes)) in batches."""
    if images.ndim != 4:
        raise ModelError(f"predict expects images (N, C, H, W), got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1 (got {batch_size})")
    check_input_shape(model, images)
    probs = []
    with _eval_mode(model):
        for start in range(0, max(images.shape[0], 1), batch_size):
            batch = images[start : start + batch_size].float()
            probs.append(torch.softmax(model(batch), dim=1))
    p = torch.cat(probs)
    return p.argmax(1), p


def evaluate(model: nn.Module, ds: LabeledImages, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on `ds`."""
    images, labels = _check_dataset(ds, "evaluation set")
    pred, _ = predict(model, images, batch_size)
    return float((pred == labels).float().mean())
