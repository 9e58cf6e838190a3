"""White-box evasion attacks on batches: FGSM, BIM, MI-FGSM, PGD (L-inf, L2; L1 as `pgd_l1`), C&W-L2, DeepFool.

One function per attack, CleverHans style: arguments validated first, then the whole batch attacked at
once. Inputs are (N, C, H, W) in [0, 1] with true labels `y` (or target labels with targeted=True);
outputs stay in [0, 1] and within the budget. The model is put in eval mode for the attack (and given
its mode back), gradients are taken with `torch.autograd.grad` with respect to the input only, so no
parameter ever accumulates a `.grad`. Attacks return images, never a success flag: measure success by
re-predicting with `attack_success`.

The gradient attacks take an optional `grad_fn(x, y) -> gradient of the objective to ascend`, which is
how adaptive attacks (EOT, see `iotbed.attacks.adaptive`) plug in. Against an
`iotbed.defenses.base.DefendedModel` every gradient here is already a BPDA gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from iotbed.models.training import evaluating, predict

GradFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Norm = Literal["inf", "2"]


# --- shared pieces --------------------------------------------------------------------------------


def _check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor (N, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    if x.numel() and (bool(x.min() < 0) or bool(x.max() > 1)):
        raise ValueError("x must lie in [0, 1]; normalisation belongs inside the model")
    if y is not None and (
        not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point()
    ):
        raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {getattr(y, 'shape', y)}")


def _check_number(value: object, what: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{what} must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def _check_steps(steps: object, what: str = "steps", minimum: int = 0) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise ValueError(f"{what} must be a whole number >= {minimum}, got {steps!r}")
    return steps


def _check_norm(norm: object) -> Norm:
    if norm in ("inf", "linf", float("inf")):
        return "inf"
    if norm in ("2", "l2", 2):
        return "2"
    raise ValueError(f"norm must be 'inf' or '2', got {norm!r}")


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, targeted: bool = False) -> torch.Tensor:
    """Gradient w.r.t. x of the summed cross-entropy (of minus it, for targeted): the direction to ascend."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y.long(), reduction="sum")
        (grad,) = torch.autograd.grad(-loss if targeted else loss, x)
    return grad


def margin_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Gradient w.r.t. x of Carlini and Wagner's logit margin, the best wrong logit minus the true one, capped
    at `kappa`: ascending it makes a wrong class win by `kappa` (a high-confidence adversarial example)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        true = logits.gather(1, y.long()[:, None]).squeeze(1)
        wrong = logits.masked_fill(F.one_hot(y.long(), logits.shape[1]).bool(), float("-inf")).amax(dim=1)
        (grad,) = torch.autograd.grad((wrong - true).clamp(max=kappa).sum(), x)
    return grad


