"""Camera conditions against the bare model, the input-transform defenses and the reject option, MNIST and GTSRB.

    .venv/bin/python benchmarks/corruption_table.py [--datasets mnist gtsrb] [--images N]
                                                    [--calibration 1000] [--seed 0] [--threads 1]
                                                    [--coverage 0.9] [--out DIR] [--quick] [--render]

For each dataset (MNIST with LeNet-5, GTSRB with gtsrb_cnn, both read from ../shared/datasets and trained
once with their default config through the model cache, as `superiot_table.py` has them) two disjoint fixed
strides through the test split: `--images` scored images (default 1,000 for MNIST, 2,000 for GTSRB) and
`--calibration` clean calibration images that are never scored. Every camera condition of `iotbed.data.corruptions` (17 kinds x 5 severities) is applied
to the scored images, each (kind, severity) with its own generator seeded from --seed, and the result put on
the 8-bit grid cameras send, as a scenario's cameras do. On those same images:

- accuracy in % of the bare model and of each input defense `superiot_table.py` runs (SUPER-IoT at nominal
  rate 0.1 and 0.25, JPEG q75, feature squeezing, 3x3 median, pixel deflection + BayesShrink); the random
  ones (SUPER-IoT, pixel deflection) take one draw per image from a generator seeded from --seed, so their
  accuracy is an unbiased estimate of the expected one;
- mean corruption accuracy (the CIFAR-10-C metric: the mean over kinds and severities) per model and
  defense, over all kinds and over each source's (CIFAR-10-C, MNIST-C, iotbed's own);
- the reject option on the bare model: the MSP score, its threshold for `--coverage` fitted on the clean
  calibration images (`iotbed.defenses.reject.for_coverage`); coverage (share accepted) and selective risk
  (error among the accepted) in % on the clean and on each corrupted set.

Results go to <out>/corruption_table.{md,csv,json} (default benchmarks/results), written atomically after
each dataset; a run for some datasets keeps the others' saved results. `--quick` scores 100 images with 100
calibration images (for trying the script; give `--out` so the committed results stay). `--render`
rewrites the .md/.csv from the saved .json.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))

from superiot_table import Defense, Progress, defenses  # noqa: E402  (benchmarks/superiot_table.py, beside this script)

from iotbed.data import load_splits  # noqa: E402
from iotbed.data.corruptions import CORRUPTIONS, SEVERITIES, SOURCES, corrupt  # noqa: E402
from iotbed.defenses.base import DefendedModel  # noqa: E402
from iotbed.defenses.reject import Threshold, confidence, for_coverage  # noqa: E402
from iotbed.models import default_train_config, get_or_train  # noqa: E402
from iotbed.runner import atomic_write  # noqa: E402

NAME = "corruption_table"
SETUPS = {"mnist": ("lenet5", "MNIST (LeNet-5)"), "gtsrb": ("gtsrb_cnn", "GTSRB (gtsrb_cnn)")}
# Scored images by default: MNIST's test split (2,000 of the t10k images) holds 1,000 besides the calibration
# ones; GTSRB's 7,949 allow more, and its model is slower, so 2,000 keep the whole table near 10 min on 2 cores.
DEFAULT_IMAGES = {"mnist": 1000, "gtsrb": 2000}
GROUPS = ("CIFAR-10-C", "MNIST-C", "iotbed")
BATCH = 500  # images per forward pass


# --- helpers ----------------------------------------------------------------------------------------------------


def sub_seed(seed: int, *parts: object) -> int:
    """A seed for one random use, derived from --seed and a name, so uses do not share streams."""
    digest = hashlib.sha256("|".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def on_camera_grid(x: torch.Tensor) -> torch.Tensor:
    """Pixels as a camera sends them: 8 bits."""
    return (x * 255.0).round() / 255.0


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])


def predictor(d: Defense, model: torch.nn.Module, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of a batch through defense `d` (its random draws from a generator seeded with `seed`)."""
    if d.pre is None:
        return lambda x: logits_of(model, x)
    generator = torch.Generator().manual_seed(seed) if d.pre.randomized else None
    defended = DefendedModel(d.pre, model, generator=generator).eval()
    return lambda x: logits_of(defended, x)


