"""Is Defed's robustness on MNIST at L-inf 0.1 real, or does its clamp hide the gradient? Three checks.

`make defed-table` finds adaptive PGD through Defed leaves LeNet-5 on MNIST 90-91% accurate at eps 0.1, while
97% of the denoisers' raw outputs fall outside [0, 1], where the clamp passes no gradient. The checks of Athalye
et al. (ICML 2018) and Tramer et al. (NeurIPS 2020) for masked gradients, on the ensemble `make defed-table`
trains (L = (20, 40), k 2, thresholds on clean frames that are not attacked):

1. **Budget sweep.** Adaptive PGD through the whole ensemble at growing eps: with working gradients, accuracy
   falls to about 0 well before eps 0.5 (at 0.5 any digit can be turned grey); a plateau says masking.
2. **Gradient-free attack.** Square (score-based, L-inf 0.1) on the deployed decision with many queries: if it
   beats adaptive PGD at the same budget, PGD's gradients were the weak point.
3. **A known reference.** A denoiser that clamps nearly every pixel to 0 or 1 acts much like binarising the
   frame. Binarising at 0.5 in front of the bare model, attacked with BPDA-PGD (the identity as its gradient,
   the strongest known attack on it), shows what such a preprocessor alone keeps at eps 0.1 and 0.3 on
   these images, and the share of pixels within eps of 0.5 bounds what any attack can flip.

Run: `make defed-masking` (writes benchmarks/results/defed_masking.md and .json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from defed_leak import mnist_ensemble, run_and_write
from superiot_table import Progress

from iotbed.attacks.blackbox import square_attack
from iotbed.attacks.defed_attacks import DefedDecision, adaptive_pgd
from iotbed.attacks.evasion import pgd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EPS = (0.1, 0.2, 0.3, 0.5)


class Binarised(torch.nn.Module):
    """`model((x > 0.5))`, with the identity as the threshold's gradient (BPDA)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hard = (x > 0.5).to(x.dtype)
        return self.model(x + (hard - x).detach())


def accuracy(labels: torch.Tensor, y: torch.Tensor) -> float:
    return float((labels == y).double().mean())


