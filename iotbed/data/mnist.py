"""MNIST from the official IDX files (gzipped or not), parsed with numpy.

IDX: a big-endian uint32 magic 0x000008NN (0x08 = unsigned bytes, NN = number of dimensions), NN big-endian
uint32 sizes, then the data. Every header field is checked so a wrong, swapped or truncated file is reported
by name instead of surfacing as a numpy reshape error.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from iotbed.data.dataset import (
    DatasetSplits,
    ImageDataset,
    check_image_size,
    images_from_uint8,
    require_dir,
    resize_images,
    split_dataset,
)
from iotbed.errors import DatasetError

NAME = "mnist"
CLASSES = tuple(str(d) for d in range(10))
NATIVE_SIZE = 28
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
LAYOUT = (
    "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
    "(optionally train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz])"
)

_KIND = {IMAGES_MAGIC: "images (3 dims)", LABELS_MAGIC: "labels (1 dim)"}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except EOFError:
        raise DatasetError(
            f"{path}: the gzip stream ends early (truncated download?). Download the file again."
        ) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetError(
            f"{path}: not a valid gzip file ({exc}). Download it again, or gunzip it and keep the raw IDX file."
        ) from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc}).") from None


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """The uint8 array stored in one IDX file, after checking magic number, dimensions and length."""
    raw = _read_bytes(path)
    what = _KIND.get(expected_magic, f"magic 0x{expected_magic:08X}")
    if len(raw) < 4:
        raise DatasetError(f"{path}: only {len(raw)} bytes, too short for an IDX header. Download the file again.")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        hint = (
            f" (that is the magic of an IDX {_KIND[magic]} file: are the images and labels files swapped?)"
            if magic in _KIND
            else ""
        )
        raise DatasetError(
            f"{path}: IDX magic number is 0x{magic:08X}, expected 0x{expected_magic:08X} for MNIST {what}{hint}. "
            "Check that this is the right, uncorrupted MNIST file."
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} of {header_len} bytes). Download the file again.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_len = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected_len:
        problem = "truncated" if len(raw) < expected_len else "has trailing bytes"
        raise DatasetError(
            f"{path}: {problem}: the header declares shape {dims}, i.e. {expected_len} bytes, but the file has "
            f"{len(raw)}. Download the file again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    # Raw first: it is what `gunzip` leaves behind and is faster to read; both hold the same bytes.
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_pair(folder: Path, images_stem: str, labels_stem: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _find(folder, images_stem), _find(folder, labels_stem)
    missing = [stem for stem, found in ((images_stem, images_path), (labels_stem, labels_path)) if found is None]
    if images_path is None or labels_path is None:
        raise DatasetError(
            f"{folder}: missing {' and '.join(f'{m}[.gz]' for m in missing)}. The mnist dataset expects {LAYOUT}, "
            "as downloaded from the official MNIST site."
        )
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels; they "
            "must match. Make sure both files come from the same MNIST split and download."
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DatasetError(
            f"{labels_path}: label {int(labels.max())} found, MNIST labels are 0..9. Download the file again."
        )
    return images, labels.astype(np.int64)


def load(path: Path | None, *, seed: int, image_size: int | None, test_fraction: float) -> DatasetSplits:
    folder = require_dir(path, dataset=NAME, expected=LAYOUT)
    size = check_image_size(image_size, NATIVE_SIZE)
    has_train = [_find(folder, stem) is not None for stem in TRAIN_FILES]
    if any(has_train) and not all(has_train):
        present, absent = (TRAIN_FILES[0], TRAIN_FILES[1]) if has_train[0] else (TRAIN_FILES[1], TRAIN_FILES[0])
        raise DatasetError(
            f"{folder}: found {present} but not {absent}[.gz]. Add the missing file to use the official training set, "
            f"or remove {present} to train on a split of the t10k test set."
        )
    test_images, test_labels = _load_pair(folder, *TEST_FILES)
    if all(has_train):
        # The official split: seed and test_fraction do not apply.
        train_images, train_labels = _load_pair(folder, *TRAIN_FILES)
        return _splits(train_images, train_labels, test_images, test_labels, size, str(folder))
    images = resize_images(images_from_uint8(test_images, channels_last=False), size)
    return split_dataset(NAME, images, test_labels, CLASSES, str(folder), test_fraction=test_fraction, seed=seed)


def _splits(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    size: int,
    source: str,
) -> DatasetSplits:
    def make(images: np.ndarray, labels: np.ndarray) -> ImageDataset:
        tensor = resize_images(images_from_uint8(images, channels_last=False), size)
        return ImageDataset(NAME, tensor, torch.from_numpy(labels), CLASSES, source)

    return DatasetSplits(train=make(train_images, train_labels), test=make(test_images, test_labels))
