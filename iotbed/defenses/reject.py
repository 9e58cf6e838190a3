"""The reject option: an edge abstains on a frame whose confidence score is below a threshold, fitted on a
labelled calibration split that is never scored.

Scores (higher = more confident): from the model's logits, `msp` the largest softmax probability
(Geifman and El-Yaniv 2017's softmax response), `margin` the gap between the two largest, `entropy` minus
the softmax entropy; from the frame itself, `gambler` one minus the abstain probability of a Deep Gamblers
network (`iotbed.defenses.gambler`) and `strip` the STRIP entropy of the frame superimposed on clean images
(`iotbed.defenses.strip`; low where a trigger dominates). Thresholds:

* a target coverage c: the (1 - c) quantile of the calibration scores, so that a share c is accepted;
* a target risk r* with confidence 1 - delta, by selection with guaranteed risk (SGR, Geifman and El-Yaniv
  2017): a binary search over the sorted calibration scores, ceil(log2 m) steps, each bounding the selective
  risk by the binomial tail (Clopper-Pearson) at delta / ceil(log2 m); the lowest threshold whose bound is
  below r* is kept. With probability at least 1 - delta the risk on new data from the same distribution is
  at most r*. A target no threshold reaches is a `RejectTargetError` naming the best bound there is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from scipy.stats import beta
from torch import nn

from iotbed.defenses.strip import StripDetector

if TYPE_CHECKING:
    from iotbed.defenses.gambler import Gambler

SCORES = ("msp", "margin", "entropy")
STRIP_SCORE_OVERLAYS = 100  # clean images a `strip` score draws its blends from


class RejectTargetError(ValueError):
    """No threshold reaches the requested risk on the calibration split."""


def confidence(logits: torch.Tensor, score: str) -> torch.Tensor:
    """(N,) confidence scores of (N, K) logits."""
    p = torch.softmax(logits.float(), dim=1)
    if score == "msp":
        return p.amax(dim=1)
    if score == "margin":
        top2 = p.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    if score == "entropy":
        return (p * torch.log(p.clamp(min=1e-12))).sum(dim=1)  # minus the entropy: higher is surer
    raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORES)}")


class FrameScorer(Protocol):
    """A reject score of a batch: (N,) float64, higher = surer."""

    name: str
    randomized: bool  # draws from a generator, so the same image may score differently each time

    def extra_flops(self, model_flops: float) -> float:
        """The scoring's compute per frame beyond the model's own pass."""
        ...

    def __call__(self, images: torch.Tensor, logits: torch.Tensor, model: nn.Module) -> np.ndarray: ...


@dataclass(frozen=True)
class SoftmaxScore:
    """msp, margin or entropy of the model's own softmax: no compute beyond its pass."""

    name: str
    randomized: bool = False

    def extra_flops(self, model_flops: float) -> float:
        return 0.0

    def __call__(self, images: torch.Tensor, logits: torch.Tensor, model: nn.Module) -> np.ndarray:
        return confidence(logits, self.name).numpy().astype(np.float64)


@dataclass(frozen=True)
class GamblerScore:
    """One minus a Deep Gamblers network's abstain probability: its own forward pass per frame."""

    gambler: Gambler
    name: str = "gambler"
    randomized: bool = False

    def extra_flops(self, model_flops: float) -> float:
        return float(self.gambler.flops_per_image)

    def __call__(self, images: torch.Tensor, logits: torch.Tensor, model: nn.Module) -> np.ndarray:
        return (1.0 - self.gambler.abstain_probability(images)).numpy().astype(np.float64)


class StripScore:
    """STRIP's entropy in bits of each frame superimposed on `n_blends` of `overlays` (clean held-out
    images) under the model in service: `n_blends` forward passes per frame."""

    name = "strip"
    randomized = True

    def __init__(self, overlays: torch.Tensor, n_blends: int, generator: torch.Generator) -> None:
        self.overlays = overlays
        self.n_blends = n_blends
        self.generator = generator
        self._detector: tuple[nn.Module, StripDetector] | None = None

    def extra_flops(self, model_flops: float) -> float:
        return self.n_blends * model_flops

    def __call__(self, images: torch.Tensor, logits: torch.Tensor, model: nn.Module) -> np.ndarray:
        if self._detector is None or self._detector[0] is not model:  # a new model version: a new detector
            detector = StripDetector(model, self.overlays, n_blends=self.n_blends, generator=self.generator)
            self._detector = (model, detector)
        return self._detector[1].score(images).numpy().astype(np.float64)


@dataclass(frozen=True)
class Threshold:
    score: str
    value: float  # accept a frame when its score is at or above this
    calibration_images: int
    calibration_coverage: float
    calibration_risk: float  # selective risk on the calibration split
    risk_bound: float | None = None  # SGR's bound at 1 - delta


def _selected(scores: np.ndarray, correct: np.ndarray, value: float) -> tuple[float, float, int, int]:
    accepted = scores >= value
    n = int(accepted.sum())
    errors = int((~correct[accepted]).sum())
    return n / len(scores), (errors / n if n else 0.0), n, errors


def for_coverage(score: str, scores: np.ndarray, correct: np.ndarray, coverage: float) -> Threshold:
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    ordered = np.sort(scores)
    value = float(ordered[int(math.floor((1.0 - coverage) * len(ordered)))]) if coverage < 1.0 else -math.inf
    cov, risk, _, _ = _selected(scores, correct, value)
    return Threshold(score, value, len(scores), cov, risk)


def risk_bound(errors: int, n: int, delta: float) -> float:
    """The upper end of the one-sided (1 - delta) Clopper-Pearson interval of an error rate: errors of n."""
    if n == 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(beta.ppf(1.0 - delta, errors + 1, n - errors))


def guaranteed_risk(score: str, scores: np.ndarray, correct: np.ndarray, risk: float, delta: float) -> Threshold:
    """SGR: the threshold accepting the most calibration frames whose risk bound is below `risk`."""
    m = len(scores)
    if m < 2:
        raise ValueError("selection with guaranteed risk needs at least 2 calibration images")
    ordered = np.sort(scores)
    steps = math.ceil(math.log2(m))
    per_step = delta / steps
    low, high = 0, m - 1  # indices into the ascending scores: accept ordered[z:] and above
    best: tuple[float, float] | None = None
    for _ in range(steps):
        z = (low + high + 1) // 2
        value = float(ordered[z])
        _, _, n, errors = _selected(scores, correct, value)
        bound = risk_bound(errors, n, per_step)
        if bound < risk:
            best = (value, bound)
            high = z  # a lower threshold may still hold: accept more
        else:
            low = z
    if best is None:
        # The best any threshold could do: the lowest bound over accepting the k most confident, k = 1..m.
        errors = np.cumsum(~correct[np.argsort(-scores, kind="stable")])
        k = np.arange(1, m + 1)
        bounds = np.where(errors >= k, 1.0, beta.ppf(1.0 - per_step, errors + 1, np.maximum(k - errors, 1)))
        tightest = float(bounds.min())
        raise RejectTargetError(
            f"no threshold keeps the risk under {risk:g} with confidence {1 - delta:g} on {m} calibration images; "
            f"the tightest bound there is {tightest:.4f}: ask for a risk above it, a lower confidence, or more "
            "calibration images"
        )
    value, bound = best
    cov, emp, _, _ = _selected(scores, correct, value)
    return Threshold(score, value, m, cov, emp, bound)
