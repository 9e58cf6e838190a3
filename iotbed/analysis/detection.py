"""Detection quality of input filters (STRIP and kin): thresholds at a preset FRR, FAR, AUROC.

Terms are STRIP's (Gao et al. 2019):

- FRR, false rejection rate: share of BENIGN inputs flagged as trojaned;
- FAR, false acceptance rate: share of TROJANED inputs accepted as benign.

CoDefend (Liu et al. 2021, Table 3) swaps the names: its "FNR" is STRIP's FRR and its "FPR" is
STRIP's FAR. `DetectionReport.codefend_names()` gives the numbers under CoDefend's labels.

Scores follow STRIP's direction: a LOW score means trojaned, and an input is flagged when
score <= threshold. The threshold is fitted on benign scores of a calibration split that must not be
the split being scored (otherwise the measured FRR is the preset one by construction).
AUROC is computed on the continuous scores with `sklearn.metrics.roc_auc_score`; an "AUC" of hard
0/1 decisions (as TrojanZoo prints) is one ROC point, not an area.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from iotbed.errors import IotbedError

ThresholdMethod = Literal["normal", "quantile"]
# The preset FRRs of STRIP's Table 3.
FRR_PRESETS: tuple[float, ...] = (0.02, 0.01, 0.005)

ScoreLike = torch.Tensor | np.ndarray | Sequence[float]


class DetectionError(IotbedError):
    """Scores or settings with which detection quality cannot be measured."""

    exit_code = 2


def _scores(values: ScoreLike, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        arr = values.detach().cpu().double().numpy()
    else:
        arr = np.asarray(values, dtype=np.float64)
    arr = arr.reshape(-1) if arr.ndim == 0 else arr
    if arr.ndim != 1 or arr.size == 0:
        raise DetectionError(f"{what} must be a non-empty 1-D set of scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DetectionError(f"{what} contain NaN or infinite values")
    return arr


def _check_frr(frr: float) -> float:
    if not 0.0 < frr < 0.5:
        raise DetectionError(f"a preset FRR must lie in (0, 0.5), got {frr}")
    return float(frr)


def fit_threshold(benign_scores: ScoreLike, frr: float, *, method: ThresholdMethod = "normal") -> float:
    """The boundary at which about `frr` of benign inputs score at or below it.

    "normal": STRIP's code, `norm.ppf(frr, mu, sigma)` with (mu, sigma) = `norm.fit` (maximum
    likelihood: mean and ddof-0 std). "quantile": the empirical `frr` quantile of the benign scores
    (numpy's linear interpolation), for score distributions a normal fits badly.
    """
    scores = _scores(benign_scores, "benign calibration scores")
    frr = _check_frr(frr)
    if method == "normal":
        if scores.size < 2:
            raise DetectionError("a normal fit needs at least 2 benign calibration scores")
        mu, sigma = stats.norm.fit(scores)
        if sigma <= 0:
            raise DetectionError(
                "benign calibration scores are all equal; a normal fit is degenerate, use method='quantile'"
            )
        return float(stats.norm.ppf(frr, mu, sigma))
    if method == "quantile":
        return float(np.quantile(scores, frr))
    raise DetectionError(f"threshold method must be 'normal' or 'quantile', got {method!r}")


@dataclass(frozen=True)
class OperatingPoint:
    """One preset FRR, the threshold fitted for it, and what it achieves on the scored splits."""

    frr_preset: float
    threshold: float
    frr: float  # measured on the scored benign split
    far: float  # measured on the scored trojaned split

    def as_dict(self) -> dict[str, float]:
        return {"frr_preset": self.frr_preset, "threshold": self.threshold, "frr": self.frr, "far": self.far}


def far_at_frr(
    calibration_benign: ScoreLike,
    benign: ScoreLike,
    trojaned: ScoreLike,
    frrs: Sequence[float] = FRR_PRESETS,
    *,
    method: ThresholdMethod = "normal",
) -> list[OperatingPoint]:
    """For each preset FRR: fit the threshold on `calibration_benign`, then measure FRR on `benign`
    and FAR on `trojaned` (flag = score <= threshold)."""
    cal = _scores(calibration_benign, "calibration scores")
    ben = _scores(benign, "benign scores")
    tro = _scores(trojaned, "trojaned scores")
    points = []
    for frr in frrs:
        t = fit_threshold(cal, frr, method=method)
        points.append(
            OperatingPoint(
                frr_preset=float(frr), threshold=t, frr=float(np.mean(ben <= t)), far=float(np.mean(tro > t))
            )
        )
    return points


def auroc(benign: ScoreLike, trojaned: ScoreLike) -> float:
    """Area under the ROC curve for telling trojaned from benign by the continuous score, where a
    lower score means trojaned: P(score_trojaned < score_benign), ties counting one half."""
    ben = _scores(benign, "benign scores")
    tro = _scores(trojaned, "trojaned scores")
    y = np.concatenate([np.zeros(ben.size), np.ones(tro.size)])
    # Negated so that a higher value means "more likely trojaned", as roc_auc_score expects.
    return float(roc_auc_score(y, -np.concatenate([ben, tro])))


@dataclass(frozen=True)
class DetectionReport:
    points: tuple[OperatingPoint, ...]
    auroc: float
    method: ThresholdMethod
    n_calibration: int
    n_benign: int
    n_trojaned: int
    benign_mean: float  # mean / std of the calibration scores (STRIP's Table 3 reports them)
    benign_std: float

    def far_at(self, frr: float) -> float:
        for p in self.points:
            if abs(p.frr_preset - frr) < 1e-12:
                return p.far
        raise DetectionError(f"no operating point at FRR {frr}; have {[p.frr_preset for p in self.points]}")

    def codefend_names(self) -> list[dict[str, float]]:
        """The operating points with CoDefend's (swapped) names: FNR = STRIP's FRR, FPR = STRIP's FAR."""
        return [{"fnr_preset": p.frr_preset, "fnr": p.frr, "fpr": p.far} for p in self.points]

    def as_dict(self) -> dict[str, object]:
        return {
            "points": [p.as_dict() for p in self.points],
            "auroc": self.auroc,
            "method": self.method,
            "n_calibration": self.n_calibration,
            "n_benign": self.n_benign,
            "n_trojaned": self.n_trojaned,
            "benign_mean": self.benign_mean,
            "benign_std": self.benign_std,
        }


def detection_report(
    calibration_benign: ScoreLike,
    benign: ScoreLike,
    trojaned: ScoreLike,
    frrs: Sequence[float] = FRR_PRESETS,
    *,
    method: ThresholdMethod = "normal",
) -> DetectionReport:
    """FAR at each preset FRR (thresholds from the calibration split) and AUROC on the scored splits."""
    cal = _scores(calibration_benign, "calibration scores")
    ben = _scores(benign, "benign scores")
    tro = _scores(trojaned, "trojaned scores")
    mu, sigma = stats.norm.fit(cal) if cal.size > 1 else (float(cal[0]), 0.0)
    return DetectionReport(
        points=tuple(far_at_frr(cal, ben, tro, frrs, method=method)),
        auroc=auroc(ben, tro),
        method=method,
        n_calibration=int(cal.size),
        n_benign=int(ben.size),
        n_trojaned=int(tro.size),
        benign_mean=float(mu),
        benign_std=float(sigma),
    )
