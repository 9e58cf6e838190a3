"""DeepTest: neuron coverage against a brute-force recomputation, the seven transformations, and the guided
search on a real digits LeNet-5 (determinism, coverage, every flip re-checked), then `iotbed probe deeptest`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from iotbed.analysis.deeptest import (
    BLUR_KINDS,
    IDENTITY,
    TRANSFORMATIONS,
    DeepTestResult,
    NeuronCoverage,
    Step,
    blur,
    brightness,
    contrast,
    output_dir,
    parameter_grid,
    rotate,
    run_deeptest,
    scale,
    shear,
    translate,
    translation_limit,
    write_results,
)
from iotbed.cli import main
from iotbed.data import load_splits
from iotbed.data.dataset import DatasetSplits, ImageDataset
from iotbed.errors import UsageError
from iotbed.models import ARCHITECTURES, default_train_config, get_or_train, spec_for_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- neuron coverage ------------------------------------------------------------------------------------------


def _tiny_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        nn.ReLU(),  # 2-D output: not a feature map, left out
        nn.Linear(6, 3),
    ).eval()


def _brute_force_covered(model: nn.Sequential, images: torch.Tensor, threshold: float) -> np.ndarray:
    """The authors' loops: each ReLU's 4-D output per input, min-max scaled as a whole, then each channel's mean."""
    rows = []
    for image in images:
        x, flags = image[None], []
        with torch.no_grad():
            for layer in model:
                x = layer(x)
                if isinstance(layer, nn.ReLU) and x.dim() == 4:
                    out = x[0].numpy().astype(np.float64)
                    span = out.max() - out.min()
                    scaled = np.zeros_like(out) if span == 0 else (out - out.min()) / span
                    flags += [scaled[c].mean() > threshold for c in range(out.shape[0])]
        rows.append(flags)
    return np.array(rows, dtype=bool)


@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.2, 0.5])
def test_coverage_equals_a_brute_force_recomputation(threshold: float) -> None:
    model = _tiny_model()
    images = torch.rand((12, 2, 12, 12), generator=torch.Generator().manual_seed(1))
    images[0] = 0.0  # a black image
    coverage = NeuronCoverage(model, (2, 12, 12), threshold)
    assert [(layer.name, layer.channels) for layer in coverage.layers] == [("1", 3), ("5", 4)]
    assert coverage.total == 7
    covered, predictions = coverage.evaluate(images)
    expected = _brute_force_covered(model, images, threshold)
    assert covered.shape == (12, 7) and np.array_equal(covered, expected)
    # Some channels are covered and some not at 0.2: the comparison is not trivially all-true or all-false.
    if threshold == 0.2:
        assert 0 < expected.sum() < expected.size
    with torch.no_grad():
        assert np.array_equal(predictions, model(images).argmax(1).numpy())


def test_coverage_refuses_a_model_without_feature_maps_and_a_bad_threshold() -> None:
    flat = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UsageError, match="no activation with a convolutional feature map"):
        NeuronCoverage(flat, (1, 4, 4))
    with pytest.raises(UsageError, match=r"threshold 1.0: give a value in \[0, 1\)"):
        NeuronCoverage(_tiny_model(), (2, 12, 12), 1.0)


