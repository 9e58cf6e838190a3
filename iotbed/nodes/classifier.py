"""The classifier an edge server runs: its input defenses, a model version, batched inference, a detector
that may overrule the model (Defed), and a cache of what cannot change.

A whole frame with the untouched dataset image gives the same prediction every time for a given model
version when the defenses are deterministic (or absent), so every dataset image is classified once, in
batches, when a model version is put in service, and reused. Everything else goes through the defenses
and the model for real: frames with changed pixels, pixel-dropped frames (each has its own mask) and any
frame when a defense is random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from iotbed.defenses.defed import DefedEnsemble
from iotbed.defenses.pipeline import DefenseChain
from iotbed.defenses.reject import FrameScorer
from iotbed.nodes.payloads import Frame


@dataclass(frozen=True, eq=False)
class Guard:
    """A detector in front of the model that flags frames and relabels the flagged ones (Defed), with the clean
    calibration images its thresholds are refitted on whenever the model changes."""

    ensemble: DefedEnsemble
    calibration: torch.Tensor
    calibration_labels: torch.Tensor | None = None

    def behind(self, model: nn.Module) -> Guard:
        if model is self.ensemble.classifier:
            return self
        return Guard(
            self.ensemble.behind(model, self.calibration, self.calibration_labels),
            self.calibration,
            self.calibration_labels,
        )

    def calibration_scores(self) -> np.ndarray:
        """The detection scores of the calibration images (those the thresholds were fitted on)."""
        scores = self.ensemble.calibration_scores(self.calibration, self.calibration_labels)
        return self.ensemble.detection_score(scores).numpy()


class EdgeClassifier:
    def __init__(
        self,
        model: nn.Module,
        version: int,
        flops_per_image: float,
        images: torch.Tensor,
        defense: DefenseChain | None = None,
        generator: torch.Generator | None = None,
        scorer: FrameScorer | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.images = images  # the dataset the cameras capture from, (N, C, H, W) in [0, 1]
        self.defense = defense if defense is not None and defense.stages else None
        if self.defense is not None and self.defense.randomized and generator is None:
            raise ValueError("a random defense needs a torch.Generator")
        self.generator = generator
        shape = tuple(int(s) for s in images.shape[1:])
        self.model_flops = flops_per_image
        self.defense_flops = self.defense.flops_per_image(shape) if self.defense is not None else 0.0  # type: ignore[arg-type]
        self.scorer = scorer  # the reject option's confidence score (`iotbed.defenses.reject`), if any
        self.score_flops = scorer.extra_flops(flops_per_image) if scorer is not None else 0.0
        self.guard = guard
        self.guard_flops = float(guard.ensemble.flops_per_image(shape)) if guard is not None else 0.0
        self.flops_per_image = self.model_flops + self.defense_flops + self.score_flops + self.guard_flops
        self._cacheable = (self.defense is None or not self.defense.randomized) and not (scorer and scorer.randomized)
        self.last_scores: np.ndarray | None = None  # the scores of the last `predict`'s frames
        self.last_detection: np.ndarray | None = None  # the guard's detection scores of those frames (> 1: flagged)
        self.swap(model, version)

    def swap(self, model: nn.Module, version: int) -> None:
        self.model = model.eval()
        self.version = version
        if self.guard is not None:
            self.guard = self.guard.behind(self.model)
        if self._cacheable:
            runs = [self._run(self._defend(chunk)) for chunk in self.images.split(1024)]
            self._cached = np.concatenate([labels for labels, _, _ in runs])
            self._cached_scores = np.concatenate([scores for _, scores, _ in runs]) if self.scorer else None
            self._cached_detection = np.concatenate([d for _, _, d in runs]) if self.guard else None

    def _defend(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense(x, self.generator) if self.defense is not None else x

    def predict(self, frames: list[Frame]) -> np.ndarray:
        """The predicted labels; with a score, their confidence scores are in `last_scores`."""
        n = len(frames)
        predictions = np.empty(n, dtype=np.int64)
        scores = np.empty(n, dtype=np.float64) if self.scorer else None
        detection = np.empty(n, dtype=np.float64) if self.guard else None
        pristine = (
            np.fromiter((f.pixels is None and f.drop is None and f.mask is None for f in frames), dtype=bool, count=n)
            if self._cacheable
            else np.zeros(n, dtype=bool)
        )
        if pristine.any():
            indices = np.fromiter((f.image_index for f in frames), dtype=np.int64, count=n)[pristine]
            predictions[pristine] = self._cached[indices]
            if scores is not None and self._cached_scores is not None:
                scores[pristine] = self._cached_scores[indices]
            if detection is not None and self._cached_detection is not None:
                detection[pristine] = self._cached_detection[indices]
        if not pristine.all():
            labels, fresh, detected = self._run_frames([f for f, p in zip(frames, pristine.tolist()) if not p])
            predictions[~pristine] = labels
            if scores is not None and fresh is not None:
                scores[~pristine] = fresh
            if detection is not None and detected is not None:
                detection[~pristine] = detected
        self.last_scores = scores
        self.last_detection = detection
        return predictions

    def _run_frames(self, frames: list[Frame]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        x = torch.from_numpy(
            np.stack([f.pixels if f.pixels is not None else self.images[f.image_index].numpy() for f in frames])
        ).float()
        masks = [f.drop_mask() for f in frames]
        dropped = torch.tensor([m is not None for m in masks])
        mask_tensor = None
        if bool(dropped.any()):
            _, _, h, w = x.shape
            blank = np.zeros((h, w), dtype=bool)
            mask_tensor = torch.from_numpy(np.stack([m if m is not None else blank for m in masks]))
            x = x.masked_fill(mask_tensor[:, None], 0.0)  # what arrives: dropped pixels are not sent
        if self.defense is not None:
            with torch.no_grad():
                x = self.defense.forward(x, self.generator, masks=mask_tensor, dropped=dropped)
        return self._run(x)

    def _run(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(labels, reject scores, detection scores) of a batch."""
        with torch.inference_mode():
            if self.guard is None:
                logits = self.model(images)
                scores = self.scorer(images, logits, self.model) if self.scorer else None
                return logits.argmax(dim=1).numpy(), scores, None
            # The guard runs the bare model itself; a second pass is only for a reject score that needs logits.
            scores = self.scorer(images, self.model(images), self.model) if self.scorer else None
            verdict = self.guard.ensemble.classify(images)
            detection = self.guard.ensemble.detection_score(verdict.scores).numpy()
            return verdict.labels.numpy(), scores, detection
