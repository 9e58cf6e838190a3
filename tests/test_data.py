"""Tests for iotbed.data: real MNIST/GTSRB from ../shared/datasets, synthetic files for formats and errors."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iotbed.data import DatasetSplits, ImageDataset, cifar10, describe, gtsrb, list_datasets, load_splits, mnist
from iotbed.data.cache import CACHE_ENV
from iotbed.errors import DatasetError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
MNIST_DIR = SHARED / "mnist"
GTSRB_DIR = SHARED / "gtsrb"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

needs_mnist = pytest.mark.skipif(
    not all((MNIST_DIR / f).is_file() for f in MNIST_FILES), reason=f"real MNIST t10k files not found in {MNIST_DIR}"
)
needs_gtsrb = pytest.mark.skipif(
    not (GTSRB_DIR / "Final_Training" / "Images").is_dir() or not (GTSRB_DIR / "Final_Test" / "Images").is_dir(),
    reason=f"real GTSRB (Final_Training/, Final_Test/) not found in {GTSRB_DIR}",
)


def _equal_splits(a: DatasetSplits, b: DatasetSplits) -> bool:
    return all(
        torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        for x, y in ((a.train, b.train), (a.test, b.test))
    )


def _assert_stratified(splits: DatasetSplits, test_fraction: float) -> None:
    """Each class's test count is within one image of test_fraction of that class's total."""
    train_counts = torch.bincount(splits.train.labels, minlength=splits.train.num_classes)
    test_counts = torch.bincount(splits.test.labels, minlength=splits.test.num_classes)
    for cls, (n_train, n_test) in enumerate(zip(train_counts.tolist(), test_counts.tolist(), strict=True)):
        expected = (n_train + n_test) * test_fraction
        assert abs(n_test - expected) <= 1, f"class {cls}: {n_test} test images, expected ~{expected:.1f}"


def _error(excinfo: pytest.ExceptionInfo[DatasetError]) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------------------------------------- MNIST (real)


@pytest.fixture(scope="module")
def mnist_splits() -> DatasetSplits:
    return load_splits("mnist", MNIST_DIR, seed=0)


@needs_mnist
def test_mnist_t10k_split_is_8000_2000_and_stratified(mnist_splits: DatasetSplits) -> None:
    assert (len(mnist_splits.train), len(mnist_splits.test)) == (8000, 2000)
    _assert_stratified(mnist_splits, 0.2)
    raw_labels = mnist.read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", mnist.LABELS_MAGIC)
    pooled = torch.cat([mnist_splits.train.labels, mnist_splits.test.labels])
    assert torch.equal(
        torch.bincount(pooled, minlength=10),
        torch.bincount(torch.from_numpy(raw_labels.astype(np.int64)), minlength=10),
    )


@needs_mnist
def test_mnist_shapes_dtype_and_range(mnist_splits: DatasetSplits) -> None:
    for split in (mnist_splits.train, mnist_splits.test):
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.image_shape == (1, 28, 28)
        assert float(split.images.min()) == 0.0 and float(split.images.max()) == 1.0
        assert split.classes == tuple("0123456789") and split.num_classes == 10
        assert split.source == str(MNIST_DIR)


@needs_mnist
def test_mnist_raw_idx_header_and_first_label() -> None:
    images = mnist.read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz", mnist.IMAGES_MAGIC)
    labels = mnist.read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", mnist.LABELS_MAGIC)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert int(labels[0]) == 7  # the well-known first test digit
    assert int(labels.max()) == 9


@needs_mnist
def test_mnist_first_test_image_reaches_its_split_unchanged(mnist_splits: DatasetSplits) -> None:
    raw = mnist.read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz", mnist.IMAGES_MAGIC)
    first = torch.from_numpy(raw[0].astype(np.float32) / 255.0)
    # Splits keep file order, so image 0 is the first image of whichever split it landed in.
    holder = next(s for s in (mnist_splits.train, mnist_splits.test) if torch.equal(s.images[0, 0], first))
    assert int(holder.labels[0]) == 7


@needs_mnist
def test_mnist_ungzipped_files_load_identically(tmp_path: Path, mnist_splits: DatasetSplits) -> None:
    for name in MNIST_FILES:
        with gzip.open(MNIST_DIR / name, "rb") as src, (tmp_path / name.removesuffix(".gz")).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    assert _equal_splits(load_splits("mnist", tmp_path, seed=0), mnist_splits)


@needs_mnist
def test_mnist_seed_determinism_and_image_size(mnist_splits: DatasetSplits) -> None:
    again = load_splits("mnist", str(MNIST_DIR), seed=0)
    assert _equal_splits(again, mnist_splits)
    assert again.test.fingerprint() == mnist_splits.test.fingerprint()
    other = load_splits("mnist", MNIST_DIR, seed=1, image_size=32)
    assert other.train.image_shape == (1, 32, 32) and float(other.train.images.max()) <= 1.0
    other28 = load_splits("mnist", MNIST_DIR, seed=1)
    assert not torch.equal(other28.test.labels, mnist_splits.test.labels)
    assert other28.test.fingerprint() != mnist_splits.test.fingerprint()


# ------------------------------------------------------------------------------------- MNIST (synthetic files)


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, prefix: str, n: int, seed: int = 0, *, gz: bool = False) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


def test_mnist_official_split_used_when_training_files_exist(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 20, seed=1)
    _write_mnist(tmp_path, "train", 30, seed=2, gz=True)
    splits = load_splits("mnist", tmp_path, seed=5)
    assert (len(splits.train), len(splits.test)) == (30, 20)
    train_raw = mnist.read_idx(tmp_path / "train-images-idx3-ubyte.gz", mnist.IMAGES_MAGIC)
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(train_raw.astype(np.float32) / 255.0))


def test_mnist_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as excinfo:
        load_splits("mnist", missing)
    assert str(missing) in _error(excinfo)

    with pytest.raises(DatasetError) as excinfo:
        load_splits("mnist")
    assert "--path" in _error(excinfo) and "t10k-images-idx3-ubyte" in _error(excinfo)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as excinfo:
        load_splits("mnist", empty)
    assert str(empty) in _error(excinfo) and "t10k-images-idx3-ubyte" in _error(excinfo)

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(DatasetError, match="not a folder") as excinfo:
        load_splits("mnist", not_a_dir)
    assert str(not_a_dir) in _error(excinfo)


def test_mnist_wrong_magic(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 10)
    images = tmp_path / "t10k-images-idx3-ubyte"
    # A labels file where the images should be: same bytes, labels magic.
    images.write_bytes(_idx_bytes(np.zeros((10, 28, 28), np.uint8), magic=mnist.LABELS_MAGIC))
    with pytest.raises(DatasetError) as excinfo:
        load_splits("mnist", tmp_path)
    message = _error(excinfo)
    assert str(images) in message and "0x00000803" in message and "0x00000801" in message


def test_mnist_mismatched_counts(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 10)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.arange(9) % 10))
    with pytest.raises(DatasetError) as excinfo:
        load_splits("mnist", tmp_path)
    assert str(labels) in _error(excinfo) and "10 images" in _error(excinfo) and "9 labels" in _error(excinfo)


@pytest.mark.parametrize("cut", [2, 10, 500])
def test_mnist_truncated_raw_file(tmp_path: Path, cut: int) -> None:
    _write_mnist(tmp_path, "t10k", 10)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:cut])
    with pytest.raises(DatasetError) as excinfo:
        load_splits("mnist", tmp_path)
    assert str(images) in _error(excinfo)


def test_mnist_truncated_and_corrupt_gzip(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 50, gz=True)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = images.read_bytes()
    images.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="truncated") as excinfo:
        load_splits("mnist", tmp_path)
    assert str(images) in _error(excinfo)
    images.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="gzip") as excinfo:
        load_splits("mnist", tmp_path)
    assert str(images) in _error(excinfo)


def test_mnist_half_a_training_pair_is_an_error(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "t10k", 20)
    _write_mnist(tmp_path, "train", 20)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte") as excinfo:
        load_splits("mnist", tmp_path)
    assert str(tmp_path) in _error(excinfo)


# ---------------------------------------------------------------------------------------------- GTSRB (real)


@pytest.fixture(scope="module")
def gtsrb_loads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Decode real GTSRB once into a private cache, then load again; the second load must not decode."""
    if not (GTSRB_DIR / "Final_Training" / "Images").is_dir():
        pytest.skip(f"real GTSRB not found in {GTSRB_DIR}")
    cache_root = tmp_path_factory.mktemp("iotbed-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache_root))
        start = time.perf_counter()
        first = load_splits("gtsrb", GTSRB_DIR)
        first_s = time.perf_counter() - start

        def no_decoding(*args: object, **kwargs: object) -> None:
            raise AssertionError("the second GTSRB load decoded images instead of using the cache")

        mp.setattr(gtsrb, "_decode_splits", no_decoding)
        start = time.perf_counter()
        second = load_splits("gtsrb", GTSRB_DIR)
        cached_s = time.perf_counter() - start
        expected_entry = gtsrb.cache_path(GTSRB_DIR, 32)
    print(f"\nGTSRB first load {first_s:.2f} s, cached load {cached_s:.2f} s")
    return {
        "first": first,
        "second": second,
        "cache_root": cache_root,
        "entry": expected_entry,
        "times": (first_s, cached_s),
    }


def _stored_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _csv_rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter=";"))


