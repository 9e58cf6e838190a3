"""Deep Gamblers: the loss against its formula, the reward's range, the pre-training loss, and a gambler trained
on digits that ranks errors above right answers, cached as safetensors and reproducible from its seed."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct

import pytest
import torch

from iotbed.analysis.detection import auroc
from iotbed.analysis.selective import risk_coverage
from iotbed.data import load_splits
from iotbed.defenses.gambler import (
    GamblerConfig,
    class_cross_entropy,
    gambler_loss,
    get_or_train_gambler,
)
from iotbed.models import TrainConfig, build_model, count_flops, get_or_train, load_model, predict, train_model

# Two epochs, one of them pre-training: enough to exercise caching and seeding in about a second.
TINY = GamblerConfig(epochs=2, pretrain_epochs=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Every test here trains or runs LeNet-5 on small batches (see conftest)."""


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", None, seed=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gambler-cache")


@pytest.fixture(scope="module")
def gambler(digits, cache):
    """The default gambler for LeNet-5 on digits (10 epochs, 3 of them pre-training, o = 2.2)."""
    return get_or_train_gambler("lenet5", digits.train, GamblerConfig(), cache_dir=cache, progress=False)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loss_is_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (64,), generator=generator)
    p = logits.softmax(1)
    for reward in (1.01, 2.2, 10.0):
        direct = -torch.log(p[torch.arange(64), labels] + p[:, 10] / reward).mean()
        assert gambler_loss(logits, labels, reward).item() == pytest.approx(direct.item(), rel=1e-12)


def test_loss_and_gradient_are_finite_where_the_probabilities_underflow() -> None:
    # m = 2. Row 0: the true class and the abstention both at -1e4 (p_y and p_abstain are 0 in float32);
    # row 1: all mass on the true class (loss 0); row 2: all mass on abstaining (loss log o).
    logits = torch.tensor([[1e4, -1e4, -1e4], [-1e4, 1e4, -1e4], [0.0, 0.0, 1e4]], requires_grad=True)
    labels = torch.tensor([1, 1, 0])
    loss = gambler_loss(logits, labels, 2.0)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(((2e4 - math.log(1.5)) + 0.0 + math.log(2.0)) / 3, rel=1e-6)
    p = logits.detach().softmax(1)
    assert torch.isinf(-torch.log(p[0, 1] + p[0, 2] / 2.0))  # what the probability-space form would give


