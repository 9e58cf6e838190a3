"""Figures across replications: mean, standard deviation and a 95% confidence interval (Student's t)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

IDENTITY = ("run_id", "point", "replication", "seed", "status", "error")


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std, low, high); with one value the interval is that value (no spread to estimate)."""
    values = values[~np.isnan(values)]
    n = values.size
    if n == 0:
        return (np.nan, np.nan, np.nan, np.nan)
    mean = float(values.mean())
    if n == 1:
        return (mean, np.nan, mean, mean)
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / np.sqrt(n)
    return (mean, std, mean - half, mean + half)


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per point: the parameters, the number of successful runs, and for every numeric summary
    field its mean, std and 95% CI over replications."""
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    params = [c for c in frame.columns if c.startswith("param.")]
    metrics = [
        c
        for c in frame.columns
        if c not in IDENTITY and not c.startswith("param.") and pd.api.types.is_numeric_dtype(frame[c])
    ]
    rows = []
    for point, group in frame.groupby("point", sort=True):
        good = ok[ok["point"] == point]
        row: dict[str, object] = {
            "point": point,
            **{p: group[p].iloc[0] for p in params},
            "runs": len(group),
            "runs_ok": len(good),
        }
        for metric in metrics:
            mean, std, low, high = mean_ci(good[metric].to_numpy(dtype=float))
            row[f"{metric}.mean"] = mean
            row[f"{metric}.std"] = std
            row[f"{metric}.ci95_low"] = low
            row[f"{metric}.ci95_high"] = high
        rows.append(row)
    return pd.DataFrame(rows)
