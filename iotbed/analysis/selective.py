"""Selective classification metrics from per-frame confidence scores and correctness: the risk-coverage
curve, its area (AURC) and the excess over an oracle that ranks every correct frame first (E-AURC, Geifman
et al. 2019). Both oracle and curve are computed from the sorted frames directly, not from a formula."""

from __future__ import annotations

import numpy as np


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, selective risk) when accepting the k most confident frames, k = 1..n (ties in score order
    as given)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    errors = np.cumsum(~np.asarray(correct, dtype=bool)[order])
    k = np.arange(1, len(order) + 1)
    return k / len(order), errors / k


def aurc(scores: np.ndarray, correct: np.ndarray) -> float:
    """The mean selective risk over all coverages k/n."""
    if len(scores) == 0:
        return float("nan")
    return float(risk_coverage(scores, correct)[1].mean())


def e_aurc(scores: np.ndarray, correct: np.ndarray) -> float:
    """AURC minus the AURC of the oracle ranking (every correct frame before every error)."""
    correct = np.asarray(correct, dtype=bool)
    return aurc(scores, correct) - aurc(correct.astype(np.float64), correct)
