"""`report.html`: one self-contained file (figures embedded as data URIs) for a run or a sweep, with its
tables, the resolved scenario, failures, versions and seeds, that a user can mail to a colleague.

The report draws every standard figure the folder holds the data for (`plots.available`). It draws them
into a temporary folder and embeds them, so writing a report leaves nothing in the folder but
`report.html`: figures are saved where `iotbed plot` (FOLDER/figures/) or a sweep's `plots:` (the sweep
folder) put them, and the report reuses those PNGs when they are newer than the data they were drawn from.
Every value shown comes from files a user may have edited, so every text is escaped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import numbers
import platform
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import yaml

from iotbed.analysis import plots
from iotbed.errors import IotbedError

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0; overflow-wrap: anywhere; } .meta { color: #666; margin-top: .3rem; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .2rem .4rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: .9rem; } figcaption .source { color: #888; }
pre { background: #f7f7f7; padding: 1rem; overflow-x: auto; font-size: .8rem; }
td small { color: #666; } .wide { overflow-x: auto; }
.failed { color: #a00; } .note { color: #666; font-size: .9rem; }
"""

VERSIONS = ("iotbed", "simpy", "torch", "numpy", "pandas", "paho-mqtt", "pydantic")

SIGNIFICANT = 4  # digits shown of a measured value
# Columns whose numbers name things (no thousands separators).
IDENTIFIERS = frozenset({"seed", "point", "replication", "run_id", "version", "screen", "frame_id", "model_version"})
# The run summary's sections shown as metric rows (`bandwidth.links` has its own table).
RUN_SECTIONS = ("frames", "throughput", "latency_ms", "bandwidth", "accuracy")
# The files figures are drawn from: a saved figure older than any of them is stale.
INPUTS = ("sweep.csv", "summary.json", "trace.parquet", "links_timeseries.csv", "strip_screens.csv")
CAPTIONS = {
    "latency": "end-to-end latency, capture to classification",
    "throughput": "delivered frames and load on the links",
    "bandwidth_vs_robustness": "accuracy on attacked frames against the bandwidth per camera",
    "robustness": "accuracy on attacked frames against the swept parameter",
    "strip_entropy": "STRIP entropy of the frames the gateways screened, clean and stamped",
    "roc": "ROC of STRIP on the screened frames",
    "backdoor": "the backdoored update: clean accuracy and attack success, offline and over the run",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# ---------------------------------------------------------------- values and tables


class Interval(NamedTuple):
    """A mean with its 95% confidence interval, shown as `mean [low, high]`."""

    mean: float
    low: float
    high: float


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, numbers.Real) and math.isnan(float(value)))


def _number(value: float, grouping: bool = True) -> str:
    """SIGNIFICANT significant digits, trailing zeros dropped; whole numbers as integers; scientific
    notation only for magnitudes below 1e-3 or from 1e15."""
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -3 or magnitude >= 15:
        mantissa, exponent = f"{value:.{SIGNIFICANT - 1}e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    digits = max(0, SIGNIFICANT - 1 - magnitude)
    text = f"{value:{',' if grouping else ''}.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def fmt(value: Any, grouping: bool = True) -> str:
    """One value as a table shows it (plain text, not yet escaped)."""
    if isinstance(value, Interval):
        mean = fmt(value.mean, grouping)
        if _missing(value.low) or _missing(value.high) or value.low == value.high:
            return mean
        return f"{mean} [{fmt(value.low, grouping)}, {fmt(value.high, grouping)}]"
    if _missing(value):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}" if grouping else str(int(value))
    if isinstance(value, numbers.Real):
        return _number(float(value), grouping)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {fmt(v, grouping)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, grouping) for v in value) or "none"
    return plots.value_label(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, Interval) or (
        isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and not _missing(value)
    )


def _header(column: object) -> str:
    """A column name, escaped, that may wrap before its last dotted part and after underscores."""
    text = str(column)
    head, dot, last = text.rpartition(".")
    parts = [head + dot] if dot else []
    parts += [f"{p}_" for p in last.split("_")[:-1]] + last.split("_")[-1:]
    return "<wbr>".join(html.escape(part) for part in parts)


def _cell(value: Any, grouping: bool) -> str:
    if isinstance(value, Interval) and fmt(value, grouping) != fmt(value.mean, grouping):
        interval = f"[{fmt(value.low, grouping)}, {fmt(value.high, grouping)}]"
        return (
            f'<td class="num">{html.escape(fmt(value.mean, grouping))}<br><small>{html.escape(interval)}</small></td>'
        )
    text = html.escape(fmt(value, grouping))
    return f'<td class="num">{text}</td>' if _is_number(value) else f"<td>{text}</td>"