def test_reward_out_of_range_is_refused(digits, tmp_path) -> None:
    for reward in (1.0, 0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="reward o"):
            GamblerConfig(reward=reward)
    logits, labels = torch.zeros(4, 11), torch.zeros(4, dtype=torch.int64)
    assert torch.isfinite(gambler_loss(logits, labels, 10.0))  # o = m is allowed
    with pytest.raises(ValueError, match=r"1 < o <= 10"):
        gambler_loss(logits, labels, 10.5)
    with pytest.raises(ValueError, match=r"1 < o <= 10"):
        get_or_train_gambler("lenet5", digits.train, GamblerConfig(reward=10.5), cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="pretrain_epochs"):
        get_or_train_gambler("lenet5", digits.train, GamblerConfig(epochs=3, pretrain_epochs=3), cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was trained or written


def test_pretraining_leaves_the_abstention_output_alone(digits) -> None:
    """The authors' pre-training is cross-entropy over the m class outputs; train_model's `loss` carries it."""
    model = build_model("lenet5", in_channels=1, num_classes=11, image_size=32, mean=(0.0,), std=(1.0,))
    last = model.classifier[-1]
    abstain_row, class_rows = last.weight[10].detach().clone(), last.weight[:10].detach().clone()
    config = TrainConfig(epochs=1, batch_size=64, lr=2e-3)
    train_model(model, digits.train, config, progress=False, reinit=False, loss=class_cross_entropy)
    assert torch.equal(last.weight[10], abstain_row)
    assert not torch.equal(last.weight[:10], class_rows)
    train_model(model, digits.train, config, progress=False, reinit=False)  # the default: plain cross-entropy
    assert not torch.equal(last.weight[10], abstain_row)


def test_abstention_ranks_its_own_and_the_deployed_models_errors(gambler, digits, cache) -> None:
    """On held-out digits: rejecting the 20% most abstaining frames lowers the error rate of both answers,
    and p_abstain is higher on errors than on right answers (measured AUROC 0.94-0.96 for seeds 0-2)."""
    deployed = get_or_train("lenet5", digits.train, cache_dir=cache, progress=False)
    x, y = digits.test.images, digits.test.labels
    p_abstain = gambler.abstain_probability(x)
    assert p_abstain.shape == (len(y),) and bool(((p_abstain >= 0) & (p_abstain <= 1)).all())
    own = gambler.predict(x)
    assert float((own == y).float().mean()) > 0.95
    sure = (1 - p_abstain).numpy()
    for answers in (own, predict(deployed.model, x)[0]):
        correct = (answers == y).numpy()
        assert (~correct).any()
        _, risk = risk_coverage(sure, correct)
        assert risk[round(0.8 * len(y)) - 1] < risk[-1]
        assert auroc(sure[correct], sure[~correct]) > 0.8  # errors score lower: P(sure_error < sure_right)
    assert gambler.flops_per_image == count_flops(deployed.model, (1, 32, 32)) + 2 * 84  # one more output of fc 84


def test_second_call_loads_the_cache_with_identical_weights(gambler, digits, cache) -> None:
    again = get_or_train_gambler("lenet5", digits.train, GamblerConfig(), cache_dir=cache, progress=False)
    assert gambler.trained_now and not again.trained_now
    assert again.key == gambler.key and again.path == gambler.path == cache / "gamblers" / f"{gambler.key}.safetensors"
    assert same_weights(weights(again.model), weights(gambler.model))
    assert again.num_classes == 10 and again.model.num_classes == 11
    assert again.train_wall_time_s == gambler.train_wall_time_s and again.train_wall_time_s > 0
    data = again.path.read_bytes()  # safetensors: a length, then a JSON header; no pickle
    (header_len,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8 : 8 + header_len])["__metadata__"]["cache_key"] == gambler.key
    info = json.loads(again.path.with_suffix(".json").read_text())
    assert (info["reward"], info["epochs"], info["pretrain_epochs"]) == (2.2, 10, 3)
    assert [phase["loss"] for phase in info["phases"]] == ["cross_entropy", "gamblers"]


def test_same_seed_same_weights_and_the_key_covers_the_settings(digits, tmp_path) -> None:
    first = get_or_train_gambler("lenet5", digits.train, TINY, cache_dir=tmp_path / "a", progress=False)
    second = get_or_train_gambler("lenet5", digits.train, TINY, cache_dir=tmp_path / "b", progress=False)
    assert first.trained_now and second.trained_now
    assert first.key == second.key and same_weights(weights(first.model), weights(second.model))
    others = [
        get_or_train_gambler("lenet5", digits.train, change, cache_dir=tmp_path / "a", progress=False)
        for change in (
            dataclasses.replace(TINY, seed=1),
            dataclasses.replace(TINY, reward=3.0),
            dataclasses.replace(TINY, pretrain_epochs=0),
            dataclasses.replace(TINY, epochs=3),
        )
    ]
    assert len({first.key, *(g.key for g in others)}) == 5
    assert not same_weights(weights(first.model), weights(others[0].model))


def test_corrupt_cache_file_is_retrained(digits, tmp_path, caplog) -> None:
    first = get_or_train_gambler("lenet5", digits.train, TINY, cache_dir=tmp_path, progress=False)
    assert first.path is not None
    good = first.path.read_bytes()
    first.path.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="iotbed.defenses.gambler"):
        again = get_or_train_gambler("lenet5", digits.train, TINY, cache_dir=tmp_path, progress=False)
    assert again.trained_now and "retraining" in caplog.text
    assert same_weights(weights(again.model), weights(first.model))
    assert same_weights(weights(load_model(first.path)[0]), weights(first.model))  # the file was rewritten
