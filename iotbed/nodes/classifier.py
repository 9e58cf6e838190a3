"""The classifier an edge server runs: its input defenses, a model version, batched inference, and a cache
of what cannot change.

A whole frame with the untouched dataset image gives the same prediction every time for a given model
version when the defenses are deterministic (or absent), so every dataset image is classified once, in
batches, when a model version is put in service, and reused. Everything else goes through the defenses
and the model for real: frames with changed pixels, pixel-dropped frames (each has its own mask) and any
frame when a defense is random.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from iotbed.defenses.pipeline import DefenseChain
from iotbed.defenses.reject import FrameScorer
from iotbed.nodes.payloads import Frame


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
        self.flops_per_image = self.model_flops + self.defense_flops + self.score_flops
        self._cacheable = (self.defense is None or not self.defense.randomized) and not (scorer and scorer.randomized)
        self.last_scores: np.ndarray | None = None  # the scores of the last `predict`'s frames
        self.swap(model, version)

    def swap(self, model: nn.Module, version: int) -> None:
        self.model = model.eval()
        self.version = version
        if self._cacheable:
            runs = [self._run(self._defend(chunk)) for chunk in self.images.split(1024)]
            self._cached = np.concatenate([labels for labels, _ in runs])
            self._cached_scores = np.concatenate([scores for _, scores in runs]) if self.scorer else None

    def _defend(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense(x, self.generator) if self.defense is not None else x

    def predict(self, frames: list[Frame]) -> np.ndarray:
        """The predicted labels; with a score, their confidence scores are in `last_scores`."""
        n = len(frames)
        predictions = np.empty(n, dtype=np.int64)
        scores = np.empty(n, dtype=np.float64) if self.scorer else None
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
        if not pristine.all():
            labels, fresh = self._run_frames([f for f, p in zip(frames, pristine.tolist()) if not p])
            predictions[~pristine] = labels
            if scores is not None and fresh is not None:
                scores[~pristine] = fresh
        self.last_scores = scores
        return predictions

    def _run_frames(self, frames: list[Frame]) -> tuple[np.ndarray, np.ndarray | None]:
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

    def _run(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            logits = self.model(images)
            scores = self.scorer(images, logits, self.model) if self.scorer else None
            return logits.argmax(dim=1).numpy(), scores