# Channels of each architecture's convolutional feature maps, after their activations.
CONV_CHANNELS = {
    "lenet5": [6, 16],
    "tutorial_net": [10, 20],
    "gtsrb_cnn": [16, 32, 64],
    "cifar_cnn": [32, 32, 64, 64, 128, 128],
    "he_cnn": [4],
    "he_cnn_relu": [4],
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_colour_images_and_the_figure(arch: str, tmp_path: Path) -> None:
    """Untrained models on random colour images: the layers found, the search, and all four files written."""
    images = torch.rand((6, 3, 32, 32), generator=torch.Generator().manual_seed(2))
    ds = ImageDataset("noise", images, torch.arange(6) % 2, ("a", "b"), "test")
    model = spec_for_dataset(arch, ds).build()
    result = run_deeptest(model, ds, arch=arch, n_seeds=3, tries=2, seed=0, progress=False)
    assert [layer.channels for layer in result.coverage.layers] == CONV_CHANNELS[arch]
    payload = result.to_dict()
    write_results(tmp_path, result, payload, ds.classes, title=arch)
    assert json.loads((tmp_path / "deeptest.json").read_text())["neurons"] == sum(CONV_CHANNELS[arch])
    assert (tmp_path / "flips.png").stat().st_size > 0


# --- transformations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRANSFORMATIONS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_transformation_keeps_shape_and_range(name: str, shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    for parameter in parameter_grid(name, shape[1], shape[2]):
        out = TRANSFORMATIONS[name](image, parameter)
        assert out.shape == shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("name", list(IDENTITY))
def test_identity_parameters_return_the_input(name: str) -> None:
    image = np.random.default_rng(1).random((3, 17, 20), dtype=np.float32)
    assert np.array_equal(TRANSFORMATIONS[name](image, IDENTITY[name]), image)


def test_transformations_move_and_change_pixels_as_described() -> None:
    dot = np.zeros((1, 9, 9), np.float32)
    dot[0, 4, 8] = 1.0  # right of the centre
    assert translate(dot, -2)[0, 2, 6] == pytest.approx(1.0)  # left and up by 2
    assert rotate(dot, 90)[0, 0, 4] == pytest.approx(1.0)  # counter-clockwise: to the top
    assert rotate(dot, -90)[0, 8, 4] == pytest.approx(1.0)
    diagonal = np.zeros((1, 9, 9), np.float32)
    diagonal[0, 8, 4] = 1.0  # bottom row, centre column; shear 0.5 moves it 2 px left
    assert shear(diagonal, 0.5)[0, 8, 2] == pytest.approx(1.0)
    assert scale(dot, 0.5)[0, 4, 6] == pytest.approx(1.0)  # halfway to the centre
    grey = np.full((1, 4, 4), 0.6, np.float32)
    assert np.allclose(contrast(grey, 1.5), 0.9) and np.allclose(contrast(grey, 1.9), 1.0)
    assert np.allclose(brightness(grey, 51), 0.8) and np.allclose(brightness(np.zeros_like(grey), -21), 0.0)


def test_the_ten_blurs() -> None:
    assert sorted(BLUR_KINDS) == list(range(1, 11)) and BLUR_KINDS[10] == ("bilateral", 9)
    flat = np.full((3, 10, 12), 0.3, np.float32)
    spike = np.zeros((1, 11, 11), np.float32)
    spike[0, 5, 5] = 1.0
    edge = np.zeros((1, 11, 11), np.float32)
    edge[0, :, 6:] = 1.0
    for kind in BLUR_KINDS:
        assert np.allclose(blur(flat, kind), 0.3, atol=1e-6)  # a constant image stays constant
        if BLUR_KINDS[kind][0] in ("average", "Gaussian"):
            assert blur(spike, kind).sum() == pytest.approx(1.0, abs=1e-5)  # normalised kernels keep the sum
    # Box 3x3 spreads the spike over its 9 pixels; median removes it.
    assert blur(spike, 1)[0, 4:7, 4:7] == pytest.approx(np.full((3, 3), 1 / 9), abs=1e-6)
    assert not blur(spike, 7).any() and not blur(spike, 8).any()
    # The bilateral filter keeps a hard edge that a box blur of similar reach smears.
    assert np.abs(blur(edge, 10) - edge).max() < 0.05 < np.abs(blur(edge, 3) - edge).max()
    with pytest.raises(ValueError, match="give 1-10"):
        blur(flat, 11)


def test_parameter_grids_follow_the_authors_guided_search() -> None:
    assert parameter_grid("scale", 32, 32) == tuple(round(0.1 * p, 1) for p in range(5, 20))
    assert parameter_grid("shear", 32, 32)[0] == -0.5 and parameter_grid("shear", 32, 32)[-1] == 0.4
    assert parameter_grid("rotation", 32, 32) == tuple(float(p) for p in range(-30, 30))
    assert parameter_grid("contrast", 32, 32)[0] == 0.1 and parameter_grid("contrast", 32, 32)[-1] == 1.9
    assert parameter_grid("brightness", 32, 32) == tuple(float(p) for p in range(-21, 21))
    assert parameter_grid("blur", 32, 32) == tuple(float(k) for k in range(1, 11))
    # -50..49 px on the authors' 192 px high input; the same fraction of smaller images.
    assert parameter_grid("translation", 192, 256) == tuple(float(p) for p in range(-50, 50))
    assert (translation_limit(32, 32), translation_limit(28, 28), translation_limit(4, 4)) == (8, 7, 1)


# --- the guided search on a trained model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_splits("digits", seed=0)


@pytest.fixture(scope="module")
def lenet(digits: DatasetSplits, one_torch_thread: None) -> nn.Module:
    """The digits LeNet-5 `iotbed probe deeptest` uses, from the (test) model cache."""
    config = dataclasses.replace(default_train_config("lenet5", "digits"), seed=0)
    return get_or_train("lenet5", digits.train, config, progress=False).model


@pytest.fixture(scope="module")
def result(lenet: nn.Module, digits: DatasetSplits) -> DeepTestResult:
    return run_deeptest(lenet, digits.test, arch="lenet5", n_seeds=12, tries=6, seed=3, progress=False)


def _replay(result: DeepTestResult, seed_position: int, chain: tuple[Step, ...]) -> np.ndarray:
    image = result.seed_images[seed_position].numpy()
    for step in chain:
        image = step.apply(image)
    return image


def test_same_seed_same_result_other_seed_other_result(
    lenet: nn.Module, digits: DatasetSplits, result: DeepTestResult
) -> None:
    again = run_deeptest(lenet, digits.test, arch="lenet5", n_seeds=12, tries=6, seed=3, progress=False)
    assert json.dumps(again.to_dict()) == json.dumps(result.to_dict())
    assert again.generated == result.generated
    other = run_deeptest(lenet, digits.test, arch="lenet5", n_seeds=12, tries=6, seed=4, progress=False)
    assert other.seed_indices != result.seed_indices and other.generated != result.generated


def test_generation_adds_coverage_exactly_through_the_kept_images(result: DeepTestResult) -> None:
    outcome, coverage = result.outcome, result.coverage
    assert coverage.total == 6 + 16  # LeNet-5's two conv layers
    assert result.to_dict()["final_coverage"] >= result.to_dict()["seed_coverage"]
    assert not (outcome.seed_covered & ~outcome.final_covered).any()
    kept = [g for g in result.generated if g.kept]
    assert kept, "no generated image added coverage"
    # The final coverage is the seeds' plus the kept images' (replayed from their recorded chains), nothing else.
    replayed = torch.from_numpy(np.stack([_replay(result, g.seed, g.chain) for g in kept]))
    kept_covered, _ = coverage.evaluate(replayed)
    assert np.array_equal(outcome.final_covered, outcome.seed_covered | kept_covered.any(axis=0))
    # Each kept image covered something nothing before it had: at most one kept image per neuron.
    assert len(kept) <= int(outcome.final_covered.sum())
    # Every seed gets its tries: at least `tries` images each.
    assert len(result.generated) >= result.n_seeds * result.tries


def test_every_flip_predicts_another_label_than_its_seed(lenet: nn.Module, result: DeepTestResult) -> None:
    flips = result.flips()
    assert flips, "LeNet-5 on digits flips under DeepTest's transformations"
    seed_predictions = result.outcome.seed_predictions
    images = torch.from_numpy(np.stack([result.outcome.flip_images[i] for i, _ in flips]))
    with torch.no_grad():
        predictions = lenet.eval()(images).argmax(1).numpy()
    for (index, g), prediction in zip(flips, predictions, strict=True):
        assert prediction == g.prediction != seed_predictions[g.seed]
        # The stored image is the seed under the recorded chain of transformations.
        assert np.array_equal(result.outcome.flip_images[index], _replay(result, g.seed, g.chain))
    # Images that were not flips kept their seed's prediction.
    unflipped = [g for i, g in enumerate(result.generated) if i not in result.outcome.flip_images]
    assert all(g.prediction == seed_predictions[g.seed] for g in unflipped)
    stats = result.per_transformation()
    assert sum(s.flips for s in stats.values()) >= len(flips)  # each flip counts for its one or two transformations
    assert sum(s.tries for s in stats.values()) >= len(result.generated)


def test_bad_arguments_are_refused(lenet: nn.Module, digits: DatasetSplits) -> None:
    with pytest.raises(UsageError, match="seeds 0: give 1 to 360"):
        run_deeptest(lenet, digits.test, arch="lenet5", n_seeds=0)
    with pytest.raises(UsageError, match="tries 0"):
        run_deeptest(lenet, digits.test, arch="lenet5", n_seeds=2, tries=0)


# --- the command --------------------------------------------------------------------------------------------


def test_cli_writes_the_results(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    args = ["probe", "deeptest", "--seeds", "8", "--tries", "4", "--seed", "0", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["deeptest.json", "deeptest.md", "flips.csv", "flips.png"]
    data = json.loads((out / "deeptest.json").read_text())
    assert data["dataset"] == "digits" and data["arch"] == "lenet5" and data["seeds"] == 8 and data["tries"] == 4
    assert data["neurons"] == 22 and data["final_coverage"] >= data["seed_coverage"]
    assert set(data["per_transformation"]) == set(TRANSFORMATIONS)
    assert f"{data['final_coverage']:.4f}" in result.stdout
    markdown = (out / "deeptest.md").read_text()
    assert "| transformation | parameters | tries | kept | flips |" in markdown
    assert f"{data['final_coverage']:.4f}" in markdown
    csv_rows = (out / "flips.csv").read_text().splitlines()
    assert csv_rows[0].startswith("seed,dataset_index,label") and len(csv_rows) == data["flips"] + 1
    assert (out / "flips.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--seeds", "0"], "--seeds 0: give a number of seed images, 1 or more"),
        (["--seeds", "361"], "--seeds 361: the test split of digits holds 360 images; give 360 or less"),
        (["--tries", "0"], "--tries 0: give a number of tries per image, 1 or more"),
        (["--threshold", "1"], "--threshold 1.0: give a value in [0, 1)"),
        (["--threshold", "nan"], "--threshold nan: give a value in [0, 1)"),
        (["--seed", "-1"], "--seed -1: give a whole number between 0 and 2**32 - 1"),
        (["--arch", "lenet"], "--arch: unknown architecture 'lenet'. Did you mean 'lenet5'?"),
        (["--dataset", "digitz"], "--dataset digitz: unknown dataset 'digitz'. Did you mean 'digits'?"),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(tmp_path: Path, option: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["probe", "deeptest", *option, "--out", str(tmp_path / "x"), "--quiet"])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_default_output_folder_is_under_runs() -> None:
    path = output_dir(None, "digits", "lenet5")
    assert path.parent == Path("runs") and path.name.startswith("deeptest-digits-lenet5-")
