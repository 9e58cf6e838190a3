"""Figures from run and sweep folders, as PNG and SVG: labelled axes with units, legends, print-readable.

Each kind reads what a run or a sweep wrote (`trace.parquet`, `links_timeseries.csv`, `sweep.csv`)
and says plainly when the folder holds nothing it can draw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from iotbed.analysis.stats import mean_ci  # noqa: E402
from iotbed.errors import IotbedError  # noqa: E402
from iotbed.naming import group_of  # noqa: E402

STYLE = {
    "figure.dpi": 110,
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
}


def is_sweep(folder: Path) -> bool:
    return (folder / "sweep.csv").is_file()


def is_run(folder: Path) -> bool:
    return (folder / "trace.parquet").is_file()


def _save(fig: plt.Figure, out: Path, name: str, formats: tuple[str, ...]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _sweep_frame(folder: Path) -> pd.DataFrame:
    frame = pd.read_csv(folder / "sweep.csv")
    return frame[frame["status"] == "ok"]


def _x_param(frame: pd.DataFrame, x: str | None) -> str:
    """The x axis: --x, else the first swept numeric parameter, else the first swept parameter of any kind
    (`20Mbps`, a codec, a QoS map: drawn as categories by `_categories`), else `point` for a sweep of
    replications only."""
    params = [c for c in frame.columns if c.startswith("param.")]
    if x is not None:
        column = x if x.startswith("param.") else f"param.{x}"
        if column not in frame.columns:
            varied = ", ".join(p.removeprefix("param.") for p in params) or "nothing"
            raise IotbedError(f"--x {x}: the sweep varies {varied}")
        return column
    varying = [p for p in params if frame[p].nunique(dropna=False) > 1] or params
    numeric = [p for p in varying if pd.api.types.is_numeric_dtype(frame[p])]
    if numeric:
        return numeric[0]
    return varying[0] if varying else "point"


def _quantity_key(values: list[object]) -> Callable[[object], float] | None:
    """A sort key for values written as one kind of quantity (`2Mbps`, `20ms`, `64KB`), else None."""
    from iotbed.units import parse_bandwidth, parse_duration, parse_size

    for parse in (parse_bandwidth, parse_duration, parse_size):
        try:
            for value in values:
                parse(value)
        except (TypeError, ValueError):
            continue
        return parse
    return None


def _categories(frame: pd.DataFrame, column: str) -> tuple[pd.DataFrame, list[str] | None]:
    """A non-numeric x column replaced by positions 0..n-1, with the tick labels: values that are
    quantities in order of size, others in the order the sweep lists them. Numeric columns pass as they are."""
    if pd.api.types.is_numeric_dtype(frame[column]):
        return frame, None
    ordered = list(pd.unique(frame.sort_values("point", kind="stable")[column]))
    key = _quantity_key(ordered)
    if key is not None:
        ordered.sort(key=key)
    positions = {value: i for i, value in enumerate(ordered)}
    return frame.assign(**{column: frame[column].map(positions)}), [value_label(v) for v in ordered]


def _category_ticks(ax: plt.Axes, labels: list[str] | None) -> None:
    if labels is None:
        return
    long = max((len(label) for label in labels), default=0) > 10
    ax.set_xticks(range(len(labels)), labels, rotation=20 if long else 0, ha="right" if long else "center")
    ax.set_xlim(-0.5, len(labels) - 0.5)


def value_label(value: object) -> str:
    """A swept value as people read it: a mapping or list (kept in sweep.csv as JSON) without its brackets,
    `{"frames/#": 0}` as `frames/#: 0`, a swept `null` (NaN in the CSV) as `none`; anything else as written."""
    if isinstance(value, float) and math.isnan(value):
        return "none"
    if isinstance(value, str) and value.startswith(("{", "[")):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, dict):
            return ", ".join(f"{k}: {_inline(v)}" for k, v in parsed.items()) or "none"
        if isinstance(parsed, list):
            return ", ".join(_inline(v) for v in parsed) or "none"
    return str(value)


def _inline(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))


def _series(frame: pd.DataFrame, x: str) -> list[tuple[str, pd.DataFrame]]:
    """One curve per combination of the other parameters."""
    others = [c for c in frame.columns if c.startswith("param.") and c != x]
    if not others:
        return [("", frame)]
    return [
        (
            ", ".join(
                f"{o.removeprefix('param.')}={value_label(v)}"
                for o, v in zip(others, key if isinstance(key, tuple) else (key,))
            ),
            group,
        )
        for key, group in frame.groupby(others, sort=True, dropna=False)  # a swept `null` is a curve too
    ]


def _legend(ax: plt.Axes) -> None:
    if any(label for label in ax.get_legend_handles_labels()[1]):
        ax.legend(fontsize=8)


def _sweep_legend(fig: plt.Figure, ax: plt.Axes) -> None:
    """`ax`'s legend in the axes when its labels are short, else below the figure, where labels naming
    several swept values (`codec=kind: pixel_drop, rate: 0.25, ...`) cover no curve."""
    handles, labels = ax.get_legend_handles_labels()
    if not any(labels):
        return
    longest = max(len(label) for label in labels)
    if longest <= 30 and len(labels) <= 4:
        ax.legend(fontsize=8)
        return
    ncol = 1 if longest > 45 else min(len(labels), 3)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=8)


def _errorbar(ax: plt.Axes, group: pd.DataFrame, x: str, metric: str, **style: object) -> None:
    """One curve: `metric`'s mean at each value of `x`, with its 95% CI over the runs there."""
    xs, means, lows, highs = [], [], [], []
    for value, at_x in group.groupby(x, sort=True):
        mean, _, low, high = mean_ci(at_x[metric].to_numpy(dtype=float))
        xs.append(value)
        means.append(mean)
        lows.append(mean - low)
        highs.append(high - mean)
    ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3, **style)  # type: ignore[arg-type]


