"""Attacks on Defed (`iotbed.defenses.defed`) by an attacker who knows it: white-box adaptive PGD through the
whole pipeline, detector-aware PGD that also keeps every denoiser's score under its threshold, and the
deployed decision as a model for the black-box attacks.

Papers: Defed (Xiao et al., "Defed: An Edge Feature Enhanced Image Denoised Network Against Adversarial
Attacks for Secure Internet of Things", IEEE IoT Journal 10(8), 2023); PGD (Madry et al., ICLR 2018); the
detector-aware loss follows Carlini and Wagner, "Adversarial Examples Are Not Easily Detected: Bypassing Ten
Detection Methods" (AISec 2017): the classification loss plus a constant c times a loss that is zero once the
detector passes the frame, with c searched per image; the advice on adaptive attacks follows Athalye et al.
(ICML 2018) and Tramer et al., "On Adaptive Attacks to Adversarial Example Defenses" (NeurIPS 2020).

What Defed decides for a frame x (the authors' `5-multi-processors-defender.py`): with scores
s_i(x) = alpha * CE(f(D_i(x)), argmax f(x)) + MSE(x, D_i(x)) and thresholds t_i, the frame is flagged when any
s_i > t_i; an unflagged frame gets argmax f(x), a flagged one argmax of sum of softmax f(D_i(x)) over the
denoisers that flagged it. Every part of it is differentiable except the switch between those outcomes, so
no BPDA is needed, but the decision itself is piecewise constant in which outcome applies. The two attacks:

- `adaptive_pgd` attacks the decision as a whole. Its loss covers every outcome Defed could pick for the
  frame -- the bare prediction and the vote of each non-empty subset of denoisers that could flag it (all
  2^D - 1 subsets for D <= 4 denoisers; beyond that the single denoisers and all of them together) -- as the
  sum of their Carlini-Wagner margins (log-probability of the true class minus the best other one, floored
  at -kappa), so an outcome already wrong stops pulling and the step goes to those still right. Once all of
  them are wrong the frame is wrong whatever the thresholds flag; per image the attack stops earlier, as
  soon as the real decision (the fitted thresholds) is wrong, and keeps that iterate. A soft gate on the
  thresholds was not used: its gradient vanishes away from the thresholds, where most frames sit.
- `detector_aware_pgd` wants a frame that is misclassified AND unflagged, so the decision is the bare
  model's: it minimises the bare margin (floored at -kappa) plus c * sum_i relu(s_i - (1 - rho) t_i), the
  hinge of each score over its threshold less a relative safety margin rho. The constant c is searched per
  image over `search_steps` rounds as Carlini and Wagner do (x10 until bracketed, then bisection): a round
  that ends flagged raises c, one that ends unflagged but still right lowers it; every round random-starts
  afresh and only images not yet successful take part. An image stops as soon as it succeeds.

Both are batched (in chunks of the ensemble's `batch_size`), validated like `iotbed.attacks.evasion`, seeded
(only the `generator` passed in is drawn from), and hold their budgets exactly in floating point (L-inf:
|x_adv - x| <= eps for every pixel; L2: ||x_adv - x||_2 <= eps per image), with x_adv in [0, 1]. Their result's
`success`, `labels`, `flagged` and `scores` are never the attack's bookkeeping: they come from
`DefedEnsemble.classify` on the returned frames. The budget, step size, steps and the steps each image took
are reported in the result.

`DefedDecision` wraps a fitted ensemble as an `nn.Module` whose output's argmax is Defed's label: the bare
logits for an unflagged frame, the log of the flagging denoisers' summed softmax for a flagged one. It is
what a compromised camera without the model can query (`iotbed.attacks.blackbox`): the scores of the
decision the edge takes, never a gradient.

Differences from the authors' code: the authors evaluate Defed only against attacks crafted on the bare
classifier (ART 1.7.1: PGD-L1/L2, C&W-Linf, DeepFool, JSMA, HopSkipJump, Square); none of these attacks is
theirs, and nothing here is a translation of any published implementation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iotbed.attacks.blackbox import _clip_linf, _fit_l2
from iotbed.attacks.evasion import (
    Norm,
    _check_inputs,
    _check_norm,
    _check_number,
    _check_steps,
    _flat_norm,
    _project,
    _step,
)
from iotbed.defenses.defed import DefedEnsemble, DefedPass, ensemble_decision
from iotbed.models.training import evaluating

__all__ = [
    "DefedAttackResult",
    "DefedDecision",
    "adaptive_pgd",
    "decision_outcomes",
    "detector_aware_pgd",
]

# Beyond this many denoisers the adaptive loss covers the single denoisers and all of them, not every subset.
MAX_SUBSET_DENOISERS = 4


@dataclass(frozen=True)
class DefedAttackResult:
    """Per image: the adversarial frames, and Defed's verdict on them re-predicted by `DefedEnsemble.classify`.

    `success` is the attack's goal on that verdict: for `adaptive_pgd` the label differs from y (or equals the
    target when targeted); for `detector_aware_pgd` that AND no denoiser flags the frame. `steps` counts the
    gradient steps each image took over all rounds; `constants` is the detector weight c of each image's last
    round (detector-aware only). `settings` holds the budget and step settings, JSON-ready."""

    x_adv: torch.Tensor  # (N, C, H, W) in [0, 1]
    success: torch.Tensor  # (N,) bool
    labels: torch.Tensor  # (N,) int64: Defed's label of x_adv
    flagged: torch.Tensor  # (N,) bool
    scores: torch.Tensor  # (D, N)
    steps: torch.Tensor  # (N,) int64
    distance: torch.Tensor  # (N,) size of x_adv - x in the attack's norm
    constants: torch.Tensor | None = None  # (N,) detector weight c (detector-aware)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else float("nan")


# --- checks and shared pieces ----------------------------------------------------------------------------


def _check_ensemble(ensemble: object) -> DefedEnsemble:
    if not isinstance(ensemble, DefedEnsemble):
        raise ValueError(f"the Defed attacks need a DefedEnsemble, got {type(ensemble).__name__}")
    if ensemble.thresholds is None:
        raise ValueError("fit the ensemble's thresholds (fit_thresholds) before attacking it")
    return ensemble


def _check_labels(y: torch.Tensor, ensemble: DefedEnsemble, x: torch.Tensor) -> None:
    if y.numel() == 0:
        return
    if bool(y.min() < 0):
        raise ValueError("y must be class indices >= 0")
    with torch.no_grad(), evaluating(ensemble):  # eval: a training-mode BatchNorm would update its statistics
        classes = ensemble.classifier(x[:1].float()).shape[1]
    if int(y.max()) >= classes:
        raise ValueError(f"y holds class {int(y.max())} but the classifier answers {classes} classes")


def _check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be a bool, got {value!r}")
    return value


def _fit_budget(z: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Into the eps-ball and [0, 1] exactly as computed in z's dtype (a rounding one ulp past eps moved back)."""
    return _clip_linf(z, x, eps) if norm == "inf" else _fit_l2(z, x, eps)


