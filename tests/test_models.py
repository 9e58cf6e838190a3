"""Tests of iotbed.models on sklearn's digits (8x8 upscaled to 32x32), independent of iotbed.data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from iotbed.errors import ModelError
from iotbed.models import (
    ARCHITECTURES,
    LeNet5,
    TrainConfig,
    build_model,
    count_flops,
    default_train_config,
    evaluate,
    get_or_train,
    load_model,
    model_from_bytes,
    model_to_bytes,
    predict,
    save_model,
    spec_for_dataset,
    train_model,
)
from iotbed.models import training as training_module
from iotbed.models.training import random_shift

# One epoch: enough to exercise caching and storage without spending seconds.
TINY = TrainConfig(epochs=1, batch_size=64, lr=2e-3)


@dataclass(frozen=True)
class Digits:
    """Just enough of iotbed.data.ImageDataset for the models package."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()

    def subset(self, n: int) -> Digits:
        return Digits(f"{self.name}[:{n}]", self.images[:n], self.labels[:n])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # These models are tiny: a second thread gains little, and on a busy 2-core box OpenMP threads
    # spinning against other processes made training 5-10x slower. Restored after the module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[Digits, Digits]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0.0, 1.0).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    return Digits("digits", x[tr], y[tr]), Digits("digits", x[te], y[te])


@pytest.fixture(scope="module")
def trained_lenet(digits, tmp_path_factory):
    """LeNet-5 with the default digits config, trained once for the whole module."""
    train, test = digits
    cache = tmp_path_factory.mktemp("cache")
    config = default_train_config("lenet5", "digits")
    return get_or_train("lenet5", train, config, test_ds=test, cache_dir=cache, progress=False)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (1, 32), (3, 32)])
def test_output_shape(arch: str, channels: int, size: int) -> None:
    model = build_model(
        arch, in_channels=channels, num_classes=7, image_size=size, mean=[0.5] * channels, std=[0.2] * channels
    )
    assert model(torch.rand(3, channels, size, size)).shape == (3, 7)
    # Normalisation is part of the weights so it survives save/load.
    assert torch.equal(model.state_dict()["normalize.mean"].flatten(), torch.full((channels,), 0.5))


def test_unknown_arch_suggests_closest() -> None:
    with pytest.raises(ModelError, match="Did you mean 'lenet5'"):
        build_model("lenet", in_channels=1, num_classes=10, image_size=32, mean=[0.0], std=[1.0])


def test_bad_train_config_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    cfg = TrainConfig(lr_schedule="step", step_milestones=(3, 6))
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_lenet5_reaches_95_percent_on_digits(trained_lenet) -> None:
    assert trained_lenet.trained_now
    assert trained_lenet.test_accuracy is not None and trained_lenet.test_accuracy >= 0.95


def test_same_seed_same_weights_other_seed_other_weights(digits) -> None:
    # gtsrb_cnn has BatchNorm and dropout, and "shift" adds augmentation: every source of randomness.
    train = digits[0].subset(256)
    cfg = TrainConfig(epochs=2, batch_size=64, augmentation="shift", lr_schedule="cosine", seed=7)
    spec = spec_for_dataset("gtsrb_cnn", train)
    rng_before = torch.get_rng_state()
    runs = []
    for config in (cfg, cfg, dataclasses.replace(cfg, seed=8)):
        torch.manual_seed(len(runs))  # different global RNG state before each run must not matter
        model = spec.build()
        train_model(model, train, config, progress=False)
        runs.append(weights(model))
    assert same_weights(runs[0], runs[1])
    assert not same_weights(runs[0], runs[2])
    torch.set_rng_state(rng_before)


def test_training_leaves_global_state_alone(digits) -> None:
    train = digits[0].subset(64)
    model = LeNet5()  # built first: construction itself draws from the global RNG
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    train_model(model, train, TINY, progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_shift_moves_each_image_at_most_two_pixels() -> None:
    images = torch.zeros(200, 2, 9, 9)
    images[:, :, 4, 4] = 1.0  # one bright pixel in the centre, on both channels
    shifted = random_shift(images, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, random_shift(images, torch.Generator().manual_seed(0)))
    assert torch.equal(shifted.sum(dim=(2, 3)), torch.ones(200, 2))  # moved, never lost or duplicated
    rows, cols = (shifted[:, 0] == 1).nonzero()[:, 1:].T
    assert rows.sub(4).abs().max() == 2 and cols.sub(4).abs().max() == 2
    assert torch.equal(shifted[:, 0], shifted[:, 1])  # channels move together
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 25  # all 5x5 offsets occur


def test_predict_is_batched_and_keeps_the_callers_mode(trained_lenet, digits) -> None:
    model, images = trained_lenet.model, digits[1].images
    model.train()
    labels, probs = predict(model, images, batch_size=50)
    assert model.training
    model.eval()
    assert torch.equal(labels, predict(model, images)[0])
    assert probs.shape == (len(images), 10) and torch.allclose(probs.sum(1), torch.ones(len(images)))


def test_get_or_train_second_call_uses_cache(digits, tmp_path, monkeypatch) -> None:
    train, test = digits
    calls = []
    real_train = training_module.train_model

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training_module, "train_model", counting_train)
    monkeypatch.setenv("IOTBED_CACHE_DIR", str(tmp_path))  # no cache_dir argument: the env var decides
    first = get_or_train("lenet5", train, TINY, test_ds=test, progress=False)
    second = get_or_train("lenet5", train, TINY, test_ds=test, progress=False)
    assert (first.trained_now, second.trained_now) == (True, False)
    assert len(calls) == 1
    assert second.train_report is None and first.train_report is not None
    assert first.key == second.key and first.path == second.path == tmp_path / "models" / f"{first.key}.safetensors"
    assert same_weights(weights(first.model), weights(second.model))
    assert first.test_accuracy == second.test_accuracy
    info = json.loads(first.path.with_suffix(".json").read_text())
    assert info["test_accuracies"] == {test.fingerprint(): first.test_accuracy}
    assert info["test_accuracy"] == first.test_accuracy and info["dataset"] == "digits"
    assert info["train_config"] == TINY.to_dict()
    # Anything that changes the weights changes the key.
    assert get_or_train("lenet5", train, dataclasses.replace(TINY, seed=1), progress=False).key != first.key
    assert len(calls) == 2


