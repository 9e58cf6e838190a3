"""Adversarial images for a scenario's attacks, crafted once per run before the clock starts.

An attacker in the running system (a compromised camera, a man in the middle) sends, for the dataset image
a frame shows, the adversarial version crafted here. Crafting takes the whole test split at once, in chunks
that are cached on disk (`cached_attack`), so a sweep crafts each setting once. Results are put back on the
8-bit grid the frames travel on by rounding the perturbation toward zero, which never leaves the budget.

Oblivious attacks are crafted on the bare model. Adaptive ones are crafted on `DefendedModel(chain,
model)`: BPDA through the chain's estimate (the identity), and for a random chain (SUPER-IoT's drop, pixel
deflection) the gradient averaged over `eot_samples` draws (EOT).
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
from iotbed.attacks.evasion import bim, carlini_wagner_l2, deepfool, fgsm, mi_fgsm, pgd
from iotbed.defenses.base import DefendedModel
from iotbed.defenses.pipeline import DefenseChain

CHUNK = 256  # images per cached piece: a progress step, and what an interrupted run keeps


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
) -> torch.Tensor:
    """The adversarial version of every image, for one attack entry (oblivious unless `adaptive`)."""
    adaptive = spec.adaptive if adaptive is None else adaptive
    attack, params = method_call(spec, num_classes)
    name = f"{spec.method}{'-adaptive' if adaptive else ''}"
    if adaptive and chain is not None and chain.stages:
        name += f"-eot{spec.eot_samples}" if chain.randomized else "-bpda"
        params = {**params, "eot_samples": spec.eot_samples if chain.randomized else 1}
    seed_for = seed if spec.method == "pgd" else None  # the only method with a random start
    pieces = []
    starts = range(0, len(images), CHUNK)
    label = f"crafting {spec.label} ({name})"
    for i, start in enumerate(tqdm(starts, desc=label, unit="chunk", disable=not progress, file=sys.stderr)):
        x, y = images[start : start + CHUNK], labels[start : start + CHUNK]
        target: nn.Module = model
        run = attack
        call_params = {k: v for k, v in params.items() if k != "eot_samples"}
        if adaptive and chain is not None and chain.stages:
            # A fresh generator per chunk, seeded from the run: the chunk's cache key stays stable.
            target = DefendedModel(chain, model, torch.Generator().manual_seed(seed + i) if chain.randomized else None)
            if chain.randomized and params["eot_samples"] > 1:
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


def bare_predictions(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(chunk).argmax(1).numpy() for chunk in images.split(1024)])