def _grad_fn(model: nn.Module, grad_fn: GradFn | None, targeted: bool) -> GradFn:
    if grad_fn is not None:
        return grad_fn
    return lambda x, y: loss_gradient(model, x, y, targeted=targeted)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Back into the eps-ball around x and into [0, 1]."""
    delta = x_adv - x
    if norm == "inf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta).clamp(min=1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _step(x_adv: torch.Tensor, grad: torch.Tensor, alpha: float, norm: Norm) -> torch.Tensor:
    if norm == "inf":
        return x_adv + alpha * grad.sign()
    return x_adv + alpha * grad / _flat_norm(grad).clamp(min=1e-12)


# --- attacks --------------------------------------------------------------------------------------


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    targeted: bool = False,
    grad_fn: GradFn | None = None,
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size eps."""
    _check_inputs(model, x, y)
    eps = _check_number(eps, "eps")
    with evaluating(model):
        grad = _grad_fn(model, grad_fn, targeted)(x, y)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    norm: Norm = "inf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    targeted: bool = False,
    grad_fn: GradFn | None = None,
    kappa: float | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in L-inf or L2, step `alpha` (default eps/10),
    optionally from a uniform random start in the ball drawn from `generator`. With `kappa` it ascends the
    logit margin capped at kappa (`margin_gradient`) instead of the cross-entropy: high-confidence examples."""
    _check_inputs(model, x, y)
    eps = _check_number(eps, "eps")
    alpha = eps / 10 if alpha is None else _check_number(alpha, "alpha")
    steps = _check_steps(steps)
    norm = _check_norm(norm)
    if random_start and generator is None:
        raise ValueError("random_start needs a torch.Generator (no global RNG); pass generator= or random_start=False")
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        if norm == "inf":
            noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps
        else:  # uniform direction, radius uniform in [0, eps] (torchattacks' PGDL2 start)
            direction = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            radius = torch.rand((x.shape[0], 1, 1, 1), generator=generator, dtype=x.dtype) * eps
            noise = direction / _flat_norm(direction).clamp(min=1e-12) * radius
        x_adv = _project(x + noise.to(x.device), x, eps, norm)
    if kappa is not None:
        if grad_fn is not None or targeted:
            raise ValueError("kappa (the margin loss) is for untargeted PGD on the model itself, without grad_fn")
        kappa = _check_number(kappa, "kappa")
        gradient: GradFn = lambda x_, y_: margin_gradient(model, x_, y_, kappa)  # noqa: E731
    else:
        gradient = _grad_fn(model, grad_fn, targeted)
    with evaluating(model):
        for _ in range(steps):
            x_adv = _project(_step(x_adv, gradient(x_adv, y), alpha, norm), x, eps, norm)
    return x_adv.detach()


def _project_l1(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Back into the L1 ball of radius eps around x (Euclidean projection by sorting, Duchi et al. 2008) and
    into [0, 1]; clipping to [0, 1] only shrinks each |x_adv - x|, so the L1 budget still holds."""
    delta = (x_adv - x).flatten(1)
    outside = delta.abs().sum(1) > eps
    if bool(outside.any()):
        d = delta[outside]
        if eps == 0:
            d = torch.zeros_like(d)
        else:
            u = d.abs().sort(dim=1, descending=True).values
            css = u.cumsum(1)
            k = torch.arange(1, d.shape[1] + 1, dtype=d.dtype, device=d.device)
            rho = ((u - (css - eps) / k) > 0).sum(1, keepdim=True)  # >= 1 when eps > 0
            theta = (css.gather(1, rho - 1) - eps) / rho
            d = d.sign() * (d.abs() - theta).clamp(min=0)
        delta = delta.clone()
        delta[outside] = d
    return (x + delta.view_as(x)).clamp(0.0, 1.0)


def pgd_l1(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    sparsity: float = 0.99,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    targeted: bool = False,
    grad_fn: GradFn | None = None,
) -> torch.Tensor:
    """PGD in L1 as sparse L1 descent (SLIDE, Tramer & Boneh 2019). Each step moves the pixels whose
    |gradient| reaches the `sparsity` quantile of the image's (the top 1%: 0.99) by sign(gradient), an L1
    step of `alpha` (default eps/10) split evenly among them; pixels at 0 or 1 the step would push out are
    left out. Then back into the L1 ball (Duchi et al. 2008) and [0, 1]. With `random_start`, a start drawn
    uniformly from the L1 ball with `generator`."""
    _check_inputs(model, x, y)
    eps = _check_number(eps, "eps")
    alpha = eps / 10 if alpha is None else _check_number(alpha, "alpha")
    steps = _check_steps(steps)
    sparsity = _check_number(sparsity, "sparsity")
    if sparsity >= 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if random_start and generator is None:
        raise ValueError("random_start needs a torch.Generator (no global RNG); pass generator= or random_start=False")
    x = x.detach()
    x_adv = x.clone()
    if random_start:  # uniform in the L1 ball: d exponentials over the sum of d + 1, random signs
        n, d = x.shape[0], x[0].numel()
        e = -torch.rand((n, d + 1), generator=generator, dtype=torch.float64).clamp(min=1e-300).log()
        signs = torch.randint(0, 2, (n, d), generator=generator, dtype=torch.int64) * 2 - 1
        noise = (e[:, :d] / e.sum(1, keepdim=True) * signs * eps).to(x.dtype).view_as(x)
        x_adv = _project_l1(x + noise.to(x.device), x, eps)
    gradient = _grad_fn(model, grad_fn, targeted)
    with evaluating(model):
        for _ in range(steps):
            grad = gradient(x_adv, y)
            grad = torch.where(((x_adv <= 0) & (grad < 0)) | ((x_adv >= 1) & (grad > 0)), 0.0, grad).flatten(1)
            top = grad.abs() >= torch.quantile(grad.abs(), sparsity, dim=1, keepdim=True)
            step = torch.where(top, grad.sign(), 0.0)
            step = step / step.abs().sum(1, keepdim=True).clamp(min=1.0)
            x_adv = _project_l1(x_adv + alpha * step.view_as(x_adv), x, eps)
    return x_adv.detach()