def test_cache_file_is_safetensors_not_pickle(trained_lenet) -> None:
    data = trained_lenet.path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{"
    header = json.loads(data[8 : 8 + header_len])
    metadata = header["__metadata__"]
    assert metadata["arch"] == "lenet5" and metadata["num_classes"] == "10" and metadata["image_size"] == "32"
    assert json.loads(metadata["train_config"]) == default_train_config("lenet5", "digits").to_dict()


def test_corrupt_cache_file_is_retrained(digits, tmp_path, caplog) -> None:
    train = digits[0]
    first = get_or_train("lenet5", train, TINY, cache_dir=tmp_path, progress=False)
    good = first.path.read_bytes()
    first.path.write_bytes(good[: len(good) // 2])  # truncated, as by a crash without atomic writes
    with caplog.at_level(logging.WARNING, logger="iotbed.models.cache"):
        again = get_or_train("lenet5", train, TINY, cache_dir=tmp_path, progress=False)
    assert again.trained_now
    assert "retraining" in caplog.text
    rewritten, _ = load_model(first.path)
    assert same_weights(weights(rewritten), weights(first.model))  # same seed, same weights again


def test_flipped_weight_byte_is_detected(trained_lenet, tmp_path) -> None:
    data = bytearray(trained_lenet.path.read_bytes())
    data[-5] ^= 0xFF
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt"):
        load_model(bad)


def test_round_trip_file_and_bytes_same_predictions(trained_lenet, digits, tmp_path) -> None:
    images = digits[1].images
    labels, probs = predict(trained_lenet.model, images)
    path = save_model(tmp_path / "lenet", trained_lenet.model, {"note": "round trip"})
    assert path.name == "lenet.safetensors"
    from_file, metadata = load_model(path)
    assert metadata["note"] == "round trip"
    from_bytes, _ = model_from_bytes(model_to_bytes(trained_lenet.model))
    for model in (from_file, from_bytes):
        other_labels, other_probs = predict(model, images)
        assert torch.equal(other_labels, labels) and torch.equal(other_probs, probs)
    assert evaluate(from_file, digits[1]) == trained_lenet.test_accuracy


def test_file_that_does_not_fit_its_architecture(trained_lenet, tmp_path) -> None:
    with pytest.raises(ModelError, match="not the 'gtsrb_cnn' asked for"):
        load_model(trained_lenet.path, arch="gtsrb_cnn")
    # Weights of a 10-class LeNet under metadata that claims 43 classes: a shape mismatch.
    tensors = safetensors.torch.load(trained_lenet.path.read_bytes())
    _, metadata = load_model(trained_lenet.path)
    metadata = {k: v for k, v in metadata.items() if k != "weights_sha256"} | {"num_classes": "43"}
    with pytest.raises(ModelError, match="shape mismatch"):
        model_from_bytes(safetensors.torch.save(tensors, metadata=metadata))
    # A payload from the network must not make us allocate a model for 100,000-pixel images.
    with pytest.raises(ModelError, match="out of range"):
        model_from_bytes(safetensors.torch.save(tensors, metadata=metadata | {"image_size": "100000"}))
    with pytest.raises(ModelError, match="not a safetensors"):
        model_from_bytes(b"\x80\x04 not a pickle we would ever load")


def test_count_flops_lenet5_by_hand() -> None:
    # 32x32x1 -> conv5x5 6 (28x28) -> pool -> conv5x5 16 (10x10) -> pool -> 400 -> 120 -> 84 -> 10
    expected = 2 * (
        6 * 28 * 28 * 5 * 5 * 1  # conv1
        + 16 * 10 * 10 * 5 * 5 * 6  # conv2
        + 400 * 120  # fc1
        + 120 * 84  # fc2
        + 84 * 10  # fc3
    )
    assert count_flops(LeNet5(in_channels=1, num_classes=10, image_size=32), (1, 32, 32)) == expected
    # 28x28 with padding=2 costs the same as 32x32 without.
    assert count_flops(LeNet5(image_size=28), (1, 28, 28)) == expected
