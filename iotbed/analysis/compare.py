"""Two runs of one scenario side by side: the headline figures, their differences and ratios."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iotbed.errors import IotbedError

METRICS = (
    "frames.captured", "frames.delivered", "frames.delivery_ratio", "frames.retries", "frames.duplicates",
    "frames.dropped_total", "throughput.frames_per_s", "throughput.goodput_mbps", "latency_ms.mean",
    "latency_ms.p50", "latency_ms.p95", "latency_ms.p99", "bandwidth.bytes_per_frame_mean", "accuracy.overall",
    "broker.queue_drops",
)  # fmt: skip


def _load(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise IotbedError(f"{folder}: no summary.json; give two folders written by `iotbed run` or `iotbed emulate`") from None
    except ValueError as exc:
        raise IotbedError(f"{path}: not valid JSON ({exc})") from None


def _get(summary: dict[str, Any], dotted: str) -> float | None:
    value: Any = summary
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare_runs(a: str | Path, b: str | Path) -> list[dict[str, Any]]:
    first, second = _load(a), _load(b)
    rows: list[dict[str, Any]] = []
    for metric in METRICS:
        x, y = _get(first, metric), _get(second, metric)
        rows.append({
            "metric": metric, "a": x, "b": y,
            "diff": None if x is None or y is None else y - x,
            "ratio": None if x in (None, 0) or y is None else y / x,  # type: ignore[operator]
        })  # fmt: skip
    return rows
