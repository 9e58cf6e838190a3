"""The reject option's scores side by side: how well each ranks a model's errors on clean, corrupted and
attacked frames, and what a threshold fitted on clean calibration images does to each kind of frame.

    .venv/bin/python benchmarks/selective_table.py [--datasets mnist gtsrb] [--images 1000] [--seed 0]

For each dataset (MNIST with LeNet-5, GTSRB with gtsrb_cnn, read from ../shared/datasets and trained once
through the model cache on iotbed's split, `load_splits(name, path, seed=0)`), the test split is cut in two
at random: `--images` held-out images (100 of them STRIP's clean overlays, the rest for the thresholds) and
`--images` evaluation images, never used to fit anything; all on the cameras' 8-bit grid. The evaluation images are scored as they are (clean), under
fog and Gaussian noise at CIFAR-10-C severity 3 (corrupted), and as PGD-L-inf adversarial examples crafted on
the bare model (attacked; eps 0.1 on MNIST, 2/255 on GTSRB, 20 steps; oblivious: crafted on the model alone, not on
the gambler's network or STRIP's blends), by each score of
`iotbed.defenses.reject`: msp, margin, entropy, gambler (a Deep Gamblers network with reward 2.2, trained
on the training split) and strip (STRIP entropy over 16 blends).

Reported per dataset, kind of frame and score: accuracy at full coverage, AURC and E-AURC
(`iotbed.analysis.selective`), the selective risk of the most confident 95%, 90% and 80%, and, with the
threshold fitted for 90% coverage on the clean calibration images, the coverage and selective risk that
kind of frame gets. Results: benchmarks/results/selective_table.{md,json} and selective_curves.png
(risk-coverage curves per score).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ROOT.parent / "shared" / "datasets"
sys.path.insert(0, str(ROOT))

from iotbed.analysis.selective import aurc, e_aurc, risk_coverage  # noqa: E402
from iotbed.attacks.evasion import pgd  # noqa: E402
from iotbed.data import load_splits  # noqa: E402
from iotbed.data.corruptions import corrupt  # noqa: E402
from iotbed.defenses.gambler import GamblerConfig, get_or_train_gambler  # noqa: E402
from iotbed.defenses.reject import GamblerScore, SoftmaxScore, StripScore, for_coverage  # noqa: E402
from iotbed.models import default_train_config, get_or_train  # noqa: E402
from iotbed.runner import atomic_write  # noqa: E402

NAME = "selective_table"
ARCH = {"mnist": "lenet5", "gtsrb": "gtsrb_cnn"}
PGD_EPS = {"mnist": 0.1, "gtsrb": 2 / 255}  # budgets that leave some frames right, so ranking them means something
CORRUPTIONS = (("fog", 3), ("gaussian_noise", 3))
COVERAGES = (0.95, 0.9, 0.8)
TARGET_COVERAGE = 0.9
STRIP_BLENDS = 16
STRIP_OVERLAYS = 100  # as a deployment's `strip` score: clean images apart from the calibration ones
SCORES = ("msp", "margin", "entropy", "gambler", "strip")


def _scorers(model: torch.nn.Module, gambler: Any, overlays: torch.Tensor, seed: int) -> dict[str, Any]:
    scorers: dict[str, Any] = {name: SoftmaxScore(name) for name in ("msp", "margin", "entropy")}
    scorers["gambler"] = GamblerScore(gambler)
    scorers["strip"] = StripScore(overlays, STRIP_BLENDS, torch.Generator().manual_seed(seed))
    return scorers


def _score_all(model: torch.nn.Module, scorers: dict[str, Any], images: torch.Tensor) -> tuple[np.ndarray, dict]:
    """Predictions and every score of `images`, in batches."""
    predictions, scores = [], {name: [] for name in scorers}
    with torch.inference_mode():
        for chunk in images.split(500):
            logits = model(chunk)
            predictions.append(logits.argmax(dim=1).numpy())
            for name, scorer in scorers.items():
                scores[name].append(scorer(chunk, logits, model))
    return np.concatenate(predictions), {name: np.concatenate(v) for name, v in scores.items()}


def _kinds(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    kinds = {"clean": x}
    for kind, severity in CORRUPTIONS:
        seen = corrupt(x, kind, severity, torch.Generator().manual_seed(seed))
        kinds[f"{kind}-{severity}"] = (seen * 255.0).round() / 255.0
    adversarial = [
        pgd(model, xb, yb, eps=PGD_EPS[name], steps=20, generator=torch.Generator().manual_seed(seed))
        for xb, yb in zip(x.split(250), y.split(250))
    ]
    kinds["pgd"] = (torch.cat(adversarial) * 255.0).round() / 255.0
    return kinds


def _figures(scores: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    coverage, risk = risk_coverage(scores, correct)
    at = {f"risk_at_{c:g}": float(risk[int(np.ceil(c * len(risk))) - 1]) for c in COVERAGES}
    accepted = scores >= threshold
    return {
        "accuracy": float(correct.mean()),
        "aurc": aurc(scores, correct),
        "e_aurc": e_aurc(scores, correct),
        **at,
        "coverage_at_threshold": float(accepted.mean()),
        "risk_at_threshold": float(1 - correct[accepted].mean()) if accepted.any() else None,
        "curve": [float(v) for v in risk[:: max(1, len(risk) // 200)]],
        "curve_coverage": [float(v) for v in coverage[:: max(1, len(coverage) // 200)]],
    }


def run_dataset(name: str, images: int, seed: int) -> dict[str, Any]:
    splits = load_splits(name, DATASETS / name, seed=0)
    arch = ARCH[name]
    config = default_train_config(arch, name)
    started = time.perf_counter()
    trained = get_or_train(arch, splits.train, config, test_ds=splits.test)
    gambler = get_or_train_gambler(arch, splits.train, GamblerConfig(seed=seed))
    model = trained.model.eval()
    order = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(seed))
    if 2 * images > len(order):
        raise SystemExit(
            f"--images {images}: the {name} test split has {len(order)} images; give at most {len(order) // 2}"
        )
    calibration, evaluation = order[STRIP_OVERLAYS:images], order[images : 2 * images]
    on_grid = (splits.test.images * 255.0).round() / 255.0  # the 8-bit pixels cameras send
    x_cal, y_cal = on_grid[calibration], splits.test.labels[calibration]
    x, y = on_grid[evaluation], splits.test.labels[evaluation]
    scorers = _scorers(model, gambler, on_grid[order[:STRIP_OVERLAYS]], seed)
    cal_pred, cal_scores = _score_all(model, scorers, x_cal)
    cal_correct = cal_pred == y_cal.numpy()
    thresholds = {s: for_coverage(s, cal_scores[s], cal_correct, TARGET_COVERAGE).value for s in SCORES}
    rows: dict[str, dict[str, Any]] = {}
    for kind, seen in tqdm(_kinds(name, model, x, y, seed).items(), desc=f"{name}: kinds of frame", unit="kind"):
        predictions, scores = _score_all(model, scorers, seen)
        correct = predictions == y.numpy()
        rows[kind] = {s: _figures(scores[s], correct, thresholds[s]) for s in SCORES}
    return {
        "arch": arch,
        "model_test_accuracy": trained.test_accuracy,
        "gambler_flops_per_image": gambler.flops_per_image,
        "calibration_images": images - STRIP_OVERLAYS,
        "strip_overlays": STRIP_OVERLAYS,
        "evaluation_images": images,
        "thresholds": thresholds,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def _markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# The reject option's scores on clean, corrupted and attacked frames",
        "",
        f"Written by `benchmarks/selective_table.py` on {meta['date']} (seed {meta['seed']}); "
        "`make selective-table` reruns it. For each dataset the test split is cut into held-out images (100 "
        "overlays for STRIP, the rest for the thresholds) and evaluation images, never used to fit anything, all on "
        "the cameras' 8-bit grid. Risks are "
        "error rates in % on the accepted frames; AURC and E-AURC in %. The threshold column uses the "
        f"threshold fitted for {TARGET_COVERAGE:.0%} coverage on clean calibration images. PGD-L-inf (eps "
        f"{PGD_EPS['mnist']:g} on MNIST, {PGD_EPS['gtsrb'] * 255:g}/255 on GTSRB, 20 steps) is crafted on the model "
        "alone: oblivious to the gambler's network and to STRIP's blends.",
        "",
    ]
    for name, result in results.items():
        lines += [
            f"## {name.upper()} ({result['arch']}, {result['calibration_images']} calibration + "
            f"{result['evaluation_images']} evaluation images; model test accuracy "
            f"{result['model_test_accuracy']:.4f})",
            "",
            "| frames | score | accuracy | AURC | E-AURC | risk @95% | risk @90% | risk @80% | "
            "coverage / risk at the clean 90% threshold |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, by_score in result["rows"].items():
            best = min(SCORES, key=lambda s: by_score[s]["aurc"])
            for score in SCORES:
                f = by_score[score]
                risk = "-" if f["risk_at_threshold"] is None else f"{100 * f['risk_at_threshold']:.2f}"
                mark = " (lowest AURC)" if score == best else ""
                lines.append(
                    f"| {kind} | {score}{mark} | {f['accuracy']:.4f} | {100 * f['aurc']:.2f} | "
                    f"{100 * f['e_aurc']:.2f} | {100 * f['risk_at_0.95']:.2f} | {100 * f['risk_at_0.9']:.2f} | "
                    f"{100 * f['risk_at_0.8']:.2f} | {f['coverage_at_threshold']:.3f} / {risk} |"
                )
        lines.append("")
    lines += ["Risk-coverage curves: `selective_curves.png`.", ""]
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(next(iter(results.values()))["rows"])
    fig, axes = plt.subplots(len(results), len(kinds), figsize=(4 * len(kinds), 3.4 * len(results)), squeeze=False)
    for row, (name, result) in enumerate(results.items()):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            for score in SCORES:
                f = result["rows"][kind][score]
                ax.plot(f["curve_coverage"], np.array(f["curve"]) * 100, label=score)
            ax.set_title(f"{name}: {kind}")
            ax.set_xlabel("coverage")
            ax.set_ylabel("selective risk (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(ARCH), default=["mnist", "gtsrb"])
    parser.add_argument("--images", type=int, default=1000, help="calibration images, and as many evaluated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.images < STRIP_OVERLAYS + 50:
        raise SystemExit(
            f"--images {args.images}: give {STRIP_OVERLAYS + 50} or more ({STRIP_OVERLAYS} are STRIP's overlays; the "
            "rest fit the thresholds)"
        )
    torch.set_num_threads(1)
    results = {name: run_dataset(name, args.images, args.seed) for name in args.datasets}
    meta = {"date": dt.date.today().isoformat(), "seed": args.seed, "torch": torch.__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"meta": meta, "results": results}, indent=1)
    atomic_write(RESULTS / f"{NAME}.json", lambda p: p.write_text(text, encoding="utf-8"))
    atomic_write(RESULTS / f"{NAME}.md", lambda p: p.write_text(_markdown(results, meta), encoding="utf-8"))
    atomic_write(RESULTS / "selective_curves.png", lambda p: _plot(results, p))
    print(_markdown(results, meta))


if __name__ == "__main__":
    main()