@needs_gtsrb
def test_gtsrb_shapes_classes_and_range(gtsrb_loads: dict[str, object]) -> None:
    splits = gtsrb_loads["first"]
    assert isinstance(splits, DatasetSplits)
    for split in (splits.train, splits.test):
        assert split.image_shape == (3, 32, 32)
        assert split.num_classes == 43 and len(split.classes) == 43
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
    assert set(splits.train.labels.unique().tolist()) == set(range(43))


@needs_gtsrb
def test_gtsrb_counts_equal_csv_rows(gtsrb_loads: dict[str, object]) -> None:
    splits = gtsrb_loads["first"]
    train_rows = [r for p in sorted((GTSRB_DIR / "Final_Training" / "Images").glob("*/GT-*.csv")) for r in _csv_rows(p)]
    test_rows = _csv_rows(GTSRB_DIR / "Final_Test" / "Images" / "GT-final_test.csv")
    assert len(splits.train) == len(train_rows) and len(splits.test) == len(test_rows)
    for split, rows in ((splits.train, train_rows), (splits.test, test_rows)):
        expected = Counter(int(r["ClassId"]) for r in rows)
        assert Counter(split.labels.tolist()) == expected
    # Test order follows GT-final_test.csv.
    assert splits.test.labels[:5].tolist() == [int(r["ClassId"]) for r in test_rows[:5]]


