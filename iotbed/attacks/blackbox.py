"""Black-box evasion attacks on batches: what a compromised camera can do with the model's answers only.

- `square_attack`: the Square Attack (Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a
  query-efficient black-box adversarial attack via random search", ECCV 2020), score-based, L-inf and L2.
  It reads the model's output scores (logits or probabilities) and keeps a random square update when it
  lowers the margin loss.
- `hop_skip_jump`: HopSkipJump (Chen, Jordan and Wainwright, "HopSkipJumpAttack: a query-efficient
  decision-based attack", IEEE S&P 2020), decision-based, L2 and L-inf. It reads only the top-1 label.

Both follow `iotbed.attacks.evasion`'s conventions: arguments validated first with ValueError, inputs
(N, C, H, W) in [0, 1] with true labels `y` (target labels with targeted=True), outputs in [0, 1], the model
in eval mode for the attack and given its mode back, no gradient anywhere. Every random choice comes from
the one `generator` passed in, so the same generator state, inputs and arguments give the same result.

Every model call goes through a per-image query counter that refuses to pass `max_queries`, so a result's
`queries` are exact and within the budget. The clean image's own query counts (one query); an image the
model already gets wrong (or, targeted, already puts in the target class) is returned unchanged after it.
The result's `success` is never the attack's own bookkeeping: it is `attack_success` on the returned images,
one more prediction made by the testbed as the evaluator, not counted as a query.

What differs from the authors' code (both re-implemented from the papers, not translated):
- Square: the authors query the clean images outside the budget and attack only the correctly classified
  ones; here that query is one of the budget's. The margin loss serves targeted attacks too (the authors
  use the cross-entropy of the target class there). The L-inf budget holds exactly in floating point (the
  rare value a rounding puts one ulp past eps is moved back), and so does the L2 one. The search for a
  square that changes the image is capped at 10 draws (the authors loop until one does). Squares fit
  non-square images (side at most min(H, W) - 1). In L2 the pseudo-Gaussian's random transposition is
  drawn per image (the authors draw it once per iteration for the batch).
- HopSkipJump: batched over images (the authors attack one image at a time) and stopped by a per-image
  query budget besides `max_iter`; the random-noise initialisation draws one noise image per image per
  round for `init_trials` rounds; the gradient estimate of an image with less budget left than the
  schedule's sample count uses what is left; the geometric step search halves at most 40 times; the
  perturbation size delta uses the distance after the last binary search (the authors take the one before
  it); the smallest adversarial found is returned (the authors return the last). Binary searches keep
  their bounds in float64, so a search of many steps does not stall on float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from iotbed.attacks.evasion import (
    Norm,
    _check_inputs,
    _check_norm,
    _check_number,
    _check_steps,
    attack_success,
)
from iotbed.models.training import evaluating

__all__ = ["BlackBoxResult", "hop_skip_jump", "square_attack"]


@dataclass(frozen=True)
class BlackBoxResult:
    """What a black-box attack returns, per image: the adversarial images (N, C, H, W) in [0, 1]; the model
    queries spent (int64, (N,), each <= max_queries); whether the attack worked, by re-predicting `x_adv`
    (bool, (N,)); and the size of the perturbation in the attack's norm (float, (N,))."""

    x_adv: torch.Tensor
    queries: torch.Tensor
    success: torch.Tensor
    distance: torch.Tensor


# --- shared pieces --------------------------------------------------------------------------------


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            "black-box attacks draw every random choice from a torch.Generator (no global RNG); "
            f"pass generator=torch.Generator().manual_seed(seed), got {type(generator).__name__}"
        )
    return generator