def bim(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    targeted: bool = False,
    grad_fn: GradFn | None = None,
) -> torch.Tensor:
    """Basic iterative method / I-FGSM (Kurakin et al. 2017): L-inf PGD without the random start;
    step `alpha` defaults to eps/10 (the SUPER-IoT authors' eps_iter)."""
    return pgd(
        model,
        x,
        y,
        eps=eps,
        alpha=alpha,
        steps=steps,
        norm="inf",
        random_start=False,
        targeted=targeted,
        grad_fn=grad_fn,
    )


def mi_fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    decay: float = 1.0,
    targeted: bool = False,
    grad_fn: GradFn | None = None,
) -> torch.Tensor:
    """Momentum iterative FGSM (Dong et al. 2018): the sign step follows g = decay * g + grad / mean|grad|."""
    _check_inputs(model, x, y)
    eps = _check_number(eps, "eps")
    alpha = eps / 10 if alpha is None else _check_number(alpha, "alpha")
    steps = _check_steps(steps)
    decay = _check_number(decay, "decay")
    x = x.detach()
    x_adv = x.clone()
    momentum = torch.zeros_like(x)
    gradient = _grad_fn(model, grad_fn, targeted)
    with evaluating(model):
        for _ in range(steps):
            grad = gradient(x_adv, y)
            momentum = decay * momentum + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
            x_adv = _project(x_adv + alpha * momentum.sign(), x, eps, "inf")
    return x_adv.detach()


