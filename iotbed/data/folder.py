"""A user's own images: one sub-folder per class, `root/<class>/*.png|jpg|jpeg|ppm|bmp`.

The way to run a scenario on data the testbed does not know: class names are the folder names (sorted, so
label numbers are stable), and a stratified seeded split provides the test set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from iotbed.data.dataset import (
    DatasetSplits,
    check_image_size,
    images_from_uint8,
    require_dir,
    split_dataset,
)
from iotbed.errors import DatasetError

NAME = "folder"
DEFAULT_SIZE = 32
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".ppm", ".bmp"})
LAYOUT = "one sub-folder per class, each holding that class's images (root/<class>/*.png|jpg|jpeg|ppm|bmp)"
# Modes whose pixels carry no colour; a folder of only these becomes 1-channel.
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"})


def scan(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Class names and (image, label) pairs, checking each class folder holds images."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        found = f"only the class folder {class_dirs[0].name!r}" if class_dirs else "no class folders"
        raise DatasetError(
            f"{root}: {found}; the folder dataset needs at least two classes, as {LAYOUT}. Add a sub-folder per class."
        )
    items: list[tuple[Path, int]] = []
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if len(files) < 2:
            raise DatasetError(
                f"{folder}: class folder holds {len(files)} image(s) ({', '.join(sorted(EXTENSIONS))}); each class "
                "needs at least 2 so it can appear in both the train and test split. Add images or remove the folder."
            )
        items.extend((path, label) for path in files)
    return tuple(p.name for p in class_dirs), items


def _decode(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """(size, size, 3) uint8 RGB pixels, and whether the image was grey to begin with."""
    try:
        with Image.open(path) as image:
            grey = image.mode in _GREY_MODES
            # 16-bit and float grey do not convert cleanly to RGB; go through 8-bit L first.
            rgb = (image.convert("L") if grey and image.mode != "L" else image).convert("RGB")
            return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8), grey
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc}). Replace or remove the file.") from None


def load(path: Path | None, *, seed: int, image_size: int | None, test_fraction: float) -> DatasetSplits:
    root = require_dir(path, dataset=NAME, expected=LAYOUT)
    size = check_image_size(image_size, DEFAULT_SIZE)
    classes, items = scan(root)
    pixels = np.empty((len(items), size, size, 3), dtype=np.uint8)
    all_grey = True
    for i, (image_path, _) in enumerate(
        tqdm(items, desc=f"decoding {root.name}", unit="img", file=sys.stderr, leave=False)
    ):
        pixels[i], grey = _decode(image_path, size)
        all_grey &= grey
    # Grey images became RGB by copying L into all three channels, so channel 0 is the grey image exactly.
    array = pixels[..., 0] if all_grey else pixels
    images = images_from_uint8(array, channels_last=True)
    labels = np.array([label for _, label in items], dtype=np.int64)
    return split_dataset(NAME, images, labels, classes, str(root), test_fraction=test_fraction, seed=seed)
