"""Datasets by name: what exists (`list_datasets`), loading (`load_splits`) and a summary (`describe`)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from iotbed.data import cifar10, digits, folder, gtsrb, mnist
from iotbed.data.dataset import DatasetSplits, check_test_fraction
from iotbed.errors import DatasetError

Loader = Callable[..., DatasetSplits]


@dataclass(frozen=True)
class DatasetInfo:
    """What a user needs to pick a dataset and put its files in place."""

    name: str
    description: str
    image_shape: tuple[int, int, int]  # (C, H, W) with the default image_size
    num_classes: int | None  # None where it depends on the data (folder)
    needs_path: bool
    layout: str


_INFOS = (
    DatasetInfo(
        "digits",
        "scikit-learn's embedded 8x8 handwritten digits (1,797 images), upscaled to 32x32 grey; no download",
        (1, digits.DEFAULT_SIZE, digits.DEFAULT_SIZE),
        10,
        False,
        "built in, no path needed",
    ),
    DatasetInfo(
        "mnist",
        "MNIST handwritten digits, 28x28 grey, from the official IDX files (official split, or 80/20 of t10k)",
        (1, mnist.NATIVE_SIZE, mnist.NATIVE_SIZE),
        10,
        True,
        f"a folder with {mnist.LAYOUT}",
    ),
    DatasetInfo(
        "gtsrb",
        "German Traffic Sign Recognition Benchmark, 43 sign classes, cropped to the sign, 32x32 colour",
        (3, gtsrb.DEFAULT_SIZE, gtsrb.DEFAULT_SIZE),
        len(gtsrb.CLASSES),
        True,
        f"a folder with {gtsrb.LAYOUT}",
    ),
    DatasetInfo(
        "cifar10",
        "CIFAR-10 natural images, 10 classes, 32x32 colour, official 50k/10k split",
        (3, cifar10.NATIVE_SIZE, cifar10.NATIVE_SIZE),
        10,
        True,
        f"a folder with {cifar10.LAYOUT}",
    ),
    DatasetInfo(
        "folder",
        "your own images, one sub-folder per class, resized to 32x32 (grey if every image is grey)",
        (3, folder.DEFAULT_SIZE, folder.DEFAULT_SIZE),
        None,
        True,
        f"a folder with {folder.LAYOUT}",
    ),
)
_LOADERS: MappingProxyType[str, Loader] = MappingProxyType(
    {"digits": digits.load, "mnist": mnist.load, "gtsrb": gtsrb.load, "cifar10": cifar10.load, "folder": folder.load}
)


def list_datasets() -> list[DatasetInfo]:
    """Every dataset the testbed can load, the embedded default first."""
    return list(_INFOS)


def _loader(name: str) -> Loader:
    key = name.strip().lower() if isinstance(name, str) else name
    if key in _LOADERS:
        return _LOADERS[key]
    known = ", ".join(_LOADERS)
    close = difflib.get_close_matches(str(key), list(_LOADERS), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DatasetError(f"unknown dataset {name!r}.{hint} Known datasets: {known} (see `iotbed datasets list`).")


def load_splits(
    name: str,
    path: str | Path | None = None,
    *,
    seed: int = 0,
    image_size: int | None = None,
    test_fraction: float = 0.2,
) -> DatasetSplits:
    """Load dataset `name` as train/test splits.

    `path` is the dataset folder (None for the embedded digits). `image_size` resizes to a square of that
    many pixels (default: the dataset's own, see `list_datasets`). `seed` and `test_fraction` drive the
    stratified split of datasets without an official one (digits, folder, MNIST with only t10k files).
    """
    loader = _loader(name)
    test_fraction = check_test_fraction(test_fraction)
    # scikit-learn's random_state takes 0 <= seed < 2**32; say so here rather than as a split failure.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DatasetError(f"seed must be a whole number between 0 and 2**32 - 1, got {seed!r}.")
    folder_path = Path(path).expanduser() if path is not None else None
    return loader(folder_path, seed=seed, image_size=image_size, test_fraction=test_fraction)


def _class_counts(labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, int]:
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    return dict(zip(classes, (int(c) for c in counts), strict=True))


def describe(name: str, path: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """A JSON-ready summary of a loaded dataset, for `iotbed datasets show NAME`."""
    splits = load_splits(name, path, seed=seed)
    train, test = splits.train, splits.test
    return {
        "name": train.name,
        "source": train.source,
        "train_size": len(train),
        "test_size": len(test),
        "image_shape": list(train.image_shape),
        "num_classes": train.num_classes,
        "classes": list(train.classes),
        "class_counts": {
            "train": _class_counts(train.labels, train.classes),
            "test": _class_counts(test.labels, test.classes),
        },
    }
