"""Property tests of the black-box attacks (Square Attack, HopSkipJump) and of L1 PGD on a LeNet-5 trained on
sklearn digits (trained once and cached, as in test_evasion.py).

Every model the attacks get here is wrapped in a row counter, so the queries an attack reports are checked
against what the model really saw (the attacks' query count, plus one re-prediction per image).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from iotbed.attacks.blackbox import BlackBoxResult, hop_skip_jump, square_attack
from iotbed.attacks.evasion import _project_l1, attack_success, pgd_l1, robust_accuracy
from iotbed.data import load_splits
from iotbed.models import get_or_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Counted(nn.Module):
    """Counts every image the model is asked about."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x)


Digits = tuple[Counted, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(scope="module")
def digits() -> Digits:
    """The counted model, 64 test images with labels, and a pool of other test images with labels."""
    splits = load_splits("digits")
    model = get_or_train("lenet5", splits.train, progress=False).model.eval()
    x, y = splits.test.images[:64], splits.test.labels[:64]
    assert robust_accuracy(model, x, y) > 0.9
    return Counted(model), x, y, splits.test.images[64:], splits.test.labels[64:]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_counted(model: Counted, attack: Callable[[], BlackBoxResult], n: int) -> BlackBoxResult:
    model.rows = 0
    result = attack()
    assert model.rows == int(result.queries.sum()) + n  # every query reported, plus one re-prediction each
    return result


def check_result(model: nn.Module, result: BlackBoxResult, x: torch.Tensor, y: torch.Tensor, *, targeted: bool) -> None:
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert result.queries.dtype == torch.long and result.success.dtype == torch.bool
    assert torch.equal(result.success, attack_success(model, result.x_adv, y, targeted=targeted))


def linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(1)


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def random_noise(x: torch.Tensor, size: float, norm: str, seed: int = 1) -> torch.Tensor:
    """x plus random noise of the given norm (L-inf: +-size everywhere; L2, L1: a random direction)."""
    g = gen(seed)
    if norm == "inf":
        return (x + size * (torch.randint(0, 2, x.shape, generator=g) * 2 - 1)).clamp(0, 1)
    d = torch.randn(x.shape, generator=g)
    scale = d.flatten(1).norm(dim=1) if norm == "2" else d.flatten(1).abs().sum(1)
    return (x + size * d / scale.view(-1, 1, 1, 1)).clamp(0, 1)


# --- Square Attack --------------------------------------------------------------------------------


@pytest.mark.parametrize(("norm", "eps"), [("inf", 0.25), ("2", 4.0)])
def test_square_keeps_budget_and_query_limit_and_beats_noise(digits: Digits, norm: str, eps: float) -> None:
    model, x, y, _, _ = digits
    result = run_counted(
        model, lambda: square_attack(model, x, y, eps=eps, norm=norm, max_queries=300, generator=gen()), len(x)
    )
    check_result(model, result, x, y, targeted=False)
    if norm == "inf":  # exactly, in the images' own float32 arithmetic
        assert bool((linf(result.x_adv, x) <= eps).all())
        assert torch.equal(result.distance, linf(result.x_adv, x))
    else:
        assert bool((l2(result.x_adv, x) <= eps).all())
        assert torch.allclose(result.distance, l2(result.x_adv, x))
    assert int(result.queries.max()) <= 300 and int(result.queries.min()) >= 1
    # images still not fooled spent the whole budget; fooled ones stopped there
    assert bool((result.queries[~result.success] == 300).all())
    assert float(result.queries[result.success].float().mean()) < 300
    attacked = 1 - float(result.success.float().mean())
    noise = robust_accuracy(model, random_noise(x, eps, norm), y)
    assert noise > 0.9 and attacked < noise - (0.5 if norm == "inf" else 0.3), (attacked, noise)


def test_square_targeted_reaches_targets(digits: Digits) -> None:
    model, x, y, _, _ = digits
    x, target = x[:32], (y[:32] + 1) % 10
    result = run_counted(
        model,
        lambda: square_attack(model, x, target, eps=0.3, max_queries=400, targeted=True, generator=gen()),
        len(x),
    )
    check_result(model, result, x, target, targeted=True)
    assert bool((linf(result.x_adv, x) <= 0.3).all()) and int(result.queries.max()) <= 400
    assert float(result.success.float().mean()) > 0.3
    assert float(attack_success(model, random_noise(x, 0.3, "inf"), target, targeted=True).float().mean()) < 0.1


def test_square_p_schedule_and_eps_zero(digits: Digits) -> None:
    from iotbed.attacks.blackbox import _square_p

    assert [_square_p(0.8, it, 10000) for it in (0, 10, 11, 51, 201, 501, 1001, 2001, 4001, 6001, 8001)] == [
        0.8 / d for d in (1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    ]
    assert _square_p(0.8, 3, 100) == 0.8 / 8  # rescaled: iteration 3 of 100 is 300 of 10,000
    model, x, y, _, _ = digits
    result = square_attack(model, x[:8], y[:8], eps=0.0, max_queries=5, generator=gen())
    assert torch.equal(result.x_adv, x[:8]) and int(result.queries.max()) <= 5


# --- HopSkipJump ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("norm", "radius"), [("2", 3.5), ("inf", 0.2)])
def test_hop_skip_jump_query_limit_success_and_beats_noise(digits: Digits, norm: str, radius: float) -> None:
    model, x, y, _, _ = digits
    x, y = x[:32], y[:32]
    result = run_counted(model, lambda: hop_skip_jump(model, x, y, norm=norm, max_queries=800, generator=gen()), len(x))
    check_result(model, result, x, y, targeted=False)
    assert int(result.queries.max()) <= 800
    size = linf(result.x_adv, x) if norm == "inf" else l2(result.x_adv, x)
    assert torch.allclose(result.distance, size)
    assert float(result.success.float().mean()) > 0.9  # a start was found (and kept) for nearly all
    # the accuracy left within `radius`: images whose adversarial example lies farther count as held
    attacked = 1 - float((result.success & (size <= radius)).float().mean())
    noise = robust_accuracy(model, random_noise(x, radius, norm), y)
    assert noise > 0.85 and attacked < noise - 0.3, (attacked, noise)


def test_hop_skip_jump_never_passes_a_small_budget(digits: Digits) -> None:
    model, x, y, _, _ = digits
    for budget in (1, 2, 30, 150):
        result = run_counted(
            model, lambda b=budget: hop_skip_jump(model, x[:16], y[:16], max_queries=b, generator=gen()), 16
        )
        assert int(result.queries.max()) <= budget
        check_result(model, result, x[:16], y[:16], targeted=False)
    clean_wrong = ~attack_success(model, x[:16], y[:16], targeted=True)
    assert bool((result.queries[clean_wrong] == 1).all())  # returned after the clean query
    assert bool((result.queries[~clean_wrong] == 150).all())  # the budget binds well before 64 iterations


def test_hop_skip_jump_targeted_from_given_starts(digits: Digits) -> None:
    model, x, y, pool, pool_y = digits
    x, target = x[:16], (y[:16] + 1) % 10
    x_init = torch.stack([pool[(pool_y == t).nonzero()[0, 0]] for t in target.tolist()])
    result = run_counted(
        model,
        lambda: hop_skip_jump(model, x, target, targeted=True, x_init=x_init, max_queries=500, generator=gen()),
        len(x),
    )
    check_result(model, result, x, target, targeted=True)
    assert float(result.success.float().mean()) > 0.9
    # far closer to x than the starting images of the target class
    assert float(result.distance.median()) < 0.6 * float(l2(x_init, x).median())


# --- both -----------------------------------------------------------------------------------------


ATTACKS: dict[str, Callable[..., BlackBoxResult]] = {
    "square_inf": lambda m, x, y, g, **kw: square_attack(m, x, y, eps=0.2, max_queries=40, generator=g, **kw),
    "square_l2": lambda m, x, y, g, **kw: square_attack(m, x, y, eps=2.0, norm="2", max_queries=40, generator=g, **kw),
    "hsj_l2": lambda m, x, y, g, **kw: hop_skip_jump(m, x, y, max_queries=300, generator=g, **kw),
    "hsj_inf": lambda m, x, y, g, **kw: hop_skip_jump(m, x, y, norm="inf", max_queries=300, generator=g, **kw),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_same_seed_same_result(digits: Digits, name: str) -> None:
    model, x, y, _, _ = digits
    a, b, c = (ATTACKS[name](model, x[:8], y[:8], gen(seed)) for seed in (5, 5, 6))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    assert not torch.equal(a.x_adv, c.x_adv)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_already_wrong_costs_one_query_and_unfoolable_model_is_left(name: str) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # always class 0: no input changes it
    x = torch.rand(4, 3, 8, 8, generator=gen())
    wrong = ATTACKS[name](net, x, torch.ones(4, dtype=torch.long), gen())
    assert torch.equal(wrong.x_adv, x) and torch.equal(wrong.queries, torch.ones(4, dtype=torch.long))
    assert bool(wrong.success.all())
    held = ATTACKS[name](net, x, torch.zeros(4, dtype=torch.long), gen())
    assert not bool(held.success.any())
    if name.startswith("hsj"):  # no start found: the clean query and 100 noise trials
        assert torch.equal(held.x_adv, x) and torch.equal(held.queries, torch.full((4,), 101))
    else:  # the whole budget spent, within eps
        assert torch.equal(held.queries, torch.full((4,), 40))


def test_eval_mode_restored_and_no_parameter_gradients(digits: Digits) -> None:
    model, x, y, _, _ = digits
    model.zero_grad(set_to_none=True)  # a model trained just now (cold cache) keeps its last step's gradients
    model.train()
    try:
        for attack in ATTACKS.values():
            attack(model, x[:4], y[:4], gen())
            assert model.training
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())


def test_invalid_arguments_raise(digits: Digits) -> None:
    model, x, y, _, _ = digits
    x, y = x[:4], y[:4]
    g = gen()
    cases = [
        lambda: square_attack(model, x, y, eps=0.1),  # no generator
        lambda: square_attack(model, x, y, eps=0.1, generator=0),
        lambda: square_attack(model, x, y, eps=-0.1, generator=g),
        lambda: square_attack(model, x, y, eps=float("nan"), generator=g),
        lambda: square_attack(model, x, y, eps=0.1, norm="1", generator=g),
        lambda: square_attack(model, x, y, eps=0.1, max_queries=0, generator=g),
        lambda: square_attack(model, x, y, eps=0.1, max_queries=1.5, generator=g),
        lambda: square_attack(model, x, y, eps=0.1, p_init=0.0, generator=g),
        lambda: square_attack(model, x, y, eps=0.1, p_init=1.5, generator=g),
        lambda: square_attack(model, x, y, eps=0.1, batch_size=0, generator=g),
        lambda: square_attack(model, x * 2, y, eps=0.1, generator=g),
        lambda: square_attack(model, x, y[:2], eps=0.1, generator=g),
        lambda: square_attack(model, x, y.float(), eps=0.1, generator=g),
        lambda: square_attack(model, x, y + 10, eps=0.1, generator=g),  # no such class
        lambda: square_attack(model, x, y - 10, eps=0.1, generator=g),
        lambda: square_attack(model, x[:, :, :4, :4], y, eps=0.1, norm="2", generator=g),  # too small for L2
        lambda: square_attack("model", x, y, eps=0.1, generator=g),  # type: ignore[arg-type]
        lambda: hop_skip_jump(model, x, y),  # no generator
        lambda: hop_skip_jump(model, x, y, norm="1", generator=g),
        lambda: hop_skip_jump(model, x, y, max_queries=0, generator=g),
        lambda: hop_skip_jump(model, x, y, max_iter=-1, generator=g),
        lambda: hop_skip_jump(model, x, y, init_evals=0, generator=g),
        lambda: hop_skip_jump(model, x, y, init_evals=100, max_evals=10, generator=g),
        lambda: hop_skip_jump(model, x, y, init_trials=-1, generator=g),
        lambda: hop_skip_jump(model, x, y, gamma=0.0, generator=g),
        lambda: hop_skip_jump(model, x, y, targeted=1, generator=g),  # type: ignore[arg-type]
        lambda: hop_skip_jump(model, x, y, x_init=x[:2], generator=g),
        lambda: hop_skip_jump(model, x, y, x_init=x * 2, generator=g),
        lambda: hop_skip_jump(model, x, y + 10, generator=g),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError):
            case()
            pytest.fail(f"case {i} did not raise")


# --- L1 PGD (sparse L1 descent) -------------------------------------------------------------------


def test_project_l1_is_the_euclidean_projection() -> None:
    g = gen(2)
    x = torch.rand(6, 1, 5, 5, generator=g) * 0.2 + 0.4
    v = x + torch.randn(x.shape, generator=g) * 0.1
    eps = 0.5
    out = _project_l1(v, x, eps)
    delta, raw = (out - x).flatten(1), (v - x).flatten(1)
    # inside the ball the point stays; outside it lands on the sphere, soft-thresholded by one theta per row
    assert torch.allclose(delta.abs().sum(1), torch.clamp(raw.abs().sum(1), max=eps), atol=1e-5)
    for row, r in zip(delta, raw, strict=True):
        if r.abs().sum() > eps:  # theta by bisection: sum(max(|r| - theta, 0)) = eps
            lo, hi = 0.0, float(r.abs().max())
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if float((r.abs() - mid).clamp(min=0).sum()) > eps else (lo, mid)
            assert torch.allclose(row, r.sign() * (r.abs() - hi).clamp(min=0), atol=1e-5)
    inside = x + (v - x) * 0.01
    assert torch.allclose(_project_l1(inside, x, eps), inside)
    assert torch.equal(_project_l1(v, x, 0.0), x)


def test_pgd_l1_budget_noise_and_reproducibility(digits: Digits) -> None:
    model, x, y, _, _ = digits
    eps = 15.0
    adv = pgd_l1(model, x, y, eps=eps, steps=20)
    assert adv.min() >= 0 and adv.max() <= 1
    size = (adv - x).flatten(1).abs().sum(1)
    assert bool((size <= eps * (1 + 1e-5)).all()) and float(size.max()) > 0.5 * eps
    attacked, noise = robust_accuracy(model, adv, y), robust_accuracy(model, random_noise(x, eps, "1"), y)
    assert noise > 0.9 and attacked < noise - 0.3, (attacked, noise)
    assert torch.equal(pgd_l1(model, x[:8], y[:8], eps=0.0, steps=3), x[:8])
    # a step touches about 1% of the pixels
    one = pgd_l1(model, x[:8], y[:8], eps=eps, alpha=1.0, steps=1)
    assert int((one != x[:8]).flatten(1).sum(1).max()) <= 0.02 * x[0].numel()
    a, b, c = (pgd_l1(model, x[:8], y[:8], eps=5.0, steps=2, random_start=True, generator=gen(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    target = (y + 1) % 10
    targeted = pgd_l1(model, x, target, eps=25.0, alpha=5.0, steps=20, targeted=True)
    assert float(attack_success(model, targeted, target, targeted=True).float().mean()) > 0.25
    for bad in (
        lambda: pgd_l1(model, x, y, eps=-1.0),
        lambda: pgd_l1(model, x, y, eps=1.0, sparsity=1.0),
        lambda: pgd_l1(model, x, y, eps=1.0, sparsity=-0.1),
        lambda: pgd_l1(model, x, y, eps=1.0, steps=-1),
        lambda: pgd_l1(model, x, y, eps=1.0, random_start=True),  # no generator
    ):
        with pytest.raises(ValueError):
            bad()


def test_empty_batch(digits: Digits) -> None:
    model, x, y, _, _ = digits
    for attack in ATTACKS.values():
        result = attack(model, x[:0], y[:0], gen())
        assert result.x_adv.shape == x[:0].shape and result.queries.numel() == 0 and result.success.numel() == 0