@needs_gtsrb
def test_gtsrb_roi_crop_is_applied(gtsrb_loads: dict[str, object]) -> None:
    splits = gtsrb_loads["first"]
    folder = GTSRB_DIR / "Final_Test" / "Images"
    rows = _csv_rows(folder / "GT-final_test.csv")
    # An image stored at its annotated size, so the official inclusive box applies as written.
    index, row = next(
        (i, r)
        for i, r in enumerate(rows)
        if _stored_size(folder / r["Filename"]) == (int(r["Width"]), int(r["Height"]))
        and int(r["Roi.X1"]) > 0
        and int(r["Roi.Y1"]) > 0
    )
    with Image.open(folder / row["Filename"]) as stored:
        image = stored.convert("RGB")
    box = (int(row["Roi.X1"]), int(row["Roi.Y1"]), int(row["Roi.X2"]) + 1, int(row["Roi.Y2"]) + 1)
    manual = np.asarray(image.crop(box).resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    loaded = torch.round(splits.test.images[index] * 255).to(torch.uint8).numpy()
    assert np.array_equal(loaded, manual)
    uncropped = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.abs(loaded.astype(int) - uncropped).mean() > 5  # the crop visibly changes the frame


@needs_gtsrb
def test_gtsrb_roi_is_scaled_for_images_stored_at_another_size(gtsrb_loads: dict[str, object]) -> None:
    splits = gtsrb_loads["first"]
    folder = GTSRB_DIR / "Final_Test" / "Images"
    rows = _csv_rows(folder / "GT-final_test.csv")
    index, row = next(
        (i, r)
        for i, r in enumerate(rows)
        if _stored_size(folder / r["Filename"]) != (int(r["Width"]), int(r["Height"]))
    )
    with Image.open(folder / row["Filename"]) as stored:
        image = stored.convert("RGB")
    sx, sy = image.width / int(row["Width"]), image.height / int(row["Height"])
    box = (
        round(int(row["Roi.X1"]) * sx),
        round(int(row["Roi.Y1"]) * sy),
        min(round((int(row["Roi.X2"]) + 1) * sx), image.width),
        min(round((int(row["Roi.Y2"]) + 1) * sy), image.height),
    )
    manual = np.asarray(image.crop(box).resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    loaded = torch.round(splits.test.images[index] * 255).to(torch.uint8).numpy()
    assert np.array_equal(loaded, manual)
    # The box read as if unscaled would reach past the image and pad the frame with black.
    unscaled = (int(row["Roi.X1"]), int(row["Roi.Y1"]), int(row["Roi.X2"]) + 1, int(row["Roi.Y2"]) + 1)
    if unscaled[2] > image.width or unscaled[3] > image.height:
        padded = np.asarray(image.crop(unscaled).resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
        assert not np.array_equal(loaded, padded)


@needs_gtsrb
def test_gtsrb_cache_second_load_is_identical(gtsrb_loads: dict[str, object]) -> None:
    assert _equal_splits(gtsrb_loads["first"], gtsrb_loads["second"])
    entry = gtsrb_loads["entry"]
    assert isinstance(entry, Path) and entry.is_file() and entry.suffix == ".npz"
    assert Path(gtsrb_loads["cache_root"]) in entry.parents
    with np.load(entry, allow_pickle=False) as archive:
        assert archive["train_images"].dtype == np.uint8 and archive["train_images"].shape[1:] == (32, 32, 3)
    first_s, cached_s = gtsrb_loads["times"]
    assert cached_s < first_s


# ----------------------------------------------------------------------------------------- GTSRB (synthetic)

_GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def _write_gtsrb(root: Path, per_class: int = 3, classes: tuple[int, ...] = (0, 1)) -> Path:
    """A tiny GTSRB tree: 40x30 PPMs with a distinct 20x10 block at the box (5,4)-(24,13)."""
    rng = np.random.default_rng(0)

    def image(label: int) -> Image.Image:
        pixels = rng.integers(0, 60, size=(30, 40, 3), dtype=np.uint8)
        pixels[4:14, 5:25] = (200, 40 * label, 100)
        return Image.fromarray(pixels)

    test_lines = [_GT_HEADER]
    for label in classes:
        folder = root / "Final_Training" / "Images" / f"{label:05d}"
        folder.mkdir(parents=True)
        lines = [_GT_HEADER]
        for k in range(per_class):
            image(label).save(folder / f"{label:05d}_{k:05d}.ppm")
            lines.append(f"{label:05d}_{k:05d}.ppm;40;30;5;4;24;13;{label}")
        (folder / f"GT-{label:05d}.csv").write_text("\n".join(lines) + "\n")
    test_folder = root / "Final_Test" / "Images"
    test_folder.mkdir(parents=True)
    for k, label in enumerate(classes):
        image(label).save(test_folder / f"{k:05d}.ppm")
        test_lines.append(f"{k:05d}.ppm;40;30;5;4;24;13;{label}")
    (test_folder / "GT-final_test.csv").write_text("\n".join(test_lines) + "\n")
    return root


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache_root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache_root))
    return cache_root


def test_gtsrb_synthetic_tree_crops_the_box(tmp_path: Path, private_cache: Path) -> None:
    root = _write_gtsrb(tmp_path / "gtsrb")
    splits = load_splits("gtsrb", root, image_size=20)
    assert (len(splits.train), len(splits.test)) == (6, 2)
    assert splits.train.image_shape == (3, 20, 20)
    # The box holds only the flat block, so the crop is that flat colour.
    red = splits.train.images[:, 0]
    assert torch.allclose(red, torch.full_like(red, 200 / 255), atol=1e-6)
    assert list(private_cache.glob("datasets/gtsrb-20px-*.npz"))
    # The unpacked-zip layout GTSRB/Final_Training is accepted from its parent folder.
    nested = tmp_path / "outer"
    nested.mkdir()
    shutil.move(str(root), nested / "GTSRB")
    assert len(load_splits("gtsrb", nested, image_size=20).train) == 6


def test_gtsrb_cache_key_follows_size_and_csv_content(tmp_path: Path, private_cache: Path) -> None:
    root = _write_gtsrb(tmp_path / "gtsrb")
    key32 = gtsrb.cache_path(root, 32)
    assert key32.parent == private_cache / "datasets"
    assert gtsrb.cache_path(root, 24) != key32
    csv_path = root / "Final_Test" / "Images" / "GT-final_test.csv"
    csv_path.write_text(csv_path.read_text().replace(";0\n", ";1\n", 1))
    assert gtsrb.cache_path(root, 32) != key32


def test_gtsrb_corrupt_cache_entry_is_rebuilt(tmp_path: Path, private_cache: Path) -> None:
    root = _write_gtsrb(tmp_path / "gtsrb")
    entry = gtsrb.cache_path(root, 32)
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"garbage, not an npz")
    splits = load_splits("gtsrb", root)
    assert len(splits.train) == 6
    with np.load(entry, allow_pickle=False) as archive:
        assert archive["test_labels"].tolist() == [0, 1]