def measure(args: argparse.Namespace) -> dict:
    prog = Progress(3 + len(EPS) + 3, "defed_masking")
    splits, model, ensemble, _ = mnist_ensemble(prog)
    x_all = (splits.test.images * 255).round() / 255
    y_all = splits.test.labels
    with torch.inference_mode():
        right = torch.cat([model(c).argmax(1) for c in x_all.split(512)]) == y_all
    idx = torch.arange(0, len(x_all), max(len(x_all) // args.images, 1))[: args.images]
    idx = idx[right[idx]]  # attack only frames the bare model gets right
    rest = torch.ones(len(x_all), dtype=torch.bool)
    rest[idx] = False
    ensemble.fit_thresholds(x_all[rest & right])
    x, y = x_all[idx], y_all[idx]
    prog.step(f"thresholds on {int((rest & right).sum())} clean frames")
    clean = ensemble.classify(x)
    rows: dict = {"frames": len(x), "clean_accuracy": accuracy(clean.labels, y), "adaptive": [], "binarised": []}
    for eps in EPS:
        g = torch.Generator().manual_seed(args.seed)
        result = adaptive_pgd(ensemble, x, y, eps=eps, alpha=eps / 8, steps=args.steps, generator=g)
        verdict = ensemble.classify(result.x_adv)
        rows["adaptive"].append(
            {"eps": eps, "accuracy": accuracy(verdict.labels, y), "flagged": float(verdict.flagged.double().mean())}
        )
        prog.step(f"adaptive PGD eps {eps}: {100 * rows['adaptive'][-1]['accuracy']:.0f}%")
    decision = DefedDecision(ensemble)
    sq = square_attack(
        decision, x, y, eps=0.1, max_queries=args.queries, generator=torch.Generator().manual_seed(args.seed)
    )
    verdict = ensemble.classify(sq.x_adv)
    rows["square"] = {
        "eps": 0.1,
        "queries": args.queries,
        "accuracy": accuracy(verdict.labels, y),
        "flagged": float(verdict.flagged.double().mean()),
        "mean_queries": float(sq.queries.double().mean()),
    }
    prog.step(f"Square 0.1: {100 * rows['square']['accuracy']:.0f}%")
    binarised = Binarised(model).eval()
    with torch.inference_mode():
        rows["binarised_clean"] = accuracy(binarised(x).argmax(1), y)
    for eps in (0.1, 0.3):
        adv = pgd(binarised, x, y, eps=eps, alpha=eps / 8, steps=args.steps, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            acc = accuracy(binarised(adv).argmax(1), y)
        flippable = float(((x - 0.5).abs() <= eps).double().mean())
        rows["binarised"].append({"eps": eps, "accuracy": acc, "pixels_within_eps_of_half": flippable})
    prog.step("binarised reference")
    prog.close()
    return rows


def markdown(r: dict, meta: dict) -> str:
    p = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# Defed on MNIST at L-inf 0.1: checks for masked gradients",
        "",
        f"Produced by `benchmarks/defed_masking.py` (`make defed-masking`) on {meta['date']}; {meta['machine']}; "
        f"wall time {meta['wall_s']:.0f} s. LeNet-5 behind Defed L = (20, 40), k 2, as `make defed-table` "
        f"trains it; {r['frames']} MNIST test frames the bare model gets right (an even spread), thresholds fitted "
        f"on the other clean test frames. Defed's clean accuracy on them: {p(r['clean_accuracy'])}%. PGD: "
        f"{meta['argv_steps']} steps of eps/8 from a random start.",
        "",
        "| attack | eps | Defed accuracy % | flagged % |",
        "| --- | --- | --- | --- |",
    ]
    for row in r["adaptive"]:
        lines.append(
            f"| adaptive PGD through the ensemble | {row['eps']:g} | {p(row['accuracy'])} | {p(row['flagged'])} |"
        )
    sq = r["square"]
    lines.append(
        f"| Square, {sq['queries']} queries of the deployed decision (mean {sq['mean_queries']:.0f} used) | "
        f"{sq['eps']:g} | {p(sq['accuracy'])} | {p(sq['flagged'])} |"
    )
    lines += [
        "",
        f"Reference, no Defed: the bare model behind binarisation at 0.5 ({p(r['binarised_clean'])}% clean), "
        "attacked with BPDA-PGD:",
        "",
        "| eps | accuracy % | pixels within eps of 0.5 % |",
        "| --- | --- | --- |",
    ]
    for row in r["binarised"]:
        lines.append(f"| {row['eps']:g} | {p(row['accuracy'])} | {p(row['pixels_within_eps_of_half'])} |")
    adaptive = {row["eps"]: row["accuracy"] for row in r["adaptive"]}
    falls = adaptive[max(adaptive)] < 0.1
    beats = sq["accuracy"] < adaptive[0.1] - 0.05
    lines += [
        "",
        "**Reading.** "
        + (
            f"Adaptive PGD does bring Defed down as the budget grows ({p(adaptive[max(adaptive)])}% at eps "
            f"{max(adaptive):g}), so its gradients are not blind everywhere. "
            if falls
            else f"Adaptive PGD leaves Defed {p(adaptive[max(adaptive)])}% accurate even at eps {max(adaptive):g}: "
            "a plateau no real robustness explains, so gradients are masked and the table's adaptive figures are "
            "upper bounds only. "
        )
        + (
            f"Square without any gradient gets further at eps 0.1 ({p(sq['accuracy'])}% against PGD's "
            f"{p(adaptive[0.1])}%): PGD's figure at 0.1 overstates Defed."
            if beats
            else f"Square, gradient-free, does no better at eps 0.1 ({p(sq['accuracy'])}% against PGD's "
            f"{p(adaptive[0.1])}%)."
        )
        + " Binarising at 0.5 alone, with no Defed, keeps "
        + ", ".join(f"{p(row['accuracy'])}% at eps {row['eps']:g}" for row in r["binarised"])
        + " against Defed's "
        + ", ".join(f"{p(adaptive[row['eps']])}%" for row in r["binarised"] if row["eps"] in adaptive)
        + ": on MNIST, whose pixels sit mostly near 0 or 1, a preprocessor that saturates its output keeps small "
        "perturbations from mattering, and Defed's figure at small budgets is of that kind"
        + (
            ", and below what plain binarising keeps."
            if all(row["accuracy"] >= adaptive.get(row["eps"], 1.0) for row in r["binarised"])
            else "."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100, help="MNIST test frames to attack (an even spread)")
    ap.add_argument("--steps", type=int, default=40, help="PGD steps")
    ap.add_argument("--queries", type=int, default=1000, help="Square queries per frame")
    ap.add_argument("--seed", type=int, default=0, help="drives every random choice of the run")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the saved .json")
    args = ap.parse_args(argv)
    run_and_write("defed_masking", args, measure, markdown, argv_steps=args.steps)


if __name__ == "__main__":
    main()