def _table(frame: pd.DataFrame) -> str:
    """An HTML table of `frame`, every header and cell escaped; numbers right-aligned."""
    head = "".join(f"<th>{_header(c)}</th>" for c in frame.columns)
    grouping = [str(c) not in IDENTIFIERS for c in frame.columns]
    rows = [
        f"<tr>{''.join(_cell(v, g) for v, g in zip(record, grouping))}</tr>"
        for record in frame.itertuples(index=False, name=None)
    ]
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    """Nested mappings and lists as `a.b.c` rows; an empty one is one row that reads `none`."""
    if isinstance(value, dict):
        if not value:
            return [(prefix, "none")]
        rows: list[tuple[str, Any]] = []
        for key, inner in value.items():
            rows += flatten(f"{prefix}.{key}" if prefix else str(key), inner)
        return rows
    if isinstance(value, list):
        if not value:
            return [(prefix, "none")]
        if all(not isinstance(v, (dict, list)) for v in value):
            return [(prefix, fmt(value))]
        rows = []
        for i, inner in enumerate(value):
            rows += flatten(f"{prefix}.{i}" if prefix else str(i), inner)
        return rows
    return [(prefix, value)]


def _metric_table(rows: list[tuple[str, Any]]) -> str:
    return _table(pd.DataFrame(rows, columns=["metric", "value"]))


# ---------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    kind: str
    png: bytes
    source: str  # where it came from, for the caption


def _saved(folder: Path, kind: str) -> Path | None:
    """A PNG of `kind` saved by `iotbed plot` (FOLDER/figures/) or a sweep's `plots:` (FOLDER/), if it is
    newer than every file figures are drawn from and than the plotting code; the newest such one."""
    inputs = [folder / name for name in INPUTS if (folder / name).is_file()]
    newest = max(p.stat().st_mtime_ns for p in [*inputs, Path(plots.__file__)])
    current = [
        p
        for p in (folder / "figures" / f"{kind}.png", folder / f"{kind}.png")
        if p.is_file() and p.stat().st_mtime_ns >= newest
    ]
    return max(current, key=lambda p: p.stat().st_mtime_ns, default=None)


def _figures(folder: Path) -> tuple[list[Figure], list[tuple[str, str]]]:
    """Every figure the folder holds data for, and the kinds that could not be drawn with the reason."""
    figures: list[Figure] = []
    left_out: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="iotbed-report-") as tmp:
        for kind in plots.available(folder):
            saved = _saved(folder, kind)
            if saved is not None:
                data = saved.read_bytes()
                if data.startswith(PNG_SIGNATURE):
                    figures.append(Figure(kind, data, f"{saved.relative_to(folder)}, saved earlier"))
                    continue
            try:
                (png,) = plots.plot(kind, folder, tmp, formats=("png",))
            except Exception as exc:  # noqa: BLE001 - one figure must not cost the whole report; the reason is shown
                reason = str(exc) if isinstance(exc, IotbedError) else f"{type(exc).__name__}: {exc}"
                left_out.append((kind, reason))
                continue
            figures.append(Figure(kind, png.read_bytes(), "drawn for this report"))
    return figures, left_out


def _figures_html(folder: Path) -> str:
    figures, left_out = _figures(folder)
    parts = ["<h2>Figures</h2>"]
    for figure in figures:
        data = base64.b64encode(figure.png).decode("ascii")
        kind = html.escape(figure.kind)
        caption = html.escape(CAPTIONS.get(figure.kind, figure.kind))
        parts.append(
            f'<figure><img alt="{kind}" src="data:image/png;base64,{data}">'
            f'<figcaption><b>{kind}</b>: {caption} <span class="source">({html.escape(figure.source)})</span>'
            "</figcaption></figure>"
        )
    if not figures and not left_out:
        parts.append("<p>No figures: this folder holds no data to draw (no successful run).</p>")
    for kind, reason in left_out:
        parts.append(f'<p class="note">Not drawn: <b>{html.escape(kind)}</b>: {html.escape(reason)}</p>')
    return "\n".join(parts)


# ---------------------------------------------------------------- sections


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _yaml_block(title: str, path: Path) -> str:
    if not path.is_file():
        return ""
    return f"<h2>{html.escape(title)}</h2><pre>{html.escape(path.read_text(encoding='utf-8'))}</pre>"


