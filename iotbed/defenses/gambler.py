"""Deep Gamblers (Liu et al., NeurIPS 2019) as a trained selector for the edge's reject option.

The gambler is the deployed architecture with one extra output, the abstention (the last of m + 1). It is
trained with the gamblers' loss -log(p_y + p_abstain / o): a bet on the right class pays the reward o, the
abstention pays back the stake, so the network learns to put its mass on abstaining where it expects to
be wrong. Its confidence in a frame is 1 - p_abstain; the deployed model still gives the answer.

Training follows the authors' code (Z-T-WANG/NIPS2019DeepGamblers): cross-entropy pre-training on the
first m outputs only (the abstention output is left out of the softmax, so it is not pushed down before
the gamble starts), then the gamblers' loss, fine-tuning the same weights. Both phases run through
`iotbed.models.training.train_model` with the architecture's default config, so the seed fixes the result.
The trained network is cached as safetensors in `<cache dir>/gamblers/<key>.safetensors` with a JSON beside
it; the key covers everything the weights depend on.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from iotbed.errors import ModelError
from iotbed.models import training
from iotbed.models.architectures import ImageClassifier, ModelSpec, resolve_arch
from iotbed.models.cache import (
    CACHE_FORMAT_VERSION,
    cache_folder,
    load_cached,
    read_json,
    spec_for_dataset,
    write_json_atomic,
)
from iotbed.models.defaults import default_train_config
from iotbed.models.flops import count_flops
from iotbed.models.store import save_model
from iotbed.models.training import LabeledImages, TrainConfig, TrainReport

log = logging.getLogger(__name__)

# Bump when a change to the training here makes old cache entries wrong.
GAMBLER_CACHE_VERSION = 1
# Share of the epochs spent on cross-entropy pre-training when the config leaves it open: the authors'
# 100 of 300 for a low reward (o < 6.1 on CIFAR-10).
DEFAULT_PRETRAIN_SHARE = 1 / 3


class GamblerError(ModelError, ValueError):
    """A Deep Gamblers setting that cannot work (a reward out of range, more pre-training than training)."""


@dataclass(frozen=True)
class GamblerConfig:
    reward: float = 2.2  # o; must satisfy 1 < o <= number of classes
    epochs: int | None = None  # all epochs, pre-training included; None: the arch's default training epochs
    pretrain_epochs: int | None = None  # cross-entropy epochs first; None: a third of the epochs
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.reward) and self.reward > 1):
            raise GamblerError(f"the reward o must be a number above 1 (got {self.reward})")
        if self.epochs is not None and self.epochs < 1:
            raise GamblerError(f"epochs must be >= 1 (got {self.epochs})")
        if self.pretrain_epochs is not None and self.pretrain_epochs < 0:
            raise GamblerError(f"pretrain_epochs must be >= 0 (got {self.pretrain_epochs})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise GamblerError(f"seed must be a whole number >= 0 (got {self.seed!r})")


@dataclass(frozen=True)
class Gambler:
    model: ImageClassifier  # m + 1 outputs, in eval mode
    num_classes: int  # m
    flops_per_image: int  # of one forward pass
    key: str = ""
    path: Path | None = None
    trained_now: bool = False  # False when the weights came from the cache
    train_wall_time_s: float | None = None  # of the training run that made the weights, when known

    def abstain_probability(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) p_abstain: the softmax over all m + 1 outputs, last entry."""
        _, probs = training.predict(self.model, images)
        return probs[:, self.num_classes]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) the gambler's own class: the argmax over the first m outputs."""
        _, probs = training.predict(self.model, images)
        return probs[:, : self.num_classes].argmax(1)


def check_reward(reward: float, num_classes: int) -> None:
    """GamblerError unless 1 < o <= m: at o <= 1 abstaining always pays at least as well as any bet, and at
    o > m betting 1/m on every class beats abstaining, so the abstention output is never used."""
    if not (math.isfinite(reward) and 1 < reward <= num_classes):
        raise GamblerError(f"the reward o must satisfy 1 < o <= {num_classes} (the number of classes); got {reward}")


def gambler_loss(logits: torch.Tensor, labels: torch.Tensor, reward: float) -> torch.Tensor:
    """Mean over the batch of -log(p_y + p_abstain / o), p the softmax over the m + 1 logits (abstention last).

    In log space: log(p_y + p_abstain / o) = logsumexp(z_y, z_abstain - log o) - logsumexp(z), finite for any
    finite logits, where the probabilities themselves would underflow to zero.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise GamblerError(
            f"expected logits (N, m + 1) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    check_reward(reward, logits.shape[1] - 1)
    true_class = logits.gather(1, labels.long().unsqueeze(1))
    abstain = logits[:, -1:] - math.log(reward)
    payout = torch.logsumexp(torch.cat([true_class, abstain], dim=1), dim=1)
    return (torch.logsumexp(logits, dim=1) - payout).mean()


def class_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the first m outputs, abstention left out: the authors' pre-training loss."""
    return F.cross_entropy(logits[:, :-1], labels)


