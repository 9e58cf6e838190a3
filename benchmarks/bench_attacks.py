"""PGD (L-inf, eps 8/255, alpha 2/255, 10 steps, random start) in iotbed against torchattacks.PGD with
the same settings, on the same model and images: wall time of each, their ratio (target: iotbed not
slower, ratio <= 1) and the robust accuracy each leaves. Then SUPER-IoT's robust accuracy under the
oblivious attack (PGD on the bare model) and under adaptive ones (BPDA, BPDA + EOT), as DESIGN.md asks.

    .venv/bin/python benchmarks/bench_attacks.py [--dataset gtsrb|digits] [--images 256] [--threads 1]

The model is `gtsrb_cnn` trained on GTSRB with the default config (trained once, then cached under
$IOTBED_CACHE_DIR or the user cache), or LeNet-5 on digits. Needs torchattacks (a benchmark-only
dependency). Prints JSON and writes benchmarks/results/bench_attacks.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from iotbed.attacks.adaptive import bpda_pgd  # noqa: E402
from iotbed.attacks.evasion import pgd, robust_accuracy  # noqa: E402
from iotbed.data import load_splits  # noqa: E402
from iotbed.defenses.base import DefendedModel  # noqa: E402
from iotbed.defenses.superiot import SuperIoT  # noqa: E402
from iotbed.models import get_or_train  # noqa: E402

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10


def expected_accuracy(defended: DefendedModel, x: torch.Tensor, y: torch.Tensor, draws: int) -> float:
    """A random defense's accuracy averaged over `draws` independent draws per image."""
    return robust_accuracy(defended, x.repeat(draws, 1, 1, 1), y.repeat(draws))


def compare_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, Any]:
    import torchattacks  # benchmark-only dependency

    reference = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)

    def run_iotbed() -> torch.Tensor:
        return pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS, generator=torch.Generator().manual_seed(0))

    def run_torchattacks() -> torch.Tensor:
        torch.manual_seed(0)  # torchattacks draws its random start from the global RNG
        return reference(x, y)

    times: dict[str, list[float]] = {"iotbed": [], "torchattacks": []}
    outputs: dict[str, torch.Tensor] = {}
    for name, fn in (("iotbed", run_iotbed), ("torchattacks", run_torchattacks)):
        outputs[name] = fn()  # warm-up
    for _ in range(repeats):  # interleaved, so machine load hits both alike
        for name, fn in (("iotbed", run_iotbed), ("torchattacks", run_torchattacks)):
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    t_ours, t_ref = statistics.median(times["iotbed"]), statistics.median(times["torchattacks"])
    return {
        "iotbed_s": t_ours,
        "torchattacks_s": t_ref,
        "ratio_iotbed_over_torchattacks": t_ours / t_ref,
        "target_not_slower_met": t_ours <= t_ref * 1.05,  # 5%: timing noise on a shared machine
        "iotbed_ms_per_image": 1e3 * t_ours / len(x),
        "torchattacks_ms_per_image": 1e3 * t_ref / len(x),
        "all_times_s": times,
        "robust_accuracy_iotbed": robust_accuracy(model, outputs["iotbed"], y),
        "robust_accuracy_torchattacks": robust_accuracy(model, outputs["torchattacks"], y),
        "max_linf_iotbed": float((outputs["iotbed"] - x).abs().max()),
        "max_linf_torchattacks": float((outputs["torchattacks"] - x).abs().max()),
    }


def superiot_under_attack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int, draws: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"draws_per_image": draws, "eot_samples": eot, "settings": []}
    for ws, rate in ((8, 0.1), (8, 0.25)):
        defended = DefendedModel(SuperIoT(ws=ws, rate=rate), model, generator=torch.Generator().manual_seed(1))
        row: dict[str, Any] = {"ws": ws, "nominal_rate": rate, "clean": expected_accuracy(defended, x, y, draws)}
        for eps in (2 / 255, EPS):
            alpha = eps / 4
            start = time.perf_counter()
            oblivious = pgd(model, x, y, eps=eps, alpha=alpha, steps=STEPS, generator=torch.Generator().manual_seed(2))
            bpda = bpda_pgd(
                defended, x, y, eps=eps, alpha=alpha, steps=STEPS, generator=torch.Generator().manual_seed(2)
            )
            bpda_eot = bpda_pgd(
                defended,
                x,
                y,
                eps=eps,
                alpha=alpha,
                steps=STEPS,
                eot_samples=eot,
                generator=torch.Generator().manual_seed(2),
            )
            row[f"eps_{round(eps * 255)}/255"] = {
                "undefended": robust_accuracy(model, oblivious, y),
                "oblivious": expected_accuracy(defended, oblivious, y, draws),
                "bpda": expected_accuracy(defended, bpda, y, draws),
                "bpda_eot": expected_accuracy(defended, bpda_eot, y, draws),
                "seconds": time.perf_counter() - start,
            }
        out["settings"].append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("gtsrb", "digits"), default="gtsrb")
    parser.add_argument("--gtsrb", default=str(ROOT.parent / "shared" / "datasets" / "gtsrb"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eot", type=int, default=8)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.dataset == "gtsrb":
        splits, arch = load_splits("gtsrb", args.gtsrb), "gtsrb_cnn"
    else:
        splits, arch = load_splits("digits"), "lenet5"
    trained = get_or_train(arch, splits.train, progress=False)
    model = trained.model.eval()
    test = splits.test
    step = max(len(test) // args.images, 1)
    x, y = test.images[::step][: args.images], test.labels[::step][: args.images]

    results = {
        "benchmark": "bench_attacks",
        "dataset": test.name,
        "arch": arch,
        "model_key": trained.key,
        "images": len(x),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "pgd": {"eps": EPS, "alpha": ALPHA, "steps": STEPS, "random_start": True},
        "clean_accuracy": robust_accuracy(model, x, y),
        "pgd_vs_torchattacks": compare_pgd(model, x, y, args.repeats),
        "superiot": superiot_under_attack(model, x, y, args.eot, args.draws),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2)
    (RESULTS / "bench_attacks.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
