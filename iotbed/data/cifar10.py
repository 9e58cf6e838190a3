"""CIFAR-10 from the official "python version" batches (data_batch_1..5, test_batch, batches.meta).

Those files are pickles, and unpickling an arbitrary file runs whatever code it names. A user points the
testbed at downloaded files, so they are read with an unpickler that only resolves the handful of globals
the real files need (numpy array reconstruction and plain containers) and refuses everything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iotbed.data.dataset import (
    DatasetSplits,
    ImageDataset,
    check_image_size,
    images_from_uint8,
    require_dir,
    resize_images,
)
from iotbed.errors import DatasetError

NAME = "cifar10"
NATIVE_SIZE = 32
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
LAYOUT = "the python-version batches data_batch_1 .. data_batch_5, test_batch and batches.meta (cifar-10-batches-py/)"
_PIXELS = 3 * NATIVE_SIZE * NATIVE_SIZE

# (module, name) pairs the official batches (pickled by Python 2 / old numpy) and re-pickled copies
# (Python 3, numpy 1 or 2, protocols 0-5) refer to. Nothing here can run a command or touch files.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Protocols 0-2 written by Python 3 store bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
        *(
            (module, name)
            for module in ("builtins", "__builtin__")
            for name in ("dict", "list", "tuple", "set", "frozenset", "bytearray")
        ),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only ALLOWED_GLOBALS; any other global raises DatasetError."""

    def __init__(self, file: Any, *, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise DatasetError(
                f"{self._source}: refused to unpickle a reference to {module}.{name}; a CIFAR-10 batch only holds "
                "numpy arrays, lists and dicts. The file is not an official CIFAR-10 batch (it may be malicious): "
                "download it again from the official site."
            )
        # numpy 2 moved numpy.core to numpy._core; go straight there rather than through the deprecated alias.
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"{self._source}: refused a persistent-id reference, which CIFAR-10 batches never contain.")


def load_pickle(path: Path) -> Any:
    """Unpickle one batch file with RestrictedUnpickler, turning every failure into a DatasetError."""
    try:
        with path.open("rb") as handle:
            return RestrictedUnpickler(handle, source=path).load()
    except DatasetError:
        raise
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    # The content is untrusted: whatever a malformed stream makes pickle or numpy raise is reported the same way.
    except Exception as exc:
        raise DatasetError(
            f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}). The file is truncated or corrupt; "
            "download it again."
        ) from None


def _field(batch: Any, key: str, path: Path) -> Any:
    # The official files have bytes keys (Python 2 str); a Python 3 re-pickle may have str keys.
    if isinstance(batch, dict):
        for candidate in (key.encode(), key):
            if candidate in batch:
                return batch[candidate]
    raise DatasetError(f"{path}: expected a pickled dict with a {key!r} entry, as in the official CIFAR-10 batches.")


def read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and int64 labels (N,) from one batch file."""
    batch = load_pickle(path)
    data, labels = _field(batch, "data", path), _field(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        shape = getattr(data, "shape", type(data).__name__)
        raise DatasetError(f"{path}: 'data' is {shape}, expected a uint8 array of shape (N, {_PIXELS}).")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: 'labels' must be a list of whole numbers.") from None
    if label_array.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {data.shape[0]} images but {label_array.size} labels; they must match.")
    if label_array.size and not 0 <= label_array.min() <= label_array.max() < num_classes:
        raise DatasetError(
            f"{path}: labels must lie in 0..{num_classes - 1}, found {label_array.min()}..{label_array.max()}."
        )
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE), label_array


def read_classes(path: Path) -> tuple[str, ...]:
    names = _field(load_pickle(path), "label_names", path)
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes | str) for n in names):
        raise DatasetError(f"{path}: 'label_names' must be a non-empty list of class names.")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def find_folder(path: Path) -> Path:
    """The batches folder: the given one, or its cifar-10-batches-py sub-folder (the archive's layout)."""
    nested = path / "cifar-10-batches-py"
    if not (path / TEST_FILE).exists() and nested.is_dir():
        return nested
    return path


def load(path: Path | None, *, seed: int, image_size: int | None, test_fraction: float) -> DatasetSplits:
    # seed and test_fraction do not apply: CIFAR-10 has an official train/test split.
    folder = find_folder(require_dir(path, dataset=NAME, expected=LAYOUT))
    size = check_image_size(image_size, NATIVE_SIZE)
    missing = [name for name in (*TRAIN_FILES, TEST_FILE, META_FILE) if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"{folder}: missing {', '.join(missing)}. The cifar10 dataset expects {LAYOUT}.")
    classes = read_classes(folder / META_FILE)
    train_parts = [read_batch(folder / name, len(classes)) for name in TRAIN_FILES]
    test_images, test_labels = read_batch(folder / TEST_FILE, len(classes))

    def make(images: np.ndarray, labels: np.ndarray) -> ImageDataset:
        tensor = resize_images(images_from_uint8(images, channels_last=False), size)
        return ImageDataset(NAME, tensor, torch.from_numpy(labels), classes, str(folder))

    return DatasetSplits(
        train=make(np.concatenate([p[0] for p in train_parts]), np.concatenate([p[1] for p in train_parts])),
        test=make(test_images, test_labels),
    )