def test_gtsrb_csv_missing_column(tmp_path: Path, private_cache: Path) -> None:
    root = _write_gtsrb(tmp_path / "gtsrb")
    csv_path = root / "Final_Training" / "Images" / "00001" / "GT-00001.csv"
    csv_path.write_text(csv_path.read_text().replace(";ClassId", "", 1))
    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", root)
    message = _error(excinfo)
    assert str(csv_path) in message and "line 1" in message and "ClassId" in message


def test_gtsrb_csv_names_missing_file(tmp_path: Path, private_cache: Path) -> None:
    root = _write_gtsrb(tmp_path / "gtsrb")
    folder = root / "Final_Training" / "Images" / "00000"
    (folder / "00000_00001.ppm").unlink()
    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", root)
    message = _error(excinfo)
    assert str(folder / "GT-00000.csv") in message and "line 3" in message and "00000_00001.ppm" in message


def test_gtsrb_csv_bad_number_and_box(tmp_path: Path, private_cache: Path) -> None:
    root = _write_gtsrb(tmp_path / "gtsrb")
    csv_path = root / "Final_Test" / "Images" / "GT-final_test.csv"
    original = csv_path.read_text()
    csv_path.write_text(original.replace("00001.ppm;40;30;5", "00001.ppm;forty;30;5"))
    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", root)
    assert str(csv_path) in _error(excinfo) and "line 3" in _error(excinfo) and "Width" in _error(excinfo)
    csv_path.write_text(original.replace("00000.ppm;40;30;5;4;24", "00000.ppm;40;30;25;4;24"))
    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", root)
    assert str(csv_path) in _error(excinfo) and "line 2" in _error(excinfo)