def _run_sections(folder: Path) -> tuple[str, str, str]:
    """(what the run is, the sections before the figures, those after)."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise IotbedError(f"{folder / 'summary.json'}: not valid JSON ({exc})") from None
    scenario = _read_yaml(folder / "scenario.resolved.yaml")
    name = summary.get("scenario") or scenario.get("name") or "?"
    what = f"scenario <b>{html.escape(str(name))}</b>"
    if scenario.get("description"):
        what += f": {html.escape(str(scenario['description']))}"
    rows: list[tuple[str, Any]] = []
    for section in RUN_SECTIONS:
        value = summary.get(section)
        if section == "bandwidth" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "links"}
        if value is not None:
            rows += flatten(section, value)
    top = [f"<h2>Summary</h2>{_metric_table(rows)}"]
    by_version = (summary.get("detection") or {}).get("by_version") or {}
    for version, info in (summary.get("backdoor") or {}).items():
        rows = flatten("", info)
        if by_version.get(version):
            rows += flatten("detection", by_version[version])
        top.append(f"<h2>Backdoored update {html.escape(str(version))}</h2>{_metric_table(rows)}")
    rest = []
    screens = (summary.get("detection") or {}).get("screens")
    if screens:
        rest.append(f"<h2>STRIP screens on the gateways</h2>{_table(pd.DataFrame(screens))}")
    links = (summary.get("bandwidth") or {}).get("links") or {}
    if links:
        frame = pd.DataFrame.from_dict(links, orient="index").reset_index(names="link group")
        rest.append(f"<h2>Links</h2>{_table(frame)}")
    rest.append(_yaml_block("Scenario (resolved)", folder / "scenario.resolved.yaml"))
    rest.append(
        f"<p>Seed {html.escape(fmt(summary.get('seed'), grouping=False))}; "
        f"{html.escape(fmt(summary.get('sim_time_s')))} s simulated "
        f"in {html.escape(fmt(summary.get('wall_time_s')))} s.</p>"
    )
    return what, "\n".join(top), "\n".join(rest)


# The sweep's headline metrics, in two tables so that each fits the page next to the parameters.
HEADLINE = (
    (
        "Delivery and latency",
        (
            "frames.delivery_ratio",
            "throughput.frames_per_s",
            "latency_ms.p50",
            "latency_ms.p95",
            "latency_ms.p99",
        ),
    ),
    ("Bandwidth and accuracy", ("bandwidth.per_camera_kbps", "accuracy.clean", "accuracy.attacked")),
)


def _sweep_sections(folder: Path) -> tuple[str, str, str]:
    from iotbed.analysis.stats import aggregate

    frame = pd.read_csv(folder / "sweep.csv")
    path = folder / "sweep_summary.csv"
    summary = pd.read_csv(path) if path.is_file() else aggregate(frame)
    spec = _read_yaml(folder / "sweep.resolved.yaml")
    what = f"sweep <b>{html.escape(str(spec.get('name') or folder.name))}</b>"
    if spec.get("scenario"):
        what += f" of {html.escape(str(spec['scenario']))}"
    params = [c for c in summary.columns if c.startswith("param.")]
    points = summary[["point", *params]].copy()
    for param in params:
        points[param] = points[param].map(plots.value_label)
    points = points.rename(columns={p: p.removeprefix("param.") for p in params})
    top = ["<h2>Points: mean [95% CI] over replications</h2>"]
    for i, (title, metrics) in enumerate(HEADLINE):
        shown = points.copy()
        if i == 0:
            shown[["runs", "runs_ok"]] = summary[["runs", "runs_ok"]]
        for metric in metrics:
            columns = [f"{metric}.{s}" for s in ("mean", "ci95_low", "ci95_high")]
            if all(c in summary for c in columns) and summary[columns[0]].notna().any():
                shown[metric] = [Interval(*values) for values in summary[columns].itertuples(index=False, name=None)]
        if i == 0 or len(shown.columns) > len(points.columns):
            top.append(f"<h3>{html.escape(title)}</h3>{_table(shown)}")
    rest = []
    failed = frame[frame["status"] != "ok"]
    if len(failed):
        rest.append(f"<h2 class='failed'>Failed runs ({len(failed)})</h2>")
        rest.append(_table(failed[["run_id", "point", "replication", "seed", "error"]]))
    rest.append(f"<h2>Runs and seeds</h2>{_table(frame[['run_id', 'seed', 'status']])}")
    rest.append(_yaml_block("Sweep", folder / "sweep.resolved.yaml"))
    return what, "\n".join(top), "\n".join(rest)


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    folder = Path(folder)
    if plots.is_sweep(folder):
        kind, (what, top, rest) = "sweep", _sweep_sections(folder)
    elif (folder / "summary.json").is_file():
        kind, (what, top, rest) = "run", _run_sections(folder)
    else:
        raise IotbedError(f"{folder}: neither a run folder (summary.json) nor a sweep folder (sweep.csv)")
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    title = html.escape(folder.name)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>iotbed report: {title}</title>
<style>{CSS}</style></head><body>
<h1>iotbed {kind} report: {title}</h1>
<p class="meta">{what}</p>
<p class="meta">written {dt.datetime.now().isoformat(timespec="seconds")} &middot; {html.escape(versions)}</p>
{top}
{_figures_html(folder)}
{rest}
</body></html>
"""
    target = Path(out) if out else folder / "report.html"
    target.write_text(page, encoding="utf-8")
    return target
