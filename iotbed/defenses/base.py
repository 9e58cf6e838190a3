"""The input-transform defense interface and a classifier wrapped with one, ready for adaptive attacks.

Modelled on ART's `PreprocessorPyTorch`: `forward` is the real transform (possibly random, iterative or
not differentiable) and `estimate_forward` a differentiable surrogate for it, the identity by default
(BPDA with g(x) = x). `DefendedModel` predicts with the real transform and lets gradients flow through
the surrogate, so any gradient attack run against it is a BPDA attack on the whole pipeline.

A defense an edge server can run from a scenario also declares the `kind` of `defenses:` entry it serves,
builds itself from that entry (`from_spec`) and prices itself (`flops_per_image`); `iotbed.defenses.pipeline`
looks kinds up among those classes.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import torch
from torch import nn


def check_images(x: torch.Tensor, what: str = "images") -> None:
    """ValueError unless `x` is a floating (N, C, H, W) tensor with values in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a floating tensor (N, C, H, W), got {shape}")
    if x.numel() and (bool(x.min() < 0) or bool(x.max() > 1)):
        raise ValueError(f"{what} must lie in [0, 1]; normalisation belongs inside the model")


class Preprocessor(ABC):
    """An input transform applied to whole batches (N, C, H, W) in [0, 1] before the classifier.

    Subclasses are small frozen dataclasses: their fields are their parameters (`params()` feeds
    reports and cache keys). A subclass whose `forward` draws random numbers sets `randomized = True`
    and takes them all from the `generator` argument. A subclass that serves a scenario's `defenses:`
    entries sets `kind` to the entries' `kind` and implements `from_spec` and `flops_per_image`.
    """

    name: ClassVar[str] = "preprocessor"
    kind: ClassVar[str | None] = None  # the scenario `defenses:` kind this class serves, if any
    randomized: ClassVar[bool] = False

    @classmethod
    def from_spec(cls, spec: Any, *, drop_window: int | None = None, drop_rate: float | None = None) -> Self:
        """The defense a scenario `defenses:` entry of kind `cls.kind` describes (its schema model).
        `drop_window`/`drop_rate`, when given, are the camera codec's pixel drop: a defense that drops pixels
        itself takes them instead of its own, for crafting against what the camera really does; the others
        ignore them."""
        raise NotImplementedError(f"{cls.__name__} is not built from a scenario entry")

    def flops_per_image(self, shape: tuple[int, int, int]) -> float:
        """Operations one (C, H, W) image costs, what the simulated edge charges for the defense: operation
        counts of the algorithm as implemented (multiply-adds counted as 2), not timings, so they scale with
        the device profile like the model's FLOPs do. 0 unless a subclass prices itself."""
        return 0.0

    @abstractmethod
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The real transform. Called without autograd; returns a new tensor of the same shape."""

    def estimate_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A differentiable stand-in for `forward` used for gradients (BPDA); the identity by default."""
        return x

    def params(self) -> dict[str, Any]:
        """JSON-ready parameters, with the defense's name."""
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"name": self.name, **fields}

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Validate, then run `forward` on a detached copy, without building a graph."""
        check_images(x)
        if self.randomized and generator is None:
            raise ValueError(f"{self.name} is random: pass a torch.Generator")
        with torch.no_grad():
            return self.forward(x.detach(), generator)

    def defend_frames(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        masks: torch.Tensor | None = None,
        dropped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transform on frames as they reach the edge: `masks` (N, H, W) hold the drop masks of the
        frames that arrived pixel-dropped and `dropped` (N,) says which those are. A defense that needs
        the masks (one that recovers dropped pixels) overrides this; the default ignores them and runs
        `self(x, generator)` on the frames as whole images."""
        return self(x, generator)


class DefendedModel(nn.Module):
    """`classifier(preprocessor(x))`, differentiable through `preprocessor.estimate_forward`.

    The forward value is always that of the real transform. When a gradient is asked for, the
    straight-through form `estimate(x) + (real(x) - estimate(x)).detach()` keeps that value and
    back-propagates through the surrogate alone (BPDA). Random defenses draw from `generator`, which
    advances with every call, so repeated calls see fresh randomness (what EOT averages over).
    """

    def __init__(self, preprocessor: Preprocessor, classifier: nn.Module, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(preprocessor, Preprocessor):
            raise ValueError(f"preprocessor must be a Preprocessor, got {type(preprocessor).__name__}")
        if not isinstance(classifier, nn.Module):
            raise ValueError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        if preprocessor.randomized and generator is None:
            raise ValueError(f"{preprocessor.name} is random: DefendedModel needs a torch.Generator")
        self.preprocessor = preprocessor
        self.classifier = classifier
        self.generator = generator

    def defend(self, x: torch.Tensor) -> torch.Tensor:
        """The real transform alone (no gradient)."""
        return self.preprocessor(x, self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = self.defend(x)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.classifier(real)
        estimate = self.preprocessor.estimate_forward(x)
        return self.classifier(estimate + (real - estimate).detach())

    def params(self) -> dict[str, Any]:
        return self.preprocessor.params()