def strides(total: int, scored: int, calibration: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint fixed strides through `total` test images: the scored ones from 0, the calibration ones
    from half a stride on."""
    step = total // max(scored, calibration)
    if step < 2:
        raise SystemExit(
            f"{scored} scored and {calibration} calibration images need {2 * max(scored, calibration)} "
            f"test images; this split has {total}"
        )
    scored_idx = torch.arange(0, total, step)[:scored]
    calibration_idx = torch.arange(step // 2, total, step)[:calibration]
    return scored_idx, calibration_idx


def selective(threshold: Threshold, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """Coverage and selective risk in % of the reject option on these logits (risk None: nothing accepted)."""
    accepted = confidence(logits, threshold.score).numpy() >= threshold.value
    wrong = (logits.argmax(1) != labels).numpy()
    n = int(accepted.sum())
    return {
        "coverage": 100.0 * n / len(accepted),
        "selective_risk": 100.0 * float(wrong[accepted].sum()) / n if n else None,
        "risk_without_reject": 100.0 * float(wrong.mean()),
    }


# --- running ------------------------------------------------------------------------------------------------------


def run_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    arch, label = SETUPS[name]
    start = time.perf_counter()
    print(f"== {name}: loading data and model", flush=True)
    splits = load_splits(name, DATASETS / name, seed=0)
    trained = get_or_train(
        arch, splits.train, default_train_config(arch, name), test_ds=splits.test, progress=sys.stderr.isatty()
    )
    model = trained.model.eval()
    test = splits.test
    images = args.images or DEFAULT_IMAGES[name]
    scored_idx, calibration_idx = strides(len(test), images, args.calibration)
    x, y = on_camera_grid(test.images[scored_idx]), test.labels[scored_idx]
    calibration_logits = logits_of(model, on_camera_grid(test.images[calibration_idx]))
    calibration_correct = (calibration_logits.argmax(1) == test.labels[calibration_idx]).numpy()
    threshold = for_coverage("msp", confidence(calibration_logits, "msp").numpy(), calibration_correct, args.coverage)
    defs = defenses()
    loaded_s = time.perf_counter() - start

    def score(images: torch.Tensor, what: str) -> tuple[dict[str, float], dict[str, float | None]]:
        """Accuracy per defense and the reject option on the bare model; random defenses draw from a
        generator seeded for this set, so a set scores the same whatever else a run includes."""
        accuracy: dict[str, float] = {}
        reject: dict[str, float | None] = {}
        for d in defs:
            logits = predictor(d, model, sub_seed(args.seed, name, d.key, what, "draws"))(images)
            accuracy[d.key] = 100.0 * float((logits.argmax(1) == y).float().mean())
            if d.pre is None:
                reject = selective(threshold, logits, y)
        return accuracy, reject

    sets = [(kind, severity) for kind in CORRUPTIONS for severity in SEVERITIES]
    progress = Progress(len(sets) + 1, name)
    clean_accuracy, clean_reject = score(x, "clean")
    progress.step(f"clean: bare {clean_accuracy['none']:.1f}%, coverage {clean_reject['coverage']:.1f}%")
    cells: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for kind, severity in sets:
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(sub_seed(args.seed, name, kind, severity))
        seen = on_camera_grid(corrupt(x, kind, severity, generator))
        corrupted_s = time.perf_counter() - t0
        accuracy, reject = score(seen, f"{kind}-{severity}")
        timings[f"{kind}-{severity}"] = time.perf_counter() - t0
        cells[f"{kind}-{severity}"] = {
            "kind": kind,
            "severity": severity,
            "accuracy": accuracy,
            "reject": reject,
            "mean_abs_change": float((seen - x).abs().mean()),
            "corrupt_s": corrupted_s,
        }
        best = max((k for k in accuracy if k != "none"), key=accuracy.__getitem__)
        progress.step(
            f"{kind} {severity}: bare {accuracy['none']:.1f}%, best defense {best} {accuracy[best]:.1f}%, "
            f"coverage {reject['coverage']:.1f}%, selective risk {_pct(reject['selective_risk'])}"
        )
    progress.close()
    return {
        "setup": {
            "dataset": name,
            "arch": arch,
            "label": label,
            "model_key": trained.key,
            "model_test_accuracy": 100 * float(trained.test_accuracy or float("nan")),
            "train_size": len(splits.train),
            "test_size": len(test),
            "images": len(x),
            "calibration_images": len(calibration_idx),
            "stride": int(scored_idx[1] - scored_idx[0]) if len(scored_idx) > 1 else 1,
            "calibration_first": int(calibration_idx[0]),
            "image_shape": [int(v) for v in x.shape[1:]],
            "seed": args.seed,
            "defenses": [
                {
                    "key": d.key,
                    "label": d.label,
                    "params": d.pre.params() if d.pre is not None else {},
                    "randomized": bool(d.pre is not None and d.pre.randomized),
                }
                for d in defs
            ],
            "threshold": {
                "score": threshold.score,
                "target_coverage": args.coverage,
                "value": threshold.value,
                "calibration_coverage": 100 * threshold.calibration_coverage,
                "calibration_risk": 100 * threshold.calibration_risk,
            },
        },
        "clean": {"accuracy": clean_accuracy, "reject": clean_reject},
        "cells": cells,
        "load_s": loaded_s,
        "timings_s": timings,
        "wall_s": time.perf_counter() - start,
    }


# --- summaries ----------------------------------------------------------------------------------------------------


def mean_accuracy(r: dict[str, Any], defense: str, group: str | None = None) -> float:
    """Mean corruption accuracy of one defense: over every kind and severity, or over one source's kinds."""
    values = [c["accuracy"][defense] for c in r["cells"].values() if group is None or SOURCES[c["kind"]] == group]
    return float(np.mean(values))


def kind_mean(r: dict[str, Any], kind: str, defense: str) -> float:
    return float(np.mean([r["cells"][f"{kind}-{s}"]["accuracy"][defense] for s in SEVERITIES]))


def standard_error(accuracy_pct: float, n: int) -> float:
    p = accuracy_pct / 100
    return 100 * (p * (1 - p) / n) ** 0.5


def findings(r: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers, so they stay true whatever the numbers are."""
    st, cells = r["setup"], r["cells"]
    n = st["images"]
    bare_clean = r["clean"]["accuracy"]["none"]
    kinds = list(dict.fromkeys(c["kind"] for c in cells.values()))
    by_kind = sorted(kinds, key=lambda k: kind_mean(r, k, "none"))
    out = [
        f"- Bare model: clean {bare_clean:.1f}%, mean corruption accuracy {mean_accuracy(r, 'none'):.1f}% "
        f"({len(kinds)} kinds x 5 severities; "
        + ", ".join(f"{g} kinds {mean_accuracy(r, 'none', g):.1f}%" for g in GROUPS)
        + "). Hardest kinds (mean over severities): "
        + ", ".join(
            f"{k} {kind_mean(r, k, 'none'):.1f}% (severity 5: {cells[f'{k}-5']['accuracy']['none']:.1f}%)"
            for k in by_kind[:3]
        )
        + "; mildest: "
        + ", ".join(f"{k} {kind_mean(r, k, 'none'):.1f}%" for k in reversed(by_kind[-3:]))
        + ".",
    ]
    for d in st["defenses"][1:]:
        key = d["key"]
        diffs = [c["accuracy"][key] - c["accuracy"]["none"] for c in cells.values()]
        # a cell counts as better or worse when the gap exceeds twice the standard error of a difference
        margin = [2 * 2**0.5 * standard_error(c["accuracy"]["none"], n) for c in cells.values()]
        better = sum(dv > m for dv, m in zip(diffs, margin))
        worse = sum(dv < -m for dv, m in zip(diffs, margin))
        gain = {k: kind_mean(r, k, key) - kind_mean(r, k, "none") for k in kinds}
        top = max(gain, key=gain.__getitem__)
        out.append(
            f"- {d['label']}: clean {r['clean']['accuracy'][key]:.1f}%, mean corruption accuracy "
            f"{mean_accuracy(r, key):.1f}% ({_signed(mean_accuracy(r, key) - mean_accuracy(r, 'none'))} against the bare "
            f"model); above the bare model in {better} and below it in {worse} of {len(cells)} (kind, severity) "
            f"cells by more than 2 standard errors of an unpaired difference (conservative: both score the same images); "
            + (
                f"its largest gain is on {top} ({_signed(gain[top])} points, mean over severities)."
                if gain[top] > 0
                else "it gains on no kind."
            )
        )
    clean_reject = r["clean"]["reject"]
    at5 = [c for c in cells.values() if c["severity"] == 5]
    low = min(at5, key=lambda c: c["reject"]["coverage"])
    high = max(at5, key=lambda c: c["reject"]["coverage"])
    judged = [c for c in cells.values() if c["reject"]["selective_risk"] is not None]
    lowered = sum(c["reject"]["selective_risk"] < c["reject"]["risk_without_reject"] for c in judged)
    at5_judged = [c for c in at5 if c["reject"]["selective_risk"] is not None]
    worst = max(judged, key=lambda c: c["reject"]["selective_risk"])
    th = st["threshold"]
    out.append(
        f"- Reject option (MSP, threshold {th['value']:.4f} for {100 * th['target_coverage']:.0f}% coverage on "
        f"{st['calibration_images']} clean calibration images): on the clean scored images coverage "
        f"{clean_reject['coverage']:.1f}%, selective risk {_pct(clean_reject['selective_risk'])} against "
        f"{clean_reject['risk_without_reject']:.1f}% error without it. At severity 5 coverage runs from "
        f"{low['reject']['coverage']:.1f}% ({low['kind']}) to {high['reject']['coverage']:.1f}% ({high['kind']}); "
        f"where anything is accepted at severity 5 ({len(at5_judged)} kinds) the mean selective risk is "
        f"{np.mean([c['reject']['selective_risk'] for c in at5_judged]):.1f}% against "
        f"{np.mean([c['reject']['risk_without_reject'] for c in at5_judged]):.1f}% error without rejecting. "
        f"Rejecting lowers the risk in {lowered} of the {len(judged)} cells where it accepts anything; the highest "
        f"selective risk is under {worst['kind']} {worst['severity']}: {worst['reject']['coverage']:.1f}% accepted, "
        f"{worst['reject']['selective_risk']:.1f}% of them wrong."
    )
    return out


# --- reporting ----------------------------------------------------------------------------------------------------


def _signed(value: float) -> str:
    return f"{round(value, 1) or 0.0:+.1f}"  # no "-0.0"


def _pct(value: float | None) -> str:
    return "- (nothing accepted)" if value is None else f"{value:.1f}%"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _dataset_section(r: dict[str, Any]) -> list[str]:
    st, cells = r["setup"], r["cells"]
    c, h, w = st["image_shape"]
    kinds = list(dict.fromkeys(cell["kind"] for cell in cells.values()))
    defs = st["defenses"]
    th = st["threshold"]
    lines = [
        f"## {st['label']}",
        "",
        f"Model `{st['arch']}` (cache key {st['model_key'][:12]}), default training config, trained on "
        f"{st['train_size']} images; test accuracy {st['model_test_accuracy']:.2f}% on all {st['test_size']} test "
        f"images. Scored on {st['images']} test images (indices 0, {st['stride']}, {2 * st['stride']}, ...), "
        f"{c}x{h}x{w}; the reject threshold fitted on {st['calibration_images']} other clean test images (indices "
        f"{st['calibration_first']}, {st['calibration_first'] + st['stride']}, ...), never scored. Standard error "
        f"of an accuracy p: sqrt(p(1-p)/{st['images']}), at most {standard_error(50, st['images']):.1f} points. "
        f"Wall time {r['wall_s']:.0f} s ({r['load_s']:.0f} s of it loading data and model).",
        "",
        "In short:",
        "",
        *findings(r),
        "",
        "### Mean corruption accuracy (%)",
        "",
        _row("defense", "clean", "all kinds", *(f"{g} kinds" for g in GROUPS)),
        _row(*["---"] * (3 + len(GROUPS))),
    ]
    for d in defs:
        lines.append(
            _row(
                d["label"],
                f"{r['clean']['accuracy'][d['key']]:.1f}",
                f"{mean_accuracy(r, d['key']):.1f}",
                *(f"{mean_accuracy(r, d['key'], g):.1f}" for g in GROUPS),
            )
        )
    lines += [
        "",
        "### Accuracy (%) per kind, severities 1 / 2 / 3 / 4 / 5",
        "",
        _row("kind (source)", *(d["label"] for d in defs)),
        _row(*["---"] * (1 + len(defs))),
        _row("clean", *(f"{r['clean']['accuracy'][d['key']]:.1f}" for d in defs)),
    ]
    for kind in kinds:
        lines.append(
            _row(
                f"{kind} ({SOURCES[kind]})",
                *(" / ".join(f"{cells[f'{kind}-{s}']['accuracy'][d['key']]:.1f}" for s in SEVERITIES) for d in defs),
            )
        )
    clean = r["clean"]["reject"]
    lines += [
        "",
        "### Reject option on the bare model: coverage / selective risk (%), severities 1 to 5",
        "",
        f"MSP threshold {th['value']:.4f}, fitted for {100 * th['target_coverage']:.0f}% coverage on the calibration "
        f"images (there: coverage {th['calibration_coverage']:.1f}%, selective risk {th['calibration_risk']:.1f}%). "
        f"Selective risk is the error among the accepted frames (- where none is accepted); the last column is the "
        "error of the bare model without rejecting, severities 1 to 5. On the clean scored images: coverage "
        f"{clean['coverage']:.1f}%, selective risk {_pct(clean['selective_risk'])}, error without rejecting "
        f"{clean['risk_without_reject']:.1f}%.",
        "",
        _row("kind", *(f"severity {s}" for s in SEVERITIES), "error without reject"),
        _row(*["---"] * (2 + len(SEVERITIES))),
    ]
    for kind in kinds:
        rej = [cells[f"{kind}-{s}"]["reject"] for s in SEVERITIES]
        lines.append(
            _row(
                kind,
                *(f"{x['coverage']:.1f} / {_cell(x['selective_risk'])}" for x in rej),
                " / ".join(f"{x['risk_without_reject']:.1f}" for x in rej),
            )
        )
    lines.append("")
    return lines


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    first = next(iter(results.values()))["setup"] if results else {}
    counts = "; ".join(
        f"{r['setup']['label']}: {r['setup']['images']} scored + {r['setup']['calibration_images']} calibration images"
        for r in results.values()
    )
    lines = [
        "# Camera conditions: the bare model, input-transform defenses and the reject option",
        "",
        "Produced by `benchmarks/corruption_table.py` (`make corruption-table`). Images: " + counts + " (disjoint "
        "fixed strides through each test split). Every camera condition of `iotbed.data.corruptions` at its five "
        "severities (CIFAR-10-C's constants for noise, blur, light, JPEG, pixelate and fog; MNIST-C's for rotate, "
        "shear, scale and translate; iotbed's own for rain and dark) is applied to the scored images and put on "
        "the 8-bit grid cameras send; every defense and the reject option see the same corrupted images. Random "
        "defenses (SUPER-IoT's drop, pixel deflection) take one draw per image. Mean corruption accuracy is the "
        "CIFAR-10-C metric: the mean over kinds and severities (no AlexNet normalisation). The reject option "
        "runs on the bare model.",
        "",
        f"Machine: {meta.get('machine', '?')}. Seed {first.get('seed', '?')}. Wall time: "
        + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in results.items())
        + f" (total {sum(v['wall_s'] for v in results.values()):.0f} s, models from the model cache).",
        "",
    ]
    for r in results.values():
        lines += _dataset_section(r)
    return "\n".join(lines)


def csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results.items():
        n = r["setup"]["images"]
        sets = [("clean", 0, r["clean"])] + [(c["kind"], c["severity"], c) for c in r["cells"].values()]
        for kind, severity, cell in sets:
            for d in r["setup"]["defenses"]:
                row = {
                    "dataset": name,
                    "defense": d["key"],
                    "kind": kind,
                    "severity": severity,
                    "images": n,
                    "accuracy_pct": cell["accuracy"][d["key"]],
                    "coverage_pct": None,
                    "selective_risk_pct": None,
                }
                if d["key"] == "none":
                    row["coverage_pct"] = cell["reject"]["coverage"]
                    row["selective_risk_pct"] = cell["reject"]["selective_risk"]
                rows.append(row)
    return rows


def readable(write_file: Callable[[Path], None]) -> Callable[[Path], None]:
    """`write_file`, then the permissions of an ordinary file (atomic_write's temporary file is private)."""

    def write_and_open(path: Path) -> None:
        write_file(path)
        path.chmod(0o644)

    return write_and_open


def write(results: dict[str, Any], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, meta)
    atomic_write(out / f"{NAME}.md", readable(lambda p: p.write_text(md)))
    rows = csv_rows(results)

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows)

    atomic_write(out / f"{NAME}.csv", readable(write_csv))
    body = json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n"
    atomic_write(out / f"{NAME}.json", readable(lambda p: p.write_text(body)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument(
        "--images", type=int, default=None, help="scored test images per dataset (default: mnist 1000, gtsrb 2000)"
    )
    ap.add_argument("--calibration", type=int, default=1000, help="clean test images the reject threshold is fitted on")
    ap.add_argument("--coverage", type=float, default=0.9, help="the reject option's target coverage")
    ap.add_argument("--seed", type=int, default=0, help="drives the corruptions and the random defenses' draws")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core machine)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    ap.add_argument("--quick", action="store_true", help="100 scored and 100 calibration images")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md/.csv from the saved .json")
    args = ap.parse_args(argv)
    saved = args.out / f"{NAME}.json"
    if args.render:
        data = json.loads(saved.read_text())
        write(data["results"], data["meta"], args.out)
        return
    if args.quick:
        args.images, args.calibration = 100, 100
    if (
        (args.images is not None and args.images < 1)
        or args.calibration < 1
        or args.threads < 1
        or not 0 < args.coverage <= 1
    ):
        ap.error("--images, --calibration and --threads must be >= 1, --coverage in (0, 1]")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # nothing here should use the global RNG; in case a library call does
    start = time.perf_counter()
    results: dict[str, Any] = {}
    if saved.exists() and set(args.datasets) != set(SETUPS):  # a partial rerun keeps the other datasets
        try:
            results = {k: v for k, v in json.loads(saved.read_text())["results"].items() if k not in args.datasets}
        except (OSError, ValueError, KeyError):
            results = {}
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{args.threads} torch thread(s), torch {torch.__version__}, Python {platform.python_version()}",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    for name in args.datasets:
        results[name] = run_dataset(name, args)
        write({k: results[k] for k in SETUPS if k in results}, meta, args.out)
        print(f"== {name} done in {results[name]['wall_s']:.0f} s; wrote {args.out / NAME}.{{md,csv,json}}", flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