def test_gtsrb_missing_files_and_folders(tmp_path: Path, private_cache: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", tmp_path / "absent")
    assert str(tmp_path / "absent") in _error(excinfo)

    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", tmp_path)
    assert str(tmp_path) in _error(excinfo) and "Final_Training" in _error(excinfo)

    root = _write_gtsrb(tmp_path / "gtsrb")
    test_csv = root / "Final_Test" / "Images" / "GT-final_test.csv"
    test_csv.unlink()
    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", root)
    assert str(test_csv) in _error(excinfo)

    root = _write_gtsrb(tmp_path / "gtsrb2")
    class_csv = root / "Final_Training" / "Images" / "00001" / "GT-00001.csv"
    class_csv.unlink()
    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", root)
    assert str(class_csv) in _error(excinfo)


def test_gtsrb_truncated_image(tmp_path: Path, private_cache: Path) -> None:
    root = _write_gtsrb(tmp_path / "gtsrb")
    broken = root / "Final_Test" / "Images" / "00001.ppm"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(DatasetError) as excinfo:
        load_splits("gtsrb", root)
    assert str(broken) in _error(excinfo) and "line 3" in _error(excinfo)


# --------------------------------------------------------------------------------------------------- digits


def test_digits_default_shapes_and_range() -> None:
    splits = load_splits("digits")
    assert len(splits.train) + len(splits.test) == 1797
    assert len(splits.test) == 360  # ceil(0.2 * 1797)
    assert splits.train.image_shape == (1, 32, 32) and splits.train.source == "sklearn"
    assert float(splits.train.images.min()) == 0.0 and float(splits.train.images.max()) == pytest.approx(1.0)
    assert splits.train.classes == tuple("0123456789")


def test_digits_split_is_stratified_and_deterministic() -> None:
    a, b, c = load_splits("digits", seed=3), load_splits("digits", seed=3), load_splits("digits", seed=4)
    _assert_stratified(a, 0.2)
    assert _equal_splits(a, b) and a.train.fingerprint() == b.train.fingerprint()
    assert not torch.equal(a.test.images, c.test.images)
    assert a.test.fingerprint() != c.test.fingerprint()


def test_digits_image_size_and_test_fraction() -> None:
    splits = load_splits("digits", image_size=16, test_fraction=0.5)
    assert splits.test.image_shape == (1, 16, 16)
    assert abs(len(splits.test) - 1797 / 2) <= 1
    with pytest.raises(DatasetError, match="test_fraction"):
        load_splits("digits", test_fraction=1.5)
    with pytest.raises(DatasetError, match="image_size"):
        load_splits("digits", image_size=0)
    with pytest.raises(DatasetError, match="seed"):
        load_splits("digits", seed=-1)


def test_digits_rejects_a_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        load_splits("digits", tmp_path)
    assert str(tmp_path) in _error(excinfo)


# -------------------------------------------------------------------------------------------------- CIFAR-10


def _write_cifar(folder: Path, protocol: int, per_batch: int = 4, test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(protocol)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
        written[name] = data
    meta = {
        b"label_names": [
            n.encode()
            for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
        ]
    }
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump(meta, handle, protocol=protocol)
    return written


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_loads_synthetic_batches(tmp_path: Path, protocol: int) -> None:
    written = _write_cifar(tmp_path / "cifar-10-batches-py", protocol)
    splits = load_splits("cifar10", tmp_path)  # the archive's parent folder is accepted too
    assert (len(splits.train), len(splits.test)) == (20, 3)
    assert splits.train.image_shape == (3, 32, 32) and splits.train.classes[0] == "airplane"
    row = written["data_batch_2"][1]
    image = splits.train.images[4 + 1]
    # Rows are R plane, G plane, B plane, each 32x32 row-major.
    assert torch.equal(image[0], torch.from_numpy(row[:1024].reshape(32, 32).astype(np.float32) / 255))
    assert torch.equal(image[2], torch.from_numpy(row[2048:].reshape(32, 32).astype(np.float32) / 255))
    assert load_splits("cifar10", tmp_path, image_size=16).test.image_shape == (3, 16, 16)


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_refuses_malicious_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    _write_cifar(folder, 2)
    marker = tmp_path / "pwned"
    evil = folder / "data_batch_3"
    evil.write_bytes(pickle.dumps({b"data": _RunsCommand(marker), b"labels": []}, protocol=2))
    with pytest.raises(DatasetError) as excinfo:
        load_splits("cifar10", folder)
    assert str(evil) in _error(excinfo) and "system" in _error(excinfo) and "refused" in _error(excinfo)
    assert not marker.exists()
    # Other dangerous globals are refused the same way, whatever the protocol.
    for payload in (pickle.dumps(eval, protocol=4), pickle.dumps(shutil.rmtree, protocol=0)):
        evil.write_bytes(payload)
        with pytest.raises(DatasetError, match="refused"):
            cifar10.load_pickle(evil)


def test_cifar10_errors_name_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    _write_cifar(folder, 2)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DatasetError) as excinfo:
        load_splits("cifar10", folder)
    assert str(folder) in _error(excinfo) and "data_batch_5" in _error(excinfo)

    _write_cifar(folder, 2)
    truncated = folder / "test_batch"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DatasetError) as excinfo:
        load_splits("cifar10", folder)
    assert str(truncated) in _error(excinfo)

    _write_cifar(folder, 2)
    wrong = folder / "data_batch_1"
    wrong.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DatasetError) as excinfo:
        load_splits("cifar10", folder)
    assert str(wrong) in _error(excinfo) and "3072" in _error(excinfo)


