"""Adversarial images for a scenario's attacks, crafted once per run before the clock starts.

An attacker in the running system (a compromised camera, a man in the middle) sends, for the dataset image
a frame shows, the adversarial version crafted here. Crafting takes the whole test split at once, in chunks
that are cached on disk (`cached_attack`), so a sweep crafts each setting once. Results are put back on the
8-bit grid the frames travel on by rounding the perturbation toward zero, which never leaves the budget.

Oblivious attacks are crafted on the bare model. Adaptive ones are crafted on `DefendedModel(chain,
model)`: BPDA through the chain's estimate (the identity), and for a random chain (SUPER-IoT's drop, pixel
deflection) the gradient averaged over `eot_samples` draws (EOT). Against an edge with Defed, adaptive PGD
differentiates through the ensemble itself (`iotbed.attacks.defed_attacks`): every outcome Defed can pick,
or, detector-aware, the bare margin plus each score's excess over its threshold. The black-box methods
(Square, HopSkipJump) query the deployed decision -- the chain and, where there is one, Defed's label --
with a fresh draw of any random defense per query.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from iotbed.attacks.adaptive import cached_attack, eot_gradient
from iotbed.attacks.blackbox import hop_skip_jump, square_attack
from iotbed.attacks.defed_attacks import DefedDecision, adaptive_pgd, detector_aware_pgd
from iotbed.attacks.evasion import bim, carlini_wagner_l2, deepfool, fgsm, mi_fgsm, pgd
from iotbed.defenses.base import DefendedModel
from iotbed.defenses.defed import DefedEnsemble
from iotbed.defenses.pipeline import DefenseChain

CHUNK = 256  # images per cached piece: a progress step, and what an interrupted run keeps
RANDOM_START = ("pgd", "square", "hopskipjump")  # the methods that draw from the crafting seed


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params: Any) -> torch.Tensor:
    return square_attack(model, x, y, **params).x_adv


def hop_skip_jump_within(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, **params: Any
) -> torch.Tensor:
    """HopSkipJump's minimum-norm example where it is within `eps` and adversarial, else the clean image: an
    attacker with a budget sends nothing larger."""
    result = hop_skip_jump(model, x, y, **params)
    keep = result.success & (result.distance <= eps)
    return torch.where(keep[:, None, None, None], result.x_adv, x)


def through_defed(
    ensemble: DefedEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    detector_aware: bool,
    thresholds: list[float],
    **params: Any,
) -> torch.Tensor:
    """Adaptive PGD through a fitted Defed ensemble. `thresholds` only keys the cache: they decide where each
    image stops (and, detector-aware, the hinge), so a refit must not reuse frames crafted for others."""
    assert ensemble.thresholds is not None and thresholds == ensemble.thresholds.values.tolist()
    attack = detector_aware_pgd if detector_aware else adaptive_pgd
    return attack(ensemble, x, y, **params).x_adv


def method_call(spec: Any, num_classes: int) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
    """The attack function and its keyword arguments (JSON values) for a scenario attack entry."""
    method, eps, steps = spec.method, float(spec.eps), int(spec.steps)
    if method == "fgsm":
        return fgsm, {"eps": eps}
    if method == "bim":
        return bim, {"eps": eps, "alpha": spec.alpha, "steps": steps}
    if method == "mi_fgsm":
        return mi_fgsm, {"eps": eps, "alpha": spec.alpha, "steps": steps}
    # A confidence margin (kappa) only where asked, so that the cache keys of other attacks stay as they were.
    kappa = {"kappa": float(spec.confidence)} if getattr(spec, "confidence", 0.0) > 0 else {}
    if method == "pgd":
        return pgd, {"eps": eps, "alpha": spec.alpha, "steps": steps, "norm": spec.norm, **kappa}
    if method == "cw_l2":
        return carlini_wagner_l2, {"max_iter": steps, **kappa}
    if method == "deepfool":
        return deepfool, {"max_iter": steps, "num_classes": min(10, num_classes)}
    if method == "square":
        return square, {"eps": eps, "norm": spec.norm, "max_queries": int(spec.queries)}
    if method == "hopskipjump":
        return hop_skip_jump_within, {"eps": eps, "norm": spec.norm, "max_queries": int(spec.queries)}
    raise ValueError(f"unknown attack method {method!r}")


def quantise(adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`adv` on the 8-bit grid of `x`, the perturbation rounded toward zero (never past the budget)."""
    base = torch.round(x * 255.0)
    return ((base + torch.trunc((adv - x) * 255.0)).clamp(0.0, 255.0) / 255.0).to(x.dtype)