def _errorbar_curves(ax: plt.Axes, frame: pd.DataFrame, x: str, metric: str, label_prefix: str = "") -> None:
    for label, group in _series(frame, x):
        _errorbar(ax, group, x, metric, label=f"{label_prefix}{label}".strip(", "))


def plot_latency(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    with plt.rc_context(STYLE):
        if is_sweep(folder):
            frame = _sweep_frame(folder)
            column = _x_param(frame, x)
            frame, ticks = _categories(frame, column)
            fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=False)
            for ax, pct in zip(axes, ("p50", "p95", "p99")):
                _errorbar_curves(ax, frame, column, f"latency_ms.{pct}")
                _category_ticks(ax, ticks)
                ax.set_xlabel(column.removeprefix("param."))
                ax.set_ylabel(f"latency {pct} (ms)")
                ax.set_title(f"{pct}, mean and 95% CI over replications")
            _sweep_legend(fig, axes[0])
            return _save(fig, out, "latency", formats)
        trace = _trace(folder)
        latency = np.sort(trace.loc[trace.status == "delivered", "latency_s"].to_numpy() * 1e3)
        if latency.size == 0:
            raise IotbedError(f"{folder}: no frame was delivered, so there is no latency to plot")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(latency, np.arange(1, latency.size + 1) / latency.size, drawstyle="steps-post")
        for pct in (50, 95, 99):
            value = np.percentile(latency, pct)
            ax.axvline(value, linestyle=":", color="grey")
            ax.annotate(
                f"p{pct} {value:.1f} ms", (value, pct / 100), fontsize=8, xytext=(4, -10), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end latency, capture to classification (ms, log scale)")
        ax.set_ylabel("fraction of delivered frames")
        ax.set_title("latency CDF")
        return _save(fig, out, "latency", formats)


def plot_throughput(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    with plt.rc_context(STYLE):
        if is_sweep(folder):
            frame = _sweep_frame(folder)
            column = _x_param(frame, x)
            frame, ticks = _categories(frame, column)
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
            _errorbar_curves(axes[0], frame, column, "throughput.frames_per_s")
            axes[0].set_ylabel("delivered frames per second")
            _errorbar_curves(axes[1], frame, column, "frames.delivery_ratio")
            axes[1].set_ylabel("delivered / captured")
            for ax in axes:
                _category_ticks(ax, ticks)
                ax.set_xlabel(column.removeprefix("param."))
            _sweep_legend(fig, axes[0])
            return _save(fig, out, "throughput", formats)
        series = folder / "links_timeseries.csv"
        if not series.is_file():
            raise IotbedError(f"{folder}: no links_timeseries.csv (written by `iotbed run`)")
        frame = pd.read_csv(series)
        fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        for group, rows in frame.groupby("link_group", sort=False):
            axes[0].plot(rows.time_s, rows.throughput_per_link_mbps, label=group)
            axes[1].plot(rows.time_s, rows.queue_mean_packets, label=f"{group} mean")
            axes[1].plot(rows.time_s, rows.queue_max_packets, linestyle=":", label=f"{group} max")
        axes[0].set_ylabel("throughput per link (Mbit/s)")
        axes[1].set_ylabel("queue occupancy (packets)")
        axes[1].set_xlabel("simulated time (s)")
        axes[0].legend(fontsize=8, ncol=2)
        axes[1].legend(fontsize=7, ncol=2)
        axes[0].set_title("per link group, sampled every monitor_interval")
        return _save(fig, out, "throughput", formats)


def _is_adaptive_param(column: str) -> bool:
    return column.endswith(".adaptive")


def _is_codec_param(column: str) -> bool:
    return ".codec" in column


def _curve_label(columns: list[str], key: object) -> str:
    values = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{c.removeprefix('param.').split('.')[-1]}={value_label(v)}" for c, v in zip(columns, values))


def plot_bandwidth_vs_robustness(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    """Accuracy on attacked frames against the bandwidth each camera uses, from a sweep over codec
    settings and attacks: one panel per crafting (oblivious, adaptive), one curve per attack setting
    (every swept parameter that is not the codec's or `adaptive`), mean and 95% CI over replications.
    The dotted line of a curve's colour is the undefended reference: the bare model on the same frames'
    images under the oblivious attack. Clean accuracy (frames no attacker touched) is drawn in grey."""
    if not is_sweep(folder):
        raise IotbedError(f"{folder}: bandwidth_vs_robustness draws a sweep folder (sweep.csv)")
    frame = _sweep_frame(folder)
    needed = ["bandwidth.per_camera_kbps", "accuracy.attacked"]
    if frame.empty or any(c not in frame.columns or frame[c].isna().all() for c in needed):
        raise IotbedError(f"{folder}: no successful run with attacked frames to draw (needs {', '.join(needed)})")
    params = [c for c in frame.columns if c.startswith("param.")]
    adaptive = next((c for c in params if _is_adaptive_param(c)), None)
    curve_params = [c for c in params if not _is_adaptive_param(c) and not _is_codec_param(c)]
    x_col = "bandwidth.per_camera_kbps"
    panels = [(False, frame)] if adaptive is None else [(bool(v), g) for v, g in frame.groupby(adaptive, sort=True)]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), sharey=True, squeeze=False)
        for ax, (is_adaptive, panel) in zip(axes[0], panels):
            groups = list(panel.groupby(curve_params, sort=True)) if curve_params else [("", panel)]
            for i, (key, group) in enumerate(groups):
                colour = colours[i % len(colours)]
                label = _curve_label(curve_params, key) if curve_params else "attack"
                _errorbar(ax, group, x_col, "accuracy.attacked", color=colour, label=label)
                ref_col = "accuracy.undefended_reference.attacked"
                if ref_col in group.columns and group[ref_col].notna().any():
                    ax.axhline(float(group[ref_col].mean()), color=colour, linestyle=":", linewidth=1.2)
            clean = panel.groupby(x_col, sort=True)["accuracy.clean"].mean() if "accuracy.clean" in panel else None
            if clean is not None and clean.notna().any():
                ax.plot(
                    clean.index,
                    clean.to_numpy(),
                    color="0.45",
                    marker="s",
                    markersize=4,
                    linewidth=1,
                    label="clean frames",
                )
            ax.set_title(
                "adaptive attack (BPDA + EOT through the defenses)"
                if is_adaptive
                else "oblivious attack (crafted on the bare model)"
            )
            ax.set_xlabel("bandwidth per camera (kbit/s, MQTT + TCP/IP)")
            ax.set_ylim(-0.02, 1.02)
            _legend(ax)
        axes[0][0].set_ylabel("accuracy on attacked frames (dotted: undefended model)")
        fig.suptitle(f"bandwidth vs robustness: {folder.name}", fontsize=11)
        return _save(fig, out, "bandwidth_vs_robustness", formats)


def plot_robustness(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    """Accuracy on attacked frames against the attack's strength (the swept `eps`, or --x), defended (solid)
    and the undefended reference (dashed: the bare model on the oblivious images of the same frames), one
    curve per combination of the other swept parameters; mean and 95% CI over replications."""
    if not is_sweep(folder):
        raise IotbedError(f"{folder}: robustness draws a sweep folder (sweep.csv)")
    frame = _sweep_frame(folder)
    if frame.empty or "accuracy.attacked" not in frame.columns or frame["accuracy.attacked"].isna().all():
        raise IotbedError(f"{folder}: no successful run with attacked frames to draw")
    if x is None:
        x = next((c for c in frame.columns if c.startswith("param.") and c.endswith(".eps")), None)
    x_col = _x_param(frame, x)
    frame, ticks = _categories(frame, x_col)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        ref = "accuracy.undefended_reference.attacked"
        # Runs without defenses: the reference is the accuracy itself, drawn once.
        flops = [c for c in frame.columns if c.endswith(".defense_flops_per_image")]
        defended = bool(flops) and bool((frame[flops].fillna(0) > 0).any().any())
        _errorbar_curves(ax, frame, x_col, "accuracy.attacked", "defended " if defended else "")
        if defended and ref in frame.columns and frame[ref].notna().any():
            for label, group in _series(frame, x_col):
                curve = group.groupby(x_col, sort=True)[ref].mean()
                ax.plot(curve.index, curve.to_numpy(), linestyle="--", marker="x", label=f"undefended {label}".strip())
        _category_ticks(ax, ticks)
        budget = " (attack budget)" if x_col.endswith(".eps") else ""
        ax.set_xlabel(f"{x_col.removeprefix('param.')}{budget}")
        ax.set_ylabel("accuracy on attacked frames")
        ax.set_ylim(-0.02, 1.02)
        _sweep_legend(fig, ax)
        ax.set_title(f"robustness: {folder.name}", fontsize=11)
        return _save(fig, out, "robustness", formats)


def _screens(folder: Path) -> pd.DataFrame:
    path = folder / "strip_screens.csv"
    if not path.is_file():
        raise IotbedError(f"{folder}: no strip_screens.csv; run a scenario whose gateways have `strip:`")
    frame = pd.read_csv(path)
    if frame.empty:
        raise IotbedError(f"{folder}: the gateways screened no frames")
    if "entropy_bits" in frame.columns:  # written before gateways could run SentiNet: all STRIP
        frame = frame.rename(columns={"entropy_bits": "score", "boundary_bits": "boundary"}).assign(kind="strip")
    return frame


def _backdoor_summary(folder: Path) -> dict:  # type: ignore[type-arg]
    summary = _summary(folder)
    if not summary.get("backdoor"):
        raise IotbedError(f"{folder}: no `backdoor` section in summary.json; run a scenario with a backdoored update")
    return summary


def plot_strip_entropy(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    """Histograms of the STRIP entropy of the frames the gateways screened, clean against stamped with the
    trigger, one panel per model version, with the boundary of the version's screens."""
    frame = _screens(folder)
    frame = frame[frame["kind"] == "strip"]
    if frame.empty:
        raise IotbedError(f"{folder}: no gateway screened with STRIP (`iotbed plot roc` draws every screen)")
    versions = sorted(frame["version"].unique())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(versions), figsize=(4.6 * len(versions), 3.8), squeeze=False, sharey=False)
        bins = np.linspace(0.0, max(float(frame["score"].max()), 1e-3), 40)
        for ax, version in zip(axes[0], versions):
            part = frame[frame["version"] == version]
            ax.hist(part.loc[~part["stamped"], "score"], bins=bins, alpha=0.6, label="clean frames", color="tab:blue")
            if part["stamped"].any():
                ax.hist(
                    part.loc[part["stamped"], "score"],
                    bins=bins,
                    alpha=0.6,
                    label="stamped with the trigger",
                    color="tab:red",
                )
            ax.axvline(float(part["boundary"].median()), color="k", linestyle="--", linewidth=1, label="boundary")
            ax.set_title(f"model {version}: {len(part)} frames screened")
            ax.set_xlabel("STRIP entropy (bits)")
            _legend(ax)
        axes[0][0].set_ylabel("frames")
        return _save(fig, out, "strip_entropy", formats)


def plot_roc(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    """ROC of each screen's score (STRIP's entropy, SentiNet's excess) for telling stamped from clean frames,
    per screen and model version that saw both."""
    from sklearn.metrics import roc_auc_score, roc_curve

    frame = _screens(folder)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(4.8, 4.4))
        drawn = 0
        for (kind, version), part in frame.groupby(["kind", "version"], sort=True):
            if part["stamped"].nunique() < 2:
                continue
            y, score = part["stamped"].to_numpy(), -part["score"].to_numpy()  # low score = trojaned
            fpr, tpr, _ = roc_curve(y, score)
            auroc = roc_auc_score(y, score)
            ax.plot(fpr, tpr, label=f"{kind}, model {version} (AUROC {auroc:.3f}, {int(y.sum())} stamped)")
            drawn += 1
        if not drawn:
            plt.close(fig)
            raise IotbedError(f"{folder}: no model version was screened on both clean and stamped frames")
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
        ax.set_xlabel("clean frames flagged (false rejection rate)")
        ax.set_ylabel("stamped frames flagged (detection rate)")
        _legend(ax)
        return _save(fig, out, "roc", formats)


def plot_backdoor(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    """Left: clean accuracy (CA) and attack success rate (ASR) on the test split of the clean, backdoored
    and repaired models. Right: the run itself, in 5-second bins: the share of stamped frames classified
    as the target and the accuracy on clean frames, with the update, the first stamped frame, the
    quarantine and the repaired model's adoption marked."""
    summary = _backdoor_summary(folder)
    trace = _trace(folder)
    version, info = next(iter(summary["backdoor"].items()))
    offline = info["offline"]
    with plt.rc_context(STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 2]})
        names = [k for k in ("clean_model", "backdoored", "repaired") if offline.get(k)]
        xs = np.arange(len(names))
        left.bar(xs - 0.2, [offline[k]["clean_accuracy"] for k in names], 0.4, label="CA")
        left.bar(xs + 0.2, [offline[k]["attack_success_rate"] for k in names], 0.4, label="ASR")
        left.set_xticks(xs, [n.replace("_", " ") for n in names])
        left.set_ylim(0, 1.05)
        left.set_ylabel("share of the test split")
        _legend(left)
        delivered = trace[trace["status"] == "delivered"].copy()
        delivered["bin"] = (delivered["t_capture"] // 5.0) * 5.0
        # the frames the backdoor aims at: a source-specific one's source classes, else all but the target
        aimed = (
            delivered["label"].isin(info["source_classes"])
            if info.get("source_classes")
            else delivered["label"] != info["target"]
        )
        stamped = delivered[(delivered["attack"] != "") & aimed]
        clean = delivered[delivered["attack"] == ""]
        asr = stamped.groupby("bin").apply(lambda g: float((g["prediction"] == info["target"]).mean()))
        acc = clean.groupby("bin")["correct"].mean()
        right.plot(acc.index, acc.to_numpy(), marker=".", label="accuracy on clean frames")
        right.plot(asr.index, asr.to_numpy(), marker=".", color="tab:red", label="stamped frames sent to the target")
        marks = [
            ("update", info["adopted_s"]),
            ("first stamp", info["first_stamped_frame_s"]),
            ("quarantine", info["quarantined_s"]),
            ("repaired", info["repaired_adopted_s"]),
        ]
        for label, t in marks:
            if t is not None:
                right.axvline(t, color="0.4", linestyle="--", linewidth=1)
                right.text(t, 1.02, label, rotation=90, fontsize=8, va="bottom", ha="right")
        right.set_xlabel("capture time (simulated s, 5-s bins)")
        right.set_ylim(-0.02, 1.15)
        _legend(right)
        fig.suptitle(f"backdoored update {version}: trigger {info['trigger']}, target {info['target']}", fontsize=11)
        return _save(fig, out, "backdoor", formats)


def _kinds_of_frames(trace: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """Clean frames (no attack, no condition), each condition, and attacked frames: (label, row mask)."""
    kinds = [("clean", (trace["attack"] == "") & (trace["condition"] == ""))]
    kinds += [(f"condition {c}", trace["condition"] == c) for c in sorted(set(trace["condition"]) - {""})]
    if (trace["attack"] != "").any():
        kinds.append(("attacked", trace["attack"] != ""))
    return kinds


def plot_selective(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    """Risk-coverage curves of the edge's confidence score on the frames it scored, for clean frames, each
    camera condition and attacked frames; a dot marks where the reject option's threshold put each."""
    from iotbed.analysis.selective import risk_coverage

    trace = _trace(folder)
    scored = trace[(trace["status"] == "delivered") & trace["score"].notna()]
    if scored.empty:
        raise IotbedError(f"{folder}: no frame was scored; the selective plot needs an edge with `reject:`")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for label, mask in _kinds_of_frames(scored):
            frames = scored[mask]
            if frames.empty:
                continue
            coverage, risk = risk_coverage(frames["score"].to_numpy(), frames["correct"].to_numpy())
            (line,) = ax.plot(coverage, risk, label=f"{label} ({len(frames)} frames)")
            accepted = ~frames["rejected"].to_numpy()
            if accepted.any():
                ax.plot(accepted.mean(), 1 - frames["correct"].to_numpy()[accepted].mean(), "o", color=line.get_color())
        ax.set_xlabel("coverage (share of frames accepted)")
        ax.set_ylabel("selective risk (error rate on accepted frames)")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(bottom=0)
        ax.set_title("risk-coverage of the edge's score; dots: the operating point", fontsize=10)
        _legend(ax)
        return _save(fig, out, "selective", formats)


def plot_conditions(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    """The run over time in 5-second bins of capture time: accuracy (right at the edge, or right where it was
    escalated: a cloud or reviewers), the share of frames rejected and of those never resolved, the traffic
    toward the resolvers (the WAN) and the p99 latency until a frame's final verdict (frames that never got
    one left out); the camera conditions shaded."""
    trace = _trace(folder)
    delivered = trace[trace["status"] == "delivered"].copy()
    if delivered.empty:
        raise IotbedError(f"{folder}: no frame was delivered; nothing to draw over time")
    delivered["bin"] = (delivered["t_capture"] // 5.0) * 5.0
    resolved = delivered["resolver"] != ""
    final = delivered["t_resolved"].where(resolved, delivered["t_done"].where(~delivered["rejected"]))
    delivered["latency_final_ms"] = (final - delivered["t_capture"]) * 1e3
    delivered["unresolved"] = delivered["rejected"] & ~resolved
    delivered["served_right"] = (delivered["correct"] & ~delivered["rejected"]) | (
        resolved & (delivered["final_prediction"] == delivered["label"])
    )
    bins = delivered.groupby("bin")
    resolvers = {group_of(node) for node in set(delivered["resolver"]) - {""}}  # the groups that resolved frames
    wan = pd.DataFrame()
    series_path = folder / "links_timeseries.csv"
    if resolvers and series_path.is_file():
        series = pd.read_csv(series_path)
        toward = series["link_group"].str.split("->").str[1].isin(resolvers)
        wan = series[toward].groupby("time_s")["throughput_mbps"].sum()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), sharex=True)
        (acc, rej), (load, lat) = axes
        acc.plot(bins["served_right"].mean(), marker=".", label="served right (edge, or where escalated)")
        acc.plot(bins["correct"].mean(), marker=".", linestyle=":", label="the edge's model alone")
        acc.set_ylabel("accuracy")
        acc.set_ylim(0, 1.05)
        _legend(acc)
        rej.plot(bins["rejected"].mean(), marker=".", color="tab:orange", label="rejected")
        if resolvers:
            rej.plot(bins["unresolved"].mean(), marker=".", linestyle=":", color="tab:brown", label="never resolved")
            _legend(rej)
        rej.set_ylabel("share of frames")
        rej.set_ylim(0, 1.05)
        if not wan.empty:
            load.plot(wan.index, wan.to_numpy(), color="tab:green")
        load.set_ylabel(f"traffic toward {', '.join(sorted(resolvers)) or 'the resolvers'} (Mbit/s)")
        lat.plot(bins["latency_final_ms"].quantile(0.99), marker=".", color="tab:red")
        lat.set_ylabel("p99 latency to a final verdict (ms)")
        for label, group in delivered[delivered["condition"] != ""].groupby("condition"):
            start, stop = group["t_capture"].min(), group["t_capture"].max()
            for ax in axes.flat:
                ax.axvspan(start, stop, color="0.5", alpha=0.08 + 0.04 * int(str(label).rsplit("-", 1)[-1]), lw=0)
            acc.text(start, 0.02, str(label), fontsize=7, rotation=90, va="bottom")
        for ax in axes[1]:
            ax.set_xlabel("capture time (s, 5-s bins)")
        fig.suptitle("camera conditions, the reject option and escalation over time", fontsize=11)
        return _save(fig, out, "conditions", formats)


def _trace(folder: Path) -> pd.DataFrame:
    if not is_run(folder):
        raise IotbedError(f"{folder}: neither a run folder (trace.parquet) nor a sweep folder (sweep.csv)")
    return pd.read_parquet(folder / "trace.parquet")


def plot_privacy_cost(folder: Path, out: Path, formats: tuple[str, ...], x: str | None = None) -> list[Path]:
    """What encrypting frames costs across a sweep (say, of link bandwidth): median latency, delivered frames
    per second, bytes per frame and accuracy, one curve per value of the other swept parameters (plain and
    encrypted frames)."""
    if not is_sweep(folder):
        raise IotbedError(f"{folder}: privacy_cost draws a sweep (run `iotbed sweep` first)")
    frame = _sweep_frame(folder)
    column = _x_param(frame, x)
    frame, ticks = _categories(frame, column)
    panels = (
        ("latency_ms.p50", "median latency (ms)"),
        ("throughput.frames_per_s", "delivered frames per second"),
        ("bandwidth.bytes_per_frame_mean", "bytes per frame (camera publish)"),
        ("accuracy.overall", "accuracy"),
    )
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        for ax, (metric, label) in zip(axes, panels):
            if metric in frame.columns:
                _errorbar_curves(ax, frame, column, metric)
            ax.set_ylabel(label)
            ax.set_xlabel(column.removeprefix("param."))
            _category_ticks(ax, ticks)
        axes[0].set_yscale("log")
        axes[2].set_yscale("log")
        _sweep_legend(fig, axes[0])
        return _save(fig, out, "privacy_cost", formats)


PLOTS: dict[str, Callable[[Path, Path, tuple[str, ...], str | None], list[Path]]] = {
    "latency": plot_latency,
    "throughput": plot_throughput,
    "bandwidth_vs_robustness": plot_bandwidth_vs_robustness,
    "robustness": plot_robustness,
    "strip_entropy": plot_strip_entropy,
    "roc": plot_roc,
    "backdoor": plot_backdoor,
    "selective": plot_selective,
    "conditions": plot_conditions,
    "privacy_cost": plot_privacy_cost,
}
SWEEP_ONLY = frozenset({"bandwidth_vs_robustness", "robustness", "privacy_cost"})
BACKDOOR_ONLY = frozenset({"strip_entropy", "roc", "backdoor"})


def plot(
    kind: str,
    folder: str | Path,
    out: str | Path | None = None,
    formats: tuple[str, ...] = ("png", "svg"),
    x: str | None = None,
) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise IotbedError(f"{folder}: no such folder")
    if kind not in PLOTS:
        import difflib

        close = difflib.get_close_matches(kind, list(PLOTS), n=1)
        hint = f" did you mean `{close[0]}`?" if close else ""
        raise IotbedError(f"unknown plot kind `{kind}`;{hint} kinds: {', '.join(PLOTS)}")
    return PLOTS[kind](folder, Path(out) if out else folder / "figures", formats, x)


def available(folder: Path) -> list[str]:
    """The kinds this folder holds the data for, in `PLOTS` order (the report draws each of them):
    a sweep's latency and throughput once a run succeeded, its robustness once a run had attacked frames,
    and bandwidth_vs_robustness when the bandwidth per camera also differs between points; a run's latency
    and throughput, STRIP's entropy and ROC when its gateways screened frames, the backdoor timeline when
    it had a backdoored update, the risk-coverage curves when an edge scored frames (reject option) and the
    timeline of conditions, rejection and escalation when cameras had conditions or an edge rejected."""
    folder = Path(folder)
    if is_sweep(folder):
        return [k for k in PLOTS if k in _sweep_kinds(folder)]
    if not is_run(folder):
        return []
    kinds = {"latency"}
    if (folder / "links_timeseries.csv").is_file():
        kinds.add("throughput")
    if (folder / "strip_screens.csv").is_file():
        kinds |= {"strip_entropy", "roc"}
    try:
        _backdoor_summary(folder)
        kinds.add("backdoor")
    except (IotbedError, ValueError):
        pass
    summary = _summary(folder)
    if summary.get("selective"):
        kinds |= {"selective", "conditions"}
    elif summary.get("accuracy", {}).get("by_condition"):
        kinds.add("conditions")
    return [k for k in PLOTS if k in kinds]


def _summary(folder: Path) -> dict:  # type: ignore[type-arg]
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def _sweep_kinds(folder: Path) -> set[str]:
    frame = _sweep_frame(folder)
    kinds: set[str] = set()

    def has(column: str) -> bool:
        return column in frame.columns and bool(frame[column].notna().any())

    if frame.empty:
        return kinds
    if all(has(f"latency_ms.{pct}") for pct in ("p50", "p95", "p99")):
        kinds.add("latency")
    if has("throughput.frames_per_s") and has("frames.delivery_ratio"):
        kinds.add("throughput")
    if has("privacy.frames_encrypted"):
        kinds.add("privacy_cost")
    if has("accuracy.attacked"):
        kinds.add("robustness")
        if has("bandwidth.per_camera_kbps"):
            per_point = frame.groupby("point")["bandwidth.per_camera_kbps"].mean().dropna()
            if per_point.max() > 1.01 * per_point.min():  # one bandwidth for all points: nothing to put on x
                kinds.add("bandwidth_vs_robustness")
    return kinds