# ---------------------------------------------------------------------------------------------- image folder


def _write_folder(root: Path, classes: dict[str, int], mode: str = "RGB") -> None:
    rng = np.random.default_rng(1)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            size = (20 + k, 16 + 2 * k)
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            suffix = (".png", ".jpg", ".bmp", ".PNG")[k % 4]
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(root / name / f"{k}{suffix}")


def test_folder_dataset_rgb_split_and_determinism(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"stop": 10, "yield": 10, "ahead": 5})
    (tmp_path / "stop" / "notes.txt").write_text("ignored")
    a = load_splits("folder", tmp_path, seed=0)
    assert a.train.classes == ("ahead", "stop", "yield")
    assert a.train.image_shape == (3, 32, 32) and len(a.train) + len(a.test) == 25
    _assert_stratified(a, 0.2)
    assert _equal_splits(a, load_splits("folder", tmp_path, seed=0))
    assert not torch.equal(a.test.images, load_splits("folder", tmp_path, seed=1).test.images)


def test_folder_dataset_grey_images_give_one_channel(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"a": 4, "b": 4}, mode="L")
    splits = load_splits("folder", tmp_path, image_size=12)
    assert splits.train.image_shape == (1, 12, 12)


def test_folder_dataset_errors(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"cat": 3, "dog": 3})
    empty = tmp_path / "bird"
    empty.mkdir()
    with pytest.raises(DatasetError) as excinfo:
        load_splits("folder", tmp_path)
    assert str(empty) in _error(excinfo)
    empty.rmdir()

    broken = tmp_path / "dog" / "0.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError) as excinfo:
        load_splits("folder", tmp_path)
    assert str(broken) in _error(excinfo)

    lonely = tmp_path / "single"
    _write_folder(lonely, {"only": 3})
    with pytest.raises(DatasetError) as excinfo:
        load_splits("folder", lonely)
    assert str(lonely) in _error(excinfo)