class _Oracle:
    """The attacks' only access to the model: counts queries per image and refuses any past `max_queries`."""

    def __init__(self, model: nn.Module, y: torch.Tensor, targeted: bool, max_queries: int, batch_size: int) -> None:
        self.model, self.y, self.targeted = model, y, targeted
        self.max_queries, self.batch_size = max_queries, batch_size
        self.queries = torch.zeros(y.shape[0], dtype=torch.long)

    def remaining(self, rows: torch.Tensor) -> torch.Tensor:
        return self.max_queries - self.queries[rows.cpu()]

    def scores(self, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The model's outputs for images `xs`, row k a query on image `rows[k]`."""
        counts = torch.bincount(rows.cpu(), minlength=self.queries.shape[0])
        if bool((self.queries + counts > self.max_queries).any()):
            raise RuntimeError("internal error: a black-box attack tried to pass its query budget")
        self.queries += counts
        return torch.cat([self.model(xs[i : i + self.batch_size]) for i in range(0, xs.shape[0], self.batch_size)])

    def fooled(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        pred = scores.argmax(1)
        return pred == self.y[rows] if self.targeted else pred != self.y[rows]

    def adversarial(self, xs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Top-1 decision only: whether each of `xs` is adversarial for its image."""
        if xs.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.y.device)
        return self.fooled(self.scores(xs, rows), rows)


def _distance(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    flat = delta.flatten(1)
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    return flat.abs().amax(1) if norm == "inf" else flat.norm(dim=1)


def _per_image(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def _clip_linf(z: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """z in [0, 1] and with |z - x| <= eps as computed in z's dtype: a value that x + eps's rounding put one
    ulp past eps is stepped back toward x."""
    z = torch.minimum(torch.maximum(z, x - eps), x + eps).clamp(0.0, 1.0)
    for _ in range(4):
        over = (z - x).abs() > eps
        if not bool(over.any()):
            return z
        z = torch.where(over, torch.nextafter(z, x), z)
    return torch.where((z - x).abs() > eps, x, z)


def _fit_l2(z: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """z in [0, 1] and with ||z - x||_2 <= eps as computed in z's dtype (clipping only shrinks the perturbation)."""
    z = z.clamp(0.0, 1.0)
    for _ in range(4):
        norms = _distance(z - x, "2")
        over = norms > eps
        if not bool(over.any()):
            return z
        scale = torch.where(over, eps / norms.clamp(min=1e-30) * (1 - 1e-6), torch.ones_like(norms))
        z = (x + (z - x) * _per_image(scale)).clamp(0.0, 1.0)
    return torch.where(_per_image(_distance(z - x, "2") > eps), x, z)


def _margin(scores: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """The margin loss the Square Attack lowers: true score minus the best other one (targeted: the best
    non-target score minus the target's). Negative once the attack has worked."""
    own = scores.gather(1, y[:, None]).squeeze(1)
    other = scores.masked_fill(F.one_hot(y, scores.shape[1]).bool(), -math.inf).amax(1)
    return other - own if targeted else own - other


def _window_mask(top: torch.Tensor, left: torch.Tensor, size: int, h: int, w: int) -> torch.Tensor:
    """(k, 1, h, w) bool: a size x size square per image at (top, left)."""
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _window_index(
    top: torch.Tensor, left: torch.Tensor, size: int, c: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advanced indices selecting each image's size x size square, all channels: (k, c, size, size)."""
    span = torch.arange(size, device=top.device)
    k = top.shape[0]
    return (
        torch.arange(k, device=top.device).view(k, 1, 1, 1),
        torch.arange(c, device=top.device).view(1, c, 1, 1),
        (top[:, None] + span).view(k, 1, size, 1),
        (left[:, None] + span).view(k, 1, 1, size),
    )


# --- Square Attack --------------------------------------------------------------------------------


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    """The paper's schedule of the share of pixels a square covers: halved at iterations 10, 50, 200, 500,
    1000, 2000, 4000, 6000 and 8000 of 10,000, the iterations rescaled to the budget `n_iters`."""
    it = int(it / n_iters * 10000)
    for bound, divisor in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16), (200, 8)):
        if it > bound:
            return p_init / divisor
    if it > 50:
        return p_init / 4
    if it > 10:
        return p_init / 2
    return p_init


def _pseudo_gaussian(rows: int, cols: int) -> torch.Tensor:
    """The paper's pseudo-Gaussian block: at Chebyshev distance r from the centre, sum_{k=r}^{K-1} 1/(k+1)^2
    with K = max(rows, cols) // 2 + 1 rings; unit L2 norm."""
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, dtype=torch.float64)
    rings = max(rows, cols) // 2 + 1
    tail = (1.0 / torch.arange(1, rings + 1, dtype=torch.float64) ** 2).flip(0).cumsum(0).flip(0)
    i = (torch.arange(rows) - rows // 2).abs()[:, None]
    j = (torch.arange(cols) - cols // 2).abs()[None, :]
    block = tail[torch.maximum(i, j).clamp(max=rings - 1)]
    return block / block.norm()


def _meta_pseudo_gaussian(size: int) -> torch.Tensor:
    """Two pseudo-Gaussian halves of opposite sign, as a (2, size, size) stack: upright and transposed."""
    block = torch.zeros(size, size, dtype=torch.float64)
    half = size // 2
    block[:half] = _pseudo_gaussian(half, size)
    block[half:] = -_pseudo_gaussian(size - half, size)
    block = block / block.norm().clamp(min=1e-30)
    return torch.stack([block, block.T])


def _square_side(p: float, h: int, w: int, norm: Norm) -> int:
    side = int(round(math.sqrt(p * h * w)))
    if norm == "inf":
        return min(max(side, 1), min(h, w) - 1)
    side = max(side, 3)
    side += 1 - side % 2  # odd
    return min(side, min(h, w) - 1)


def _square_init(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    if norm == "inf":  # vertical stripes of +-eps, one sign per channel and column
        signs = torch.randint(0, 2, (n, c, 1, w), generator=generator).to(x.dtype) * 2 - 1
        return _clip_linf(x + eps * signs.to(x.device), x, eps)
    # a grid of pseudo-Gaussian blocks of side min(h, w) // 5, a random sign per image, channel and block
    side = min(h, w) // 5
    delta = torch.zeros(x.shape, dtype=torch.float64)
    block = _pseudo_gaussian(side, side)
    top0, left0 = (h - side * (h // side)) // 2, (w - side * (w // side)) // 2
    for top in range(top0, top0 + side * (h // side), side):
        for left in range(left0, left0 + side * (w // side), side):
            signs = torch.randint(0, 2, (n, c, 1, 1), generator=generator).to(torch.float64) * 2 - 1
            delta[:, :, top : top + side, left : left + side] += block * signs
    delta = delta / _per_image(_distance(delta, "2")).clamp(min=1e-30) * eps
    return _fit_l2(x + delta.to(x.dtype).to(x.device), x, eps)


def _square_step_linf(
    x: torch.Tensor, best: torch.Tensor, eps: float, side: int, generator: torch.Generator
) -> torch.Tensor:
    k, c, h, w = x.shape
    top = torch.randint(0, h - side + 1, (k,), generator=generator)
    left = torch.randint(0, w - side + 1, (k,), generator=generator)
    mask = _window_mask(top, left, side, h, w).to(x.device)
    signs = torch.randint(0, 2, (k, c, 1, 1), generator=generator).to(x.dtype) * 2 - 1
    delta = best - x
    redo = torch.arange(k)
    candidate = best
    for _ in range(10):  # a square that leaves the image as it is would waste a query: draw its signs again
        trial = _clip_linf(x + torch.where(mask, eps * signs.to(x.device), delta), x, eps)
        candidate = trial if redo.numel() == k else candidate.index_copy(0, redo.to(x.device), trial[redo])
        same = (((candidate - best).abs() < 1e-7) | ~mask).flatten(1).all(1).cpu()
        redo = same.nonzero().squeeze(1)
        if redo.numel() == 0:
            break
        signs[redo] = torch.randint(0, 2, (redo.numel(), c, 1, 1), generator=generator).to(x.dtype) * 2 - 1
    return candidate


def _square_step_l2(
    x: torch.Tensor, best: torch.Tensor, eps: float, side: int, generator: torch.Generator
) -> torch.Tensor:
    k, c, h, w = x.shape
    dev = x.device
    top1 = torch.randint(0, h - side + 1, (k,), generator=generator)
    left1 = torch.randint(0, w - side + 1, (k,), generator=generator)
    top2 = torch.randint(0, h - side + 1, (k,), generator=generator)
    left2 = torch.randint(0, w - side + 1, (k,), generator=generator)
    transpose = torch.randint(0, 2, (k,), generator=generator)
    signs = torch.randint(0, 2, (k, c, 1, 1), generator=generator).to(torch.float64) * 2 - 1
    delta = (best - x).double()
    win1 = _window_index(top1.to(dev), left1.to(dev), side, c)
    win2 = _window_index(top2.to(dev), left2.to(dev), side, c)
    union = (_window_mask(top1, left1, side, h, w) | _window_mask(top2, left2, side, h, w)).to(dev)
    old = delta[win1]  # (k, c, side, side)
    norm_old = old.pow(2).sum((2, 3), keepdim=True).sqrt()
    norm_union = (delta * union).pow(2).sum((2, 3), keepdim=True).sqrt()
    norm_image = _per_image(_distance(delta, "2"))
    new = _meta_pseudo_gaussian(side)[transpose][:, None].to(dev) * signs.to(dev) + old / (1e-10 + norm_old)
    # the new square takes the mass of both windows plus what is left of the budget, shared by the channels
    mass = ((eps**2 - norm_image**2).clamp(min=0) / c + norm_union**2).sqrt()
    new = new / new.pow(2).sum((2, 3), keepdim=True).sqrt().clamp(min=1e-30) * mass
    delta[win2] = 0.0
    delta[win1] = new
    delta = delta / _per_image(_distance(delta, "2")).clamp(min=1e-30) * eps
    return _fit_l2(x + delta.to(x.dtype), x, eps)


def square_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: Norm = "inf",
    max_queries: int = 1000,
    p_init: float | None = None,
    targeted: bool = False,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> BlackBoxResult:
    """Square Attack (Andriushchenko et al. 2020), score-based, in L-inf or L2 with budget `eps`.

    Query 1 is the clean image; query 2 the initialisation (L-inf: vertical stripes of +-eps; L2: a grid of
    pseudo-Gaussian blocks at norm eps); each further query tries one random square update (L-inf: the
    square set to +-eps per channel; L2: the mass of the square and of a second one moved into a
    pseudo-Gaussian bump), kept if it lowers the margin loss (`_margin` on the model's outputs). The square
    covers a share p of the image, from `p_init` (default 0.05 in L-inf, 0.1 in L2) down the paper's
    schedule over `max_queries`. All images share each iteration's model call; an image stops once the
    model's top-1 answer makes it adversarial, or at `max_queries` queries.
    """
    _check_inputs(model, x, y)
    eps = _check_number(eps, "eps")
    norm = _check_norm(norm)
    max_queries = _check_steps(max_queries, "max_queries", 1)
    if p_init is None:
        p_init = 0.05 if norm == "inf" else 0.1
    p_init = _check_number(p_init, "p_init", strict=True)
    if p_init > 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    generator = _check_generator(generator)
    batch_size = _check_steps(batch_size, "batch_size", 1)
    if not isinstance(targeted, bool):
        raise ValueError(f"targeted must be a bool, got {targeted!r}")
    n, c, h, w = x.shape
    if min(h, w) < (2 if norm == "inf" else 5):
        raise ValueError(f"the Square Attack in {'L-inf' if norm == 'inf' else 'L2'} needs larger images, got {h}x{w}")
    if y.numel() and bool(y.min() < 0):
        raise ValueError("y must be class indices >= 0")
    x, y = x.detach(), y.long()
    step = _square_step_linf if norm == "inf" else _square_step_l2
    with evaluating(model), torch.no_grad():
        oracle = _Oracle(model, y, targeted, max_queries, batch_size)
        rows = torch.arange(n, device=x.device)
        best = x.clone()
        scores = oracle.scores(x, rows) if n else torch.zeros(0, 1)
        if n and y.max() >= scores.shape[1]:
            raise ValueError(f"y holds class {int(y.max())} but the model answers {scores.shape[1]} classes")
        fooled = oracle.fooled(scores, rows) if n else torch.zeros(0, dtype=torch.bool)
        margin = _margin(scores, y, targeted) if n else torch.zeros(0)
        todo = rows[~fooled]
        if todo.numel() and max_queries >= 2:  # the initialisation is taken whatever its margin
            start = _square_init(x[todo], eps, norm, generator)
            scores = oracle.scores(start, todo)
            best[todo] = start
            margin[todo] = _margin(scores, y[todo], targeted)
            fooled[todo] = oracle.fooled(scores, todo)
        for it in range(max_queries - 2):
            active = rows[~fooled & (oracle.remaining(rows) > 0).to(x.device)]
            if active.numel() == 0:
                break
            side = _square_side(_square_p(p_init, it, max_queries), h, w, norm)
            candidate = step(x[active], best[active], eps, side, generator)
            scores = oracle.scores(candidate, active)
            new_margin = _margin(scores, y[active], targeted)
            better = new_margin < margin[active]
            kept = active[better]
            best[kept] = candidate[better]
            margin[kept] = new_margin[better]
            fooled[kept] = oracle.fooled(scores[better], kept)
    return BlackBoxResult(
        x_adv=best,
        queries=oracle.queries.clone(),
        success=attack_success(model, best, y, targeted=targeted, batch_size=batch_size),
        distance=_distance(best - x, norm),
    )


# --- HopSkipJump ----------------------------------------------------------------------------------


def _toward(x: torch.Tensor, x_adv: torch.Tensor, alpha: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The paper's projection between x (alpha = 0) and x_adv: in L2 the blend (1 - alpha) x + alpha x_adv;
    in L-inf x_adv clipped into the L-inf ball of radius alpha around x."""
    a = _per_image(alpha).to(x.dtype)
    if norm == "2":
        return ((1 - a) * x + a * x_adv).clamp(0.0, 1.0)
    return torch.minimum(torch.maximum(x_adv, x - a), x + a).clamp(0.0, 1.0)


def _boundary_search(
    oracle: _Oracle, x: torch.Tensor, x_adv: torch.Tensor, rows: torch.Tensor, norm: Norm, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary search from adversarial `x_adv` toward `x` (the images `rows`) down to the paper's tolerance
    theta (L-inf: theta times the distance, at most theta); returns the adversarial end and its distance."""
    k = rows.shape[0]
    low = torch.zeros(k, dtype=torch.float64)
    if norm == "2":
        high = torch.ones(k, dtype=torch.float64)
        tolerance = torch.full((k,), theta, dtype=torch.float64)
    else:
        high = _distance(x_adv - x, "inf").double().cpu()
        tolerance = (high * theta).clamp(max=theta)
    while True:
        need = (((high - low) > tolerance) & (oracle.remaining(rows) > 0)).nonzero().squeeze(1)
        if need.numel() == 0:
            break
        mid = (high[need] + low[need]) / 2
        dev = need.to(x.device)
        hit = oracle.adversarial(_toward(x[dev], x_adv[dev], mid, norm), rows[dev]).cpu()
        high[need] = torch.where(hit, mid, high[need])
        low[need] = torch.where(hit, low[need], mid)
    out = _toward(x, x_adv, high, norm)
    return out, _distance(out - x, norm)


def _estimate_gradient(
    oracle: _Oracle,
    x_adv: torch.Tensor,
    rows: torch.Tensor,
    delta: torch.Tensor,
    evals: torch.Tensor,
    norm: Norm,
    generator: torch.Generator,
    chunk: int,
) -> torch.Tensor:
    """The paper's Monte Carlo estimate of the boundary's normal at each of `x_adv`: `evals[i]` unit random
    directions u (L2: Gaussian; L-inf: uniform in [-1, 1]^d, normalised), sign of phi(x + delta u) times u,
    the mean of the signs subtracted as a baseline; unit L2 norm."""
    k = x_adv.shape[0]
    most = int(evals.max())
    grads = []
    per = max(1, chunk // most)
    for start in range(0, k, per):
        part = slice(start, min(start + per, k))
        base = x_adv[part]
        g = base.shape[0]
        shape = (g, most, *base.shape[1:])
        if norm == "2":
            u = torch.randn(shape, generator=generator, dtype=base.dtype)
        else:
            u = torch.rand(shape, generator=generator, dtype=base.dtype) * 2 - 1
        u = u.to(base.device)
        u = u / u.flatten(2).norm(dim=2).clamp(min=1e-12).view(g, most, 1, 1, 1)
        d = delta[part].to(base.dtype).view(g, 1, 1, 1, 1)
        probe = (base[:, None] + d * u).clamp(0.0, 1.0)
        u = (probe - base[:, None]) / d
        valid = torch.arange(most)[None, :] < evals[part][:, None]  # (g, most) on the CPU
        owner = rows[part].cpu()[:, None].expand(g, most)[valid]
        hit = oracle.adversarial(probe[valid.to(base.device)], owner.to(rows.device)).cpu()
        sign = torch.zeros(g, most, dtype=torch.float64)
        sign[valid] = hit.double() * 2 - 1
        count = evals[part].double()
        mean = sign.sum(1) / count
        weight = torch.where(valid, sign - mean[:, None], 0.0)
        weight = torch.where((mean == 1)[:, None], valid.double(), weight)  # all adversarial: the mean direction
        weight = torch.where((mean == -1)[:, None], -valid.double(), weight)  # none: away from it
        w = (weight / count[:, None]).to(base.dtype).to(base.device).view(g, most, 1, 1, 1)
        grad = (w * u).sum(1)
        grads.append(grad / _per_image(_distance(grad, "2")).clamp(min=1e-12))
    return torch.cat(grads)


def hop_skip_jump(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: Norm = "2",
    targeted: bool = False,
    x_init: torch.Tensor | None = None,
    max_queries: int = 1000,
    max_iter: int = 64,
    init_evals: int = 100,
    max_evals: int = 10_000,
    init_trials: int = 100,
    gamma: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
) -> BlackBoxResult:
    """HopSkipJump (Chen et al. 2020), decision-based, in L2 or L-inf: a minimum-norm attack, so it has no
    budget eps; each image's `distance` says how far its adversarial example is.

    Query 1 is the clean image. The start is `x_init[i]` where given and adversarial (one query), else the
    first of up to `init_trials` uniform-noise images the model gets wrong (untargeted) or puts in the
    target class, pulled toward x by a binary search on the blend. Then per iteration t = 1..`max_iter`:
    a binary search to the boundary (tolerance theta = gamma / d^(3/2) in L2, gamma / d^2 in L-inf), a
    gradient-direction estimate from min(init_evals * sqrt(t), max_evals) probes at distance delta (0.1
    at t = 1, then sqrt(d) theta dist in L2, d theta dist in L-inf), and a geometric step search from
    dist / sqrt(t) along it (its sign in L-inf), halving until adversarial. Every call on an image counts
    toward its `max_queries`; an image stops there. The images share the model calls of each stage; the
    random stream depends on `batch_size` (the probes are drawn in chunks of 8 batches).
    """
    _check_inputs(model, x, y)
    norm = _check_norm(norm)
    if not isinstance(targeted, bool):
        raise ValueError(f"targeted must be a bool, got {targeted!r}")
    max_queries = _check_steps(max_queries, "max_queries", 1)
    max_iter = _check_steps(max_iter, "max_iter")
    init_evals = _check_steps(init_evals, "init_evals", 1)
    max_evals = _check_steps(max_evals, "max_evals", init_evals)
    init_trials = _check_steps(init_trials, "init_trials")
    gamma = _check_number(gamma, "gamma", strict=True)
    generator = _check_generator(generator)
    batch_size = _check_steps(batch_size, "batch_size", 1)
    if x_init is not None:
        if not isinstance(x_init, torch.Tensor) or x_init.shape != x.shape or x_init.dtype != x.dtype:
            raise ValueError(
                f"x_init must be a tensor of x's shape {tuple(x.shape)} and dtype, got {getattr(x_init, 'shape', x_init)}"
            )
        if x_init.numel() and (bool(x_init.min() < 0) or bool(x_init.max() > 1)):
            raise ValueError("x_init must lie in [0, 1]")
        x_init = x_init.detach().to(x.device)
    if y.numel() and bool(y.min() < 0):
        raise ValueError("y must be class indices >= 0")
    x, y = x.detach(), y.long()
    n = x.shape[0]
    d = max(math.prod(x.shape[1:]), 1)
    theta = gamma / (d * math.sqrt(d)) if norm == "2" else gamma / d**2
    dev = x.device
    with evaluating(model), torch.no_grad():
        oracle = _Oracle(model, y, targeted, max_queries, batch_size)
        rows = torch.arange(n, device=dev)
        if n:
            scores = oracle.scores(x, rows)
            if y.max() >= scores.shape[1]:
                raise ValueError(f"y holds class {int(y.max())} but the model answers {scores.shape[1]} classes")
            clean_fooled = oracle.fooled(scores, rows).cpu()
        else:
            clean_fooled = torch.zeros(0, dtype=torch.bool)
        # starting points: x_init where adversarial, else uniform noise that is
        start = x.clone()
        found = torch.zeros(n, dtype=torch.bool)
        todo = rows[(~clean_fooled & (oracle.remaining(rows) > 0)).to(dev)]
        if x_init is not None and todo.numel():
            hit = oracle.adversarial(x_init[todo], todo).cpu()
            ok = todo[hit.to(dev)]
            start[ok] = x_init[ok]
            found[ok.cpu()] = True
        for _ in range(init_trials):
            need = todo[(~found[todo.cpu()] & (oracle.remaining(todo) > 0)).to(dev)]
            if need.numel() == 0:
                break
            noise = torch.rand((need.numel(), *x.shape[1:]), generator=generator, dtype=x.dtype).to(dev)
            hit = oracle.adversarial(noise, need)
            start[need[hit]] = noise[hit]
            found[need[hit].cpu()] = True
        cur = rows[found.to(dev)]
        # pull the start toward x: binary search on the blend, to 0.001 as the authors do
        low = torch.zeros(cur.numel(), dtype=torch.float64)
        high = torch.ones(cur.numel(), dtype=torch.float64)
        while True:
            need = ((high - low > 1e-3) & (oracle.remaining(cur) > 0)).nonzero().squeeze(1)
            if need.numel() == 0:
                break
            mid = (high[need] + low[need]) / 2
            sel = cur[need.to(dev)]
            hit = oracle.adversarial(_toward(x[sel], start[sel], mid, "2"), sel).cpu()
            high[need] = torch.where(hit, mid, high[need])
            low[need] = torch.where(hit, low[need], mid)
        x_adv = x.clone()
        dist = torch.zeros(n, dtype=x.dtype)
        if cur.numel():
            x_adv[cur] = _toward(x[cur], start[cur], high, "2")
            x_adv[cur], dist_cur = _boundary_search(oracle, x[cur], x_adv[cur], cur, norm, theta)
            dist[cur.cpu()] = dist_cur.cpu()
        best, best_dist = x_adv.clone(), dist.clone()
        for t in range(1, max_iter + 1):
            live = found & (dist > 0) & (oracle.remaining(rows) > 0)
            act = rows[live.to(dev)]
            if act.numel() == 0:
                break
            act_cpu = act.cpu()
            dist_act = dist[act_cpu].double()
            delta = (
                torch.full_like(dist_act, 0.1) if t == 1 else dist_act * theta * (math.sqrt(d) if norm == "2" else d)
            ).clamp(min=1e-12)
            evals = oracle.remaining(act).clamp(max=min(int(init_evals * math.sqrt(t)), max_evals))
            grad = _estimate_gradient(oracle, x_adv[act], act, delta, evals, norm, generator, 8 * batch_size)
            update = grad.sign() if norm == "inf" else grad
            # geometric step search: from dist / sqrt(t), halving until adversarial
            step = dist_act / math.sqrt(t)
            moved = torch.zeros(act.numel(), dtype=torch.bool)
            landed = x_adv[act].clone()
            for _ in range(40):
                pending = (~moved & (oracle.remaining(act) > 0)).nonzero().squeeze(1)
                if pending.numel() == 0:
                    break
                p = pending.to(dev)
                probe = (x_adv[act[p]] + _per_image(step[pending]).to(x.dtype).to(dev) * update[p]).clamp(0.0, 1.0)
                hit = oracle.adversarial(probe, act[p]).cpu()
                landed[p[hit.to(dev)]] = probe[hit.to(dev)]
                moved[pending[hit]] = True
                step[pending[~hit]] /= 2
            went = act[moved.to(dev)]
            if went.numel():
                x_adv[went], dist_went = _boundary_search(oracle, x[went], landed[moved.to(dev)], went, norm, theta)
                dist[went.cpu()] = dist_went.cpu()
                closer = went[(dist[went.cpu()] < best_dist[went.cpu()]).to(dev)]
                best[closer] = x_adv[closer]
                best_dist[closer.cpu()] = dist[closer.cpu()]
    return BlackBoxResult(
        x_adv=best,
        queries=oracle.queries.clone(),
        success=attack_success(model, best, y, targeted=targeted, batch_size=batch_size),
        distance=_distance(best - x, norm),
    )