def carlini_wagner_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    binary_search_steps: int = 5,
    max_iter: int = 100,
    lr: float = 0.01,
    kappa: float = 0.0,
    initial_const: float = 1e-2,
    targeted: bool = False,
    abort_early: bool = True,
) -> torch.Tensor:
    """Carlini & Wagner L2 (2017): Adam in tanh space on ||x' - x||^2 + c * f(x'), with a per-image
    binary search over c. f is the logit margin max(Z_y - max_{i!=y} Z_i, -kappa) (for targeted,
    max(max_{i!=t} Z_i - Z_t, -kappa)). Returns, per image, the smallest-L2 adversarial found over all
    steps, or x unchanged where none was found. The SUPER-IoT authors ran 4 search steps x 1000
    iterations (cleverhans 3.0.1); the defaults here are lighter.
    """
    _check_inputs(model, x, y)
    _check_steps(binary_search_steps, "binary_search_steps", 1)
    _check_steps(max_iter, "max_iter", 1)
    lr = _check_number(lr, "lr", strict=True)
    kappa = _check_number(kappa, "kappa")
    initial_const = _check_number(initial_const, "initial_const", strict=True)
    x, y = x.detach(), y.long()
    n = x.shape[0]
    w0 = torch.atanh((x * 2 - 1) * (1 - 1e-6))
    lower = torch.zeros(n, dtype=x.dtype, device=x.device)
    upper = torch.full_like(lower, 1e10)
    const = torch.full_like(lower, initial_const)
    best_l2 = torch.full_like(lower, math.inf)
    best_adv = x.clone()
    with evaluating(model):
        for _ in range(binary_search_steps):
            w = w0.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([w], lr=lr)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            previous = math.inf
            for it in range(max_iter):
                with torch.enable_grad():
                    adv = (torch.tanh(w) + 1) / 2
                    logits = model(adv)
                    l2 = (adv - x).pow(2).flatten(1).sum(1)
                    real = logits.gather(1, y[:, None]).squeeze(1)
                    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -math.inf).amax(1)
                    margin = (other - real) if targeted else (real - other)
                    loss = (l2 + const * (margin + kappa).clamp(min=0)).sum()
                    (w.grad,) = torch.autograd.grad(loss, w)
                optimizer.step()
                with torch.no_grad():
                    # `adv` is the point the logits were computed at (before this step)
                    hit = (margin + kappa <= 0) & ((logits.argmax(1) == y) if targeted else (logits.argmax(1) != y))
                    better = hit & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best_adv[better] = adv.detach()[better].clamp(0.0, 1.0)
                    found |= hit
                    if abort_early and it % max(max_iter // 10, 1) == 0:
                        if loss.item() > previous * 0.9999:
                            break
                        previous = loss.item()
            # binary search on c, per image: smaller after a success, larger (x10 until bracketed) otherwise
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            bracketed = upper < 1e9
            const = torch.where(bracketed, (lower + upper) / 2, const * 10)
    return best_adv.detach()


def deepfool(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 50,
) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al. 2016), L2, batched: linearise the boundaries between the true
    class and the `num_classes - 1` classes ranked highest on the clean input, step just across the
    nearest, until the prediction changes or `max_iter`; the total step is scaled by 1 + overshoot.
    Images the model already gets wrong are returned unchanged."""
    _check_inputs(model, x, y)
    num_classes = _check_steps(num_classes, "num_classes", 2)
    overshoot = _check_number(overshoot, "overshoot")
    max_iter = _check_steps(max_iter, "max_iter")
    x, y = x.detach(), y.long()
    r_tot = torch.zeros_like(x)
    with evaluating(model):
        with torch.no_grad():
            logits = model(x)
        k = min(num_classes, logits.shape[1])
        # candidates: the true class first, then the other classes by clean logit
        ranked = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), math.inf).argsort(1, descending=True)
        candidates = ranked[:, :k]
        active = torch.arange(x.shape[0], device=x.device)[logits.argmax(1) == y]
        for _ in range(max_iter):
            if active.numel() == 0:
                break
            xa = (x[active] + (1 + overshoot) * r_tot[active]).clamp(0.0, 1.0).requires_grad_(True)
            with torch.enable_grad():
                out = model(xa)
                fooled = out.argmax(1) != y[active]
                f = out.gather(1, candidates[active])  # (a, k)
                grads = torch.stack(
                    [torch.autograd.grad(f[:, j].sum(), xa, retain_graph=j < k - 1)[0] for j in range(k)], 1
                )
            with torch.no_grad():
                w = grads[:, 1:] - grads[:, :1]  # (a, k-1, C, H, W)
                fd = (f[:, 1:] - f[:, :1]).detach()
                w_norm = w.flatten(2).norm(dim=2).clamp(min=1e-8)
                nearest = (fd.abs() / w_norm).argmin(1)
                rows = torch.arange(nearest.shape[0], device=x.device)
                dist = (fd.abs() / w_norm)[rows, nearest]
                step = (dist + 1e-4).view(-1, 1, 1, 1) * w[rows, nearest] / w_norm[rows, nearest].view(-1, 1, 1, 1)
                step[fooled] = 0.0  # already across: keep its total perturbation as it is
                r_tot[active] += step
            active = active[~fooled]
    return (x + (1 + overshoot) * r_tot).clamp(0.0, 1.0).detach()


# --- measuring -----------------------------------------------------------------------------------


def attack_success(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, *, targeted: bool = False, batch_size: int = 512
) -> torch.Tensor:
    """Per image, whether the attack worked, by re-predicting x_adv (eval mode, no gradient):
    prediction != y, or == y (the target) when targeted. Bool (N,)."""
    _check_inputs(model, x_adv, y)
    pred, _ = predict(model, x_adv, batch_size=batch_size)
    return pred == y if targeted else pred != y


def robust_accuracy(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Share of x_adv still classified as y."""
    return float((~attack_success(model, x_adv, y, batch_size=batch_size)).float().mean())