# ------------------------------------------------------------------------------------------ registry & types


def test_unknown_dataset_suggests_the_closest_name() -> None:
    with pytest.raises(DatasetError) as excinfo:
        load_splits("mnsit")
    assert "'mnsit'" in _error(excinfo) and "Did you mean 'mnist'" in _error(excinfo)
    with pytest.raises(DatasetError, match="Known datasets"):
        load_splits("imagenet")


def test_list_datasets_describes_every_loader() -> None:
    infos = {info.name: info for info in list_datasets()}
    assert set(infos) == {"digits", "mnist", "gtsrb", "cifar10", "folder"}
    assert not infos["digits"].needs_path and all(i.needs_path for n, i in infos.items() if n != "digits")
    assert infos["gtsrb"].num_classes == 43 and infos["gtsrb"].image_shape == (3, 32, 32)
    assert infos["mnist"].image_shape == (1, 28, 28)
    assert "GT-final_test.csv" in infos["gtsrb"].layout and "t10k-images-idx3-ubyte" in infos["mnist"].layout
    digits_info = infos["digits"]
    assert load_splits("digits").train.image_shape == digits_info.image_shape


def test_describe_digits_is_json_ready_and_consistent() -> None:
    summary = describe("digits", seed=1)
    json.dumps(summary)
    assert summary["name"] == "digits" and summary["source"] == "sklearn"
    assert summary["image_shape"] == [1, 32, 32] and summary["classes"] == list("0123456789")
    for split in ("train", "test"):
        counts = summary["class_counts"][split]
        assert set(counts) == set(summary["classes"]) and sum(counts.values()) == summary[f"{split}_size"]
    assert summary["train_size"] + summary["test_size"] == 1797


def _toy(labels: list[int]) -> ImageDataset:
    images = torch.linspace(0, 1, len(labels) * 4).reshape(len(labels), 1, 2, 2)
    return ImageDataset("toy", images, torch.tensor(labels), ("a", "b"), "test")


def test_image_dataset_subset_and_fingerprint() -> None:
    data = _toy([0, 1, 0, 1])
    assert len(data) == 4 and data.num_classes == 2 and data.image_shape == (1, 2, 2)
    picked = data.subset([3, 0])
    assert picked.labels.tolist() == [1, 0] and torch.equal(picked.images[1], data.images[0])
    masked = data.subset(torch.tensor([False, True, True, False]))
    assert masked.labels.tolist() == [1, 0]
    assert data.subset(np.array([1, 2])).labels.tolist() == [1, 0]
    fingerprint = data.fingerprint()
    assert fingerprint == _toy([0, 1, 0, 1]).fingerprint() and len(fingerprint) == 64
    assert _toy([0, 1, 1, 1]).fingerprint() != fingerprint
    assert data.subset([0, 1, 2]).fingerprint() != fingerprint
    with pytest.raises(ValueError):
        ImageDataset("bad", torch.full((1, 1, 2, 2), 2.0), torch.tensor([0]), ("a",), "test")