def _random_start(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator) -> torch.Tensor:
    """Uniform in the L-inf ball, or a uniform direction at a radius uniform in [0, eps] in L2 (as `pgd`)."""
    if norm == "inf":
        noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        radius = torch.rand((x.shape[0], 1, 1, 1), generator=generator, dtype=x.dtype) * eps
        noise = direction / _flat_norm(direction).clamp(min=1e-12) * radius
    return _fit_budget(_project(x + noise.to(x.device), x, eps, norm), x, eps, norm)


def _distance(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    flat = delta.flatten(1)
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    return flat.abs().amax(1) if norm == "inf" else flat.norm(dim=1)


def _log_margin(logp: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Log-probability of the true class minus the best other one (targeted: best other minus the target's):
    positive while the outcome is still what the attacker does not want."""
    own = logp.gather(-1, y[..., None].expand(*logp.shape[:-1], 1)).squeeze(-1)
    other = logp.masked_fill(F.one_hot(y, logp.shape[-1]).bool().expand_as(logp), -math.inf).amax(-1)
    return other - own if targeted else own - other


def decision_outcomes(p: DefedPass) -> torch.Tensor:
    """(O, N, K) log-probabilities of every outcome Defed can pick for each frame: row 0 the bare model
    (log-softmax of f(x)), then the vote of each non-empty subset S of denoisers, log of the mean softmax of
    f(D_i(x)) over S (its argmax is the authors' summed-softmax vote). All 2^D - 1 subsets for D <= 4
    denoisers, else the single denoisers and the whole set."""
    d = p.denoised_logits.shape[0]
    logp = torch.log_softmax(p.denoised_logits, dim=2)  # (D, N, K)
    if d <= MAX_SUBSET_DENOISERS:
        subsets = [s for r in range(1, d + 1) for s in itertools.combinations(range(d), r)]
    else:
        subsets = [(i,) for i in range(d)] + [tuple(range(d))]
    votes = [torch.logsumexp(logp[list(s)], dim=0) - math.log(len(s)) for s in subsets]
    return torch.stack([torch.log_softmax(p.bare_logits, dim=1), *votes])


# An objective maps (pass, labels, per-image detector weight) to per-image values to ASCEND.
Objective = Callable[[DefedPass, torch.Tensor, torch.Tensor], torch.Tensor]
# A goal maps (pass, labels) to per-image bools: the attack reached what it wants at this iterate.
Goal = Callable[[DefedPass, torch.Tensor], torch.Tensor]


def _pgd_rounds(
    ensemble: DefedEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    goal: Goal,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: Norm,
    random_start: bool,
    generator: torch.Generator | None,
    constants: torch.Tensor,
    todo: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PGD run for the images `todo` (indices into x). Each image stops at the first iterate that meets
    `goal` and keeps it; the others end at their last iterate. Returns (x_adv for todo, reached (bool), steps
    taken, flagged at the kept iterate), in chunks of the ensemble's batch_size."""
    outs, reached_all, steps_all, flagged_all = [], [], [], []
    for start in range(0, todo.numel(), ensemble.batch_size):
        rows = todo[start : start + ensemble.batch_size]
        x0, y0, c0 = x[rows], y[rows], constants[rows]
        x_adv = _random_start(x0, eps, norm, generator) if random_start else x0.clone()
        reached = torch.zeros(rows.numel(), dtype=torch.bool, device=x.device)
        flagged = torch.zeros_like(reached)
        taken = torch.zeros(rows.numel(), dtype=torch.long)
        active = torch.arange(rows.numel(), device=x.device)
        for t in range(steps + 1):
            if active.numel() == 0:
                break
            last = t == steps
            xa = x_adv[active].detach().requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                p = ensemble(xa)
                value = None if last else objective(p, y0[active], c0[active])
            with torch.no_grad():
                done = goal(p, y0[active])
                flags = ensemble_decision(
                    p.scores.detach(),
                    p.denoised_logits.detach(),
                    p.bare_logits.detach(),
                    ensemble.thresholds.values,
                )[0]
            flagged[active] = flags
            reached[active[done]] = True
            if last:
                break
            (grad,) = torch.autograd.grad(value.sum(), xa)
            go = ~done
            moving = active[go]
            stepped = _step(x_adv[moving], grad[go], alpha, norm)
            x_adv[moving] = _fit_budget(_project(stepped, x0[moving], eps, norm), x0[moving], eps, norm)
            taken[moving.cpu()] += 1
            active = moving
        outs.append(x_adv.detach())
        reached_all.append(reached)
        steps_all.append(taken)
        flagged_all.append(flagged)
    if not outs:
        empty = x[:0].clone()
        return (
            empty,
            torch.zeros(0, dtype=torch.bool),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.bool),
        )
    return torch.cat(outs), torch.cat(reached_all), torch.cat(steps_all), torch.cat(flagged_all)


def _check_common(
    ensemble: DefedEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float | None,
    steps: int,
    norm: object,
    random_start: bool,
    generator: torch.Generator | None,
    kappa: float,
    targeted: bool,
) -> tuple[DefedEnsemble, float, float, int, Norm, float]:
    ensemble = _check_ensemble(ensemble)
    _check_inputs(ensemble, x, y)
    ensemble._check(x)
    eps = _check_number(eps, "eps")
    alpha = eps / 10 if alpha is None else _check_number(alpha, "alpha")
    steps = _check_steps(steps)
    norm = _check_norm(norm)
    _check_bool(random_start, "random_start")
    _check_bool(targeted, "targeted")
    if random_start and not isinstance(generator, torch.Generator):
        raise ValueError("random_start needs a torch.Generator (no global RNG); pass generator= or random_start=False")
    kappa = _check_number(kappa, "kappa")
    _check_labels(y, ensemble, x)
    return ensemble, eps, alpha, steps, norm, kappa


def _check_stop_thresholds(stop: Sequence[torch.Tensor] | None, ensemble: DefedEnsemble) -> list[torch.Tensor]:
    if stop is None:
        return [ensemble.thresholds.values]
    if isinstance(stop, torch.Tensor) or not isinstance(stop, Sequence) or len(stop) == 0:
        raise ValueError("stop_thresholds must be a non-empty list of threshold vectors (one value per denoiser)")
    d = len(ensemble.denoisers)
    out = []
    for t in stop:
        if not isinstance(t, torch.Tensor) or t.shape != (d,) or not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"each stop threshold must be a finite tensor of shape ({d},), got {getattr(t, 'shape', t)}"
            )
        out.append(t.detach())
    return out


def _result(
    ensemble: DefedEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    x_adv: torch.Tensor,
    steps: torch.Tensor,
    norm: Norm,
    targeted: bool,
    need_unflagged: bool,
    constants: torch.Tensor | None,
    settings: dict[str, Any],
) -> DefedAttackResult:
    verdict = ensemble.classify(x_adv)
    hit = verdict.labels == y if targeted else verdict.labels != y
    success = hit & ~verdict.flagged if need_unflagged else hit
    return DefedAttackResult(
        x_adv=x_adv,
        success=success,
        labels=verdict.labels,
        flagged=verdict.flagged,
        scores=verdict.scores,
        steps=steps,
        distance=_distance(x_adv - x, norm),
        constants=constants,
        settings=settings,
    )


# --- the attacks -----------------------------------------------------------------------------------------


def adaptive_pgd(
    ensemble: DefedEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    norm: Norm = "inf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    kappa: float = 0.0,
    targeted: bool = False,
    stop_thresholds: Sequence[torch.Tensor] | None = None,
) -> DefedAttackResult:
    """White-box PGD through the whole Defed pipeline (denoisers, classifier, scores), in L-inf or L2 with
    budget `eps`, step `alpha` (default eps/10), `steps` steps, optionally from a random start drawn from
    `generator`. It ascends minus the sum over every outcome Defed can pick (`decision_outcomes`) of that
    outcome's margin floored at -kappa, and stops per image at the first iterate whose real decision is wrong
    (targeted: the target) under the ensemble's fitted thresholds -- or, with `stop_thresholds` (a list of (D,)
    threshold vectors, e.g. those of k = 2 and k = 3), under every one of them, so that one run serves them all.
    The objective does not depend on the thresholds. Success is re-predicted by `ensemble.classify`."""
    ensemble, eps, alpha, steps, norm, kappa = _check_common(
        ensemble, x, y, eps, alpha, steps, norm, random_start, generator, kappa, targeted
    )
    stops = _check_stop_thresholds(stop_thresholds, ensemble)
    x, y = x.detach(), y.long()

    def objective(p: DefedPass, yy: torch.Tensor, _c: torch.Tensor) -> torch.Tensor:
        margins = _log_margin(decision_outcomes(p), yy, targeted)
        return -margins.clamp(min=-kappa).sum(dim=0)

    def goal(p: DefedPass, yy: torch.Tensor) -> torch.Tensor:
        reached = torch.ones_like(yy, dtype=torch.bool)
        for t in stops:
            labels = ensemble_decision(p.scores, p.denoised_logits, p.bare_logits, t)[2]
            reached &= labels == yy if targeted else labels != yy
        return reached

    n = x.shape[0]
    with evaluating(ensemble):
        x_adv, _, taken, _ = _pgd_rounds(
            ensemble,
            x,
            y,
            objective,
            goal,
            eps=eps,
            alpha=alpha,
            steps=steps,
            norm=norm,
            random_start=random_start,
            generator=generator,
            constants=torch.zeros(n, dtype=x.dtype, device=x.device),
            todo=torch.arange(n, device=x.device),
        )
        settings = {
            "attack": "adaptive_pgd",
            "norm": norm,
            "eps": eps,
            "alpha": alpha,
            "steps": steps,
            "random_start": random_start,
            "kappa": kappa,
            "targeted": targeted,
            "outcomes": "bare + every flagging subset's vote"
            if len(ensemble.denoisers) <= MAX_SUBSET_DENOISERS
            else "bare + single denoisers + all",
            "k": ensemble.k,
            "stop_thresholds": [t.tolist() for t in stops],
        }
        return _result(ensemble, x, y, x_adv, taken, norm, targeted, False, None, settings)


def detector_aware_pgd(
    ensemble: DefedEnsemble,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    norm: Norm = "inf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    kappa: float = 0.0,
    c: float = 1.0,
    search_steps: int = 3,
    rho: float = 0.05,
    targeted: bool = False,
) -> DefedAttackResult:
    """PGD for frames Defed gets wrong AND does not flag (Carlini and Wagner's detector-aware recipe), in L-inf
    or L2 with budget `eps`, step `alpha` (default eps/10), `steps` steps per round.

    It descends margin(f(x)) floored at -kappa (log-probabilities; targeted: toward the target) plus
    c * sum_i relu(s_i(x) - (1 - rho) * t_i), each denoiser's score over its threshold less a relative margin
    `rho`. The constant starts at `c` for every image; over `search_steps` rounds an image that failed while
    flagged gets a larger c (x10 until an upper bound is known, then the midpoint), one that failed unflagged
    but still classified right a smaller one (the midpoint with the lower bound, 0 at first). Each round
    random-starts afresh (when `random_start`) and runs only the images not yet successful; each image stops at
    its first successful iterate. Success (wrong label and unflagged) is re-predicted by `ensemble.classify`."""
    ensemble, eps, alpha, steps, norm, kappa = _check_common(
        ensemble, x, y, eps, alpha, steps, norm, random_start, generator, kappa, targeted
    )
    c = _check_number(c, "c", strict=True)
    search_steps = _check_steps(search_steps, "search_steps", 1)
    rho = _check_number(rho, "rho")
    if rho >= 1:
        raise ValueError(f"rho (the margin under each threshold, a share of it) must be in [0, 1), got {rho}")
    x, y = x.detach(), y.long()
    limits = ensemble.thresholds.values.to(x.dtype) * (1 - rho)  # (D,)

    def objective(p: DefedPass, yy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        margin = _log_margin(torch.log_softmax(p.bare_logits, dim=1), yy, targeted).clamp(min=-kappa)
        over = (p.scores - limits.to(p.scores.dtype)[:, None]).clamp(min=0).sum(dim=0)
        return -(margin + weight * over)

    def goal(p: DefedPass, yy: torch.Tensor) -> torch.Tensor:
        flagged, _, labels = ensemble_decision(p.scores, p.denoised_logits, p.bare_logits, ensemble.thresholds.values)
        hit = labels == yy if targeted else labels != yy
        return hit & ~flagged

    n = x.shape[0]
    x_best = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken = torch.zeros(n, dtype=torch.long)
    constants = torch.full((n,), c, dtype=x.dtype, device=x.device)
    lower = torch.zeros_like(constants)
    upper = torch.full_like(constants, math.inf)
    last_flagged = torch.zeros(n, dtype=torch.bool, device=x.device)
    used = constants.clone()
    with evaluating(ensemble):
        for round_ in range(search_steps):
            todo = (~found).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            used[todo] = constants[todo]
            adv, reached, spent, flagged = _pgd_rounds(
                ensemble,
                x,
                y,
                objective,
                goal,
                eps=eps,
                alpha=alpha,
                steps=steps,
                norm=norm,
                random_start=random_start,
                generator=generator,
                constants=constants,
                todo=todo,
            )
            taken[todo.cpu()] += spent
            # keep this round's frame for every image not yet successful (the last round's where none succeeds)
            x_best[todo] = adv
            found[todo[reached]] = True
            last_flagged[todo] = flagged
            if round_ == search_steps - 1:
                break
            failed = todo[~reached]
            raise_c = failed[last_flagged[failed]]
            lower_c = failed[~last_flagged[failed]]
            lower[raise_c] = constants[raise_c]
            constants[raise_c] = torch.where(
                torch.isinf(upper[raise_c]), constants[raise_c] * 10, (lower[raise_c] + upper[raise_c]) / 2
            )
            upper[lower_c] = constants[lower_c]
            constants[lower_c] = (lower[lower_c] + upper[lower_c]) / 2
        settings = {
            "attack": "detector_aware_pgd",
            "norm": norm,
            "eps": eps,
            "alpha": alpha,
            "steps": steps,
            "search_steps": search_steps,
            "random_start": random_start,
            "kappa": kappa,
            "c": c,
            "rho": rho,
            "targeted": targeted,
            "k": ensemble.k,
            "thresholds": ensemble.thresholds.values.tolist(),
        }
        return _result(ensemble, x, y, x_best, taken, norm, targeted, True, used, settings)


# --- the deployed decision as a model ----------------------------------------------------------------------


class DefedDecision(nn.Module):
    """A fitted `DefedEnsemble` as the edge deploys it, for black-box attacks: `forward(x)` returns (N, K)
    scores whose argmax is `ensemble.classify(x).labels` -- the bare logits f(x) for an unflagged frame, the
    log of the flagging denoisers' summed softmax for a flagged one. Either way the margin between two classes
    is a log-probability margin (of f(x), or of the vote's mixture), so a score-based attack compares like with
    like when a frame changes outcome. No autograd (black-box attacks query, never differentiate); `queries`
    and `flag_count` count the frames it saw and flagged."""

    def __init__(self, ensemble: DefedEnsemble) -> None:
        super().__init__()
        self.ensemble = _check_ensemble(ensemble)
        self.queries = 0
        self.flag_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ens = self.ensemble
        ens._check(x)
        parts = []
        with torch.inference_mode(), evaluating(ens):
            for start in range(0, max(x.shape[0], 1), ens.batch_size):
                p = ens(x[start : start + ens.batch_size].float())
                flagged, flagged_by, _ = ensemble_decision(
                    p.scores, p.denoised_logits, p.bare_logits, ens.thresholds.values
                )
                votes = (torch.softmax(p.denoised_logits, dim=2) * flagged_by[:, :, None]).sum(dim=0)
                parts.append(torch.where(flagged[:, None], votes.clamp(min=1e-30).log(), p.bare_logits))
                self.flag_count += int(flagged.sum())
        self.queries += int(x.shape[0])
        return torch.cat(parts).clone()
