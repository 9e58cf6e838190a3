"""`report.html`: one self-contained file (figures embedded as data URIs) for a run or a sweep, with its
tables, the resolved scenario, failures, versions and seeds, that a user can mail to a colleague."""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import platform
import tempfile
from importlib import metadata
from pathlib import Path

import pandas as pd

from iotbed.analysis import plots
from iotbed.errors import IotbedError

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0; } .meta { color: #666; margin-top: .3rem; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1rem; overflow-x: auto; font-size: .8rem; }
.failed { color: #a00; }
"""

VERSIONS = ("iotbed", "simpy", "torch", "numpy", "pandas", "paho-mqtt", "pydantic")


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _table(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    return frame.to_html(index=False, border=0, na_rep="-", float_format=float_format.format, escape=True)


def _figures(folder: Path) -> list[tuple[str, str]]:
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in plots.available(folder):
            try:
                (png,) = plots.plot(kind, folder, tmp, formats=("png",))
            except IotbedError:
                continue  # a kind this folder holds no data for is left out of the report
            figures.append((kind, base64.b64encode(png.read_bytes()).decode("ascii")))
    return figures


def _run_section(folder: Path) -> str:
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    rows = []
    for section in ("frames", "throughput", "latency_ms", "accuracy"):
        for key, value in summary[section].items():
            rows.append(
                {"metric": f"{section}.{key}", "value": json.dumps(value) if isinstance(value, dict) else value}
            )
    parts = [f"<h2>Summary</h2>{_table(pd.DataFrame(rows))}"]
    for version, info in (summary.get("backdoor") or {}).items():
        keep = {k: v for k, v in info.items() if not isinstance(v, dict)}
        rows = [{"metric": k, "value": v} for k, v in keep.items()]
        for model, metrics in (info.get("offline") or {}).items():
            for name, value in (metrics or {}).items():
                rows.append({"metric": f"{model}.{name}", "value": value})
        parts.append(f"<h2>Backdoored update {version}</h2>{_table(pd.DataFrame(rows))}")
    screens = (summary.get("detection") or {}).get("screens")
    if screens:
        parts.append(f"<h2>STRIP screens on the gateways</h2>{_table(pd.DataFrame(screens))}")
    links = pd.DataFrame.from_dict(summary["bandwidth"]["links"], orient="index").reset_index(names="link group")
    parts.append(f"<h2>Links</h2>{_table(links)}")
    scenario = folder / "scenario.resolved.yaml"
    if scenario.is_file():
        parts.append(f"<h2>Scenario (resolved)</h2><pre>{html.escape(scenario.read_text(encoding='utf-8'))}</pre>")
    parts.append(
        f"<p>Seed {summary['seed']}; {summary['sim_time_s']:g} s simulated in {summary['wall_time_s']:.1f} s.</p>"
    )
    return "\n".join(parts)


def _sweep_section(folder: Path) -> str:
    frame = pd.read_csv(folder / "sweep.csv")
    summary = pd.read_csv(folder / "sweep_summary.csv")
    params = [c for c in summary.columns if c.startswith("param.")]
    headline = [
        "frames.delivery_ratio",
        "throughput.frames_per_s",
        "latency_ms.p50",
        "latency_ms.p95",
        "latency_ms.p99",
        "accuracy.clean",
    ]
    shown = summary[["point", *params, "runs", "runs_ok"]].copy()
    for metric in headline:
        if f"{metric}.mean" in summary:
            shown[metric] = [
                f"{m:.4g} [{lo:.4g}, {hi:.4g}]" if pd.notna(m) else "-"
                for m, lo, hi in zip(
                    summary[f"{metric}.mean"], summary[f"{metric}.ci95_low"], summary[f"{metric}.ci95_high"]
                )
            ]
    parts = ["<h2>Points: mean [95% CI] over replications</h2>", _table(shown)]
    failed = frame[frame["status"] != "ok"]
    if len(failed):
        parts.append(f"<h2 class='failed'>Failed runs ({len(failed)})</h2>")
        parts.append(_table(failed[["run_id", "point", "replication", "seed", "error"]]))
    seeds = frame[["run_id", "seed", "status"]]
    parts.append(f"<h2>Runs and seeds</h2>{_table(seeds)}")
    resolved = folder / "sweep.resolved.yaml"
    if resolved.is_file():
        parts.append(f"<h2>Sweep</h2><pre>{html.escape(resolved.read_text(encoding='utf-8'))}</pre>")
    return "\n".join(parts)


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    folder = Path(folder)
    if plots.is_sweep(folder):
        kind, body = "sweep", _sweep_section(folder)
    elif (folder / "summary.json").is_file():
        kind, body = "run", _run_section(folder)
    else:
        raise IotbedError(f"{folder}: neither a run folder (summary.json) nor a sweep folder (sweep.csv)")
    figures = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'
        for name, data in _figures(folder)
    )
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>iotbed report: {html.escape(folder.name)}</title>
<style>{CSS}</style></head><body>
<h1>iotbed {kind} report: {html.escape(folder.name)}</h1>
<p class="meta">written {dt.datetime.now().isoformat(timespec="seconds")} &middot; {html.escape(versions)}</p>
<h2>Figures</h2>
{figures or "<p>No figures.</p>"}
{body}
</body></html>
"""
    target = Path(out) if out else folder / "report.html"
    target.write_text(page, encoding="utf-8")
    return target
