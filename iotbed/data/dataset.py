"""The in-memory dataset types every loader returns, and the helpers loaders share.

Images are held as one float32 tensor in [0, 1], shape (N, C, H, W): models normalise inputs themselves, and
attacks and defenses work in that pixel space, so nothing downstream needs to know where the data came from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from iotbed.errors import DatasetError

Indices = Sequence[int] | np.ndarray | torch.Tensor


# eq=False: a generated __eq__ would compare tensors element-wise and fail on `bool(tensor)`.
@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image set: `images` float32 (N, C, H, W) in [0, 1], `labels` int64 (N,)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        # Invariants, not user errors: a loader that breaks them has a bug, hence ValueError.
        if self.images.dtype != torch.float32 or self.images.dim() != 4:
            raise ValueError(f"images must be float32 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if not self.classes:
            raise ValueError("a dataset needs at least one class")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")
        if len(self.images) and (float(self.images.min()) < 0.0 or float(self.images.max()) > 1.0):
            raise ValueError("image values must lie in [0, 1]")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, indices: Indices) -> ImageDataset:
        """The samples at `indices` (ints, or a boolean mask), in that order."""
        index = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        # A boolean mask cast to int64 would silently select samples 0 and 1; turn it into positions first.
        if index.dtype == torch.bool:
            index = torch.nonzero(index, as_tuple=False).flatten()
        index = index.to(torch.int64).flatten()
        return ImageDataset(
            name=self.name,
            images=self.images.index_select(0, index),
            labels=self.labels.index_select(0, index),
            classes=self.classes,
            source=self.source,
        )

    def fingerprint(self) -> str:
        """A sha256 hex digest of the content, stable across runs and machines (a trained-model cache key).

        Images are quantised to uint8 first so float noise below 1/255 (e.g. from a different resize
        kernel build) does not change the key, and every part is length-prefixed so fields cannot run together.
        """
        digest = hashlib.sha256()

        def part(data: bytes) -> None:
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)

        part(self.name.encode())
        part(np.asarray(self.images.shape, dtype="<i8").tobytes())
        part("\x1f".join(self.classes).encode())
        quantised = torch.round(self.images.detach().cpu() * 255.0).to(torch.uint8)
        part(np.ascontiguousarray(quantised.numpy()).tobytes())
        part(np.ascontiguousarray(self.labels.detach().cpu().numpy().astype("<i8")).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class DatasetSplits:
    """A train set and a held-out test set from the same dataset."""

    train: ImageDataset
    test: ImageDataset


def images_from_uint8(array: np.ndarray, *, channels_last: bool) -> torch.Tensor:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) -> float32 (N, C, H, W) in [0, 1]."""
    # np.require copies only when needed: frombuffer arrays are read-only, which torch.from_numpy warns about.
    tensor = torch.from_numpy(np.require(array, dtype=np.uint8, requirements=["C", "W"]))
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    elif channels_last:
        # Reorder while still uint8: a quarter of the bytes to move compared with doing it after the cast.
        tensor = tensor.permute(0, 3, 1, 2).contiguous()
    return tensor.to(torch.float32).div_(255.0)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) images in [0, 1] to size x size, clamped back into [0, 1]."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    # antialias only matters when shrinking (it is a no-op for bilinear upsampling) and avoids aliasing there.
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0)


def check_image_size(image_size: int | None, default: int) -> int:
    if image_size is None:
        return default
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 4 <= image_size <= 1024:
        raise DatasetError(f"image_size must be a whole number of pixels between 4 and 1024, got {image_size!r}.")
    return image_size


def check_test_fraction(test_fraction: float) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float) or not 0.0 < test_fraction < 1.0:
        raise DatasetError(
            f"test_fraction must be a number strictly between 0 and 1 (e.g. 0.2), got {test_fraction!r}."
        )
    return float(test_fraction)


def stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int, where: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """Train/test positions with the class proportions kept in both; sorted so each split keeps file order."""
    positions = np.arange(len(labels))
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    present = counts[counts > 0]
    if len(present) and present.min() < 2:
        rare = int(np.flatnonzero(counts == 1)[0])
        raise DatasetError(
            f"{where}: class {rare} has only 1 image, so it cannot appear in both the train and the test split. "
            "Add at least one more image of that class."
        )
    try:
        train, test = train_test_split(positions, test_size=test_fraction, stratify=labels, random_state=seed)
    except ValueError as exc:  # e.g. fewer test slots than classes
        raise DatasetError(
            f"{where}: cannot split {len(labels)} images of {len(present)} classes with test_fraction="
            f"{test_fraction} ({exc}). Use more images or a test_fraction that leaves at least one image per class "
            "in each split."
        ) from None
    return np.sort(train), np.sort(test)


def split_dataset(
    name: str,
    images: torch.Tensor,
    labels: np.ndarray,
    classes: tuple[str, ...],
    source: str,
    *,
    test_fraction: float,
    seed: int,
) -> DatasetSplits:
    """One pool of images -> stratified DatasetSplits."""
    train_idx, test_idx = stratified_split(labels, test_fraction=test_fraction, seed=seed, where=source)
    full = ImageDataset(name, images, torch.from_numpy(labels.astype(np.int64)), classes, source)
    return DatasetSplits(train=full.subset(train_idx), test=full.subset(test_idx))


def require_dir(path: Path | None, *, dataset: str, expected: str) -> Path:
    """The dataset folder, or a DatasetError saying what to pass and what it must contain."""
    if path is None:
        raise DatasetError(
            f"the {dataset} dataset needs a folder: pass --path DIR on the command line or set dataset.path in the "
            f"scenario. The folder must contain {expected}."
        )
    if not path.exists():
        raise DatasetError(f"{path}: no such folder. The {dataset} dataset expects a folder containing {expected}.")
    if not path.is_dir():
        raise DatasetError(
            f"{path}: is a file, not a folder. Point the {dataset} dataset at the folder containing {expected}."
        )
    return path