def _phase_epochs(config: GamblerConfig, default_epochs: int) -> tuple[int, int]:
    """(all epochs, pre-training epochs); at least one epoch must be left for the gamblers' loss."""
    epochs = default_epochs if config.epochs is None else config.epochs
    pretrain = round(epochs * DEFAULT_PRETRAIN_SHARE) if config.pretrain_epochs is None else config.pretrain_epochs
    if pretrain >= epochs:
        raise GamblerError(
            f"pretrain_epochs ({pretrain}) must be below epochs ({epochs}): the gamblers' loss needs at least one epoch"
        )
    return epochs, pretrain


def gambler_cache_key(
    spec: ModelSpec, dataset_fingerprint: str, base: TrainConfig, reward: float, epochs: int, pretrain: int
) -> str:
    payload = {
        "gambler_version": GAMBLER_CACHE_VERSION,
        "models_version": CACHE_FORMAT_VERSION,  # architecture and training changes invalidate these too
        "dataset": dataset_fingerprint,
        "model_spec": dataclasses.asdict(spec),
        "train_config": base.to_json(),  # holds the seed
        "reward": reward,
        "epochs": epochs,
        "pretrain_epochs": pretrain,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _train(
    spec: ModelSpec, train_ds: LabeledImages, base: TrainConfig, reward: float, pretrain: int, progress: bool
) -> tuple[ImageClassifier, list[TrainReport]]:
    model = spec.build()
    reports = []
    if pretrain > 0:
        config = dataclasses.replace(base, epochs=pretrain)
        reports.append(training.train_model(model, train_ds, config, progress=progress, loss=class_cross_entropy))
    gamble = dataclasses.replace(base, epochs=base.epochs - pretrain)
    loss = functools.partial(gambler_loss, reward=reward)
    # Without pre-training the gamble starts from the seed's initialisation; after it, it fine-tunes.
    reports.append(training.train_model(model, train_ds, gamble, progress=progress, reinit=pretrain == 0, loss=loss))
    return model, reports


def get_or_train_gambler(
    arch: str,
    train_ds: LabeledImages,
    config: GamblerConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Gambler:
    """The Deep Gamblers network of `arch` for `train_ds`, from the cache or trained now and cached.

    Training uses `default_train_config(arch, train_ds.name)` with `config`'s seed and epochs: first
    `pretrain_epochs` of cross-entropy on the m class outputs, then the gamblers' loss for the rest.
    """
    arch = resolve_arch(arch)
    class_spec = spec_for_dataset(arch, train_ds)
    check_reward(config.reward, class_spec.num_classes)
    default = default_train_config(arch, str(getattr(train_ds, "name", "")))
    epochs, pretrain = _phase_epochs(config, default.epochs)
    base = dataclasses.replace(default, epochs=epochs, seed=config.seed)
    spec = dataclasses.replace(class_spec, num_classes=class_spec.num_classes + 1)
    fingerprint = train_ds.fingerprint()
    key = gambler_cache_key(spec, fingerprint, base, config.reward, epochs, pretrain)

    folder = cache_folder(cache_dir, "gamblers")
    path = folder / f"{key}.safetensors"
    info_path = folder / f"{key}.json"

    model = load_cached(path, arch, key)
    trained_now = model is None
    if model is None:
        model, reports = _train(spec, train_ds, base, config.reward, pretrain, progress)
        save_model(path, model, {"cache_key": key, "dataset_fingerprint": fingerprint, "train_config": base.to_json()})
        info = _info(key, arch, spec, train_ds, fingerprint, base, config.reward, pretrain, reports)
        try:
            write_json_atomic(info_path, info)
        except OSError as exc:
            log.warning("could not write %s: %s", info_path, exc)
    else:
        info = read_json(info_path)
    wall = info.get("train_wall_time_s")
    return Gambler(
        model=model.eval(),
        num_classes=class_spec.num_classes,
        flops_per_image=count_flops(model, (spec.in_channels, spec.image_size, spec.image_size)),
        key=key,
        path=path,
        trained_now=trained_now,
        train_wall_time_s=float(wall) if isinstance(wall, (int, float)) else None,
    )


def _info(
    key: str,
    arch: str,
    spec: ModelSpec,
    train_ds: LabeledImages,
    fingerprint: str,
    base: TrainConfig,
    reward: float,
    pretrain: int,
    reports: list[TrainReport],
) -> dict[str, Any]:
    return {
        "key": key,
        "kind": "deep_gamblers",
        "arch": arch,
        "model_args": dataclasses.asdict(spec),
        "dataset": str(getattr(train_ds, "name", "")),
        "dataset_fingerprint": fingerprint,
        "train_config": base.to_dict(),
        "reward": reward,
        "epochs": base.epochs,
        "pretrain_epochs": pretrain,
        "train_wall_time_s": sum(r.wall_time_s for r in reports),
        "phases": [
            {"loss": "cross_entropy" if i < len(reports) - 1 else "gamblers", **r.to_dict()}
            for i, r in enumerate(reports)
        ],
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