def _with_grad_fn(
    attack: Callable[..., torch.Tensor], grad_fn: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params: Any) -> torch.Tensor:
        return attack(model, x, y, grad_fn=grad_fn, **params)

    return run


def craft(
    spec: Any,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    chain: DefenseChain | None,
    seed: int,
    num_classes: int,
    progress: bool = True,
    adaptive: bool | None = None,
    defed: DefedEnsemble | None = None,
) -> torch.Tensor:
    """The adversarial version of every image, for one attack entry: oblivious unless `adaptive`; a black-box
    method queries the deployed decision (`chain`, then `defed` or the model) whatever `adaptive` says."""
    adaptive = spec.adaptive if adaptive is None else adaptive
    attack, params = method_call(spec, num_classes)
    black_box = spec.method in ("square", "hopskipjump")
    defended = chain is not None and bool(chain.stages)
    through = defed is not None and (adaptive or black_box)
    if through and defed is not None and defed.thresholds is not None:
        params = {**params, "thresholds": defed.thresholds.values.tolist()}
    if black_box:
        name = f"{spec.method}-blackbox" + ("-defed" if through else "")
    elif adaptive and through:
        if defended:
            raise ValueError("adaptive crafting through Defed behind other input defenses is not supported")
        name = "pgd-detector-aware-defed" if spec.detector_aware else "pgd-adaptive-defed"
        alpha = spec.alpha if spec.alpha is not None else float(spec.eps) / 4  # pgd's own default
        params = {**params, "alpha": alpha, "detector_aware": bool(spec.detector_aware)}
    else:
        name = f"{spec.method}{'-adaptive' if adaptive else ''}"
        if adaptive and defended:
            name += f"-eot{spec.eot_samples}" if chain.randomized else "-bpda"  # type: ignore[union-attr]
            params = {**params, "eot_samples": spec.eot_samples if chain.randomized else 1}  # type: ignore[union-attr]
    seed_for = seed if spec.method in RANDOM_START else None
    pieces = []
    starts = range(0, len(images), CHUNK)
    label = f"crafting {spec.label} ({name})"
    for i, start in enumerate(tqdm(starts, desc=label, unit="chunk", disable=not progress, file=sys.stderr)):
        x, y = images[start : start + CHUNK], labels[start : start + CHUNK]
        # A fresh generator per chunk, seeded from the run: the chunk's cache key stays stable.
        draws = torch.Generator().manual_seed(seed + i) if defended and chain.randomized else None  # type: ignore[union-attr]
        target: nn.Module = model
        run = attack
        call_params = {k: v for k, v in params.items() if k not in ("eot_samples", "thresholds")}
        if black_box:
            decision: nn.Module = DefedDecision(defed) if through else model  # type: ignore[arg-type]
            target = DefendedModel(chain, decision, draws) if defended else decision  # type: ignore[arg-type]
            call_params = {k: v for k, v in params.items() if k != "thresholds"} if through else call_params
            run = _ignoring("thresholds", attack) if through else attack
        elif adaptive and through:
            target, run, call_params = defed, through_defed, params  # type: ignore[assignment]
        elif adaptive and defended:
            target = DefendedModel(chain, model, draws)  # type: ignore[arg-type]
            if chain.randomized and params["eot_samples"] > 1:  # type: ignore[union-attr]
                run = _with_grad_fn(attack, eot_gradient(target, params["eot_samples"]))
        adv = cached_attack(
            run,
            target,
            x,
            y,
            seed=None if seed_for is None else seed_for + i,
            name=f"iotbed.scenario.{name}",
            **call_params,
        )
        pieces.append(quantise(adv, x))
    return torch.cat(pieces) if pieces else images.clone()


def _ignoring(key: str, attack: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`attack` with one keyword that only keys the cache taken off."""

    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **params: Any) -> torch.Tensor:
        params.pop(key, None)
        return attack(model, x, y, **params)

    return run


def bare_predictions(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(chunk).argmax(1).numpy() for chunk in images.split(1024)])
