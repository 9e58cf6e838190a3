"""scikit-learn's embedded handwritten digits, upscaled to a camera-like frame.

The default dataset: it ships inside scikit-learn, so scenarios and tests run with no download and no path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from iotbed.data.dataset import DatasetSplits, check_image_size, resize_images, split_dataset
from iotbed.errors import DatasetError

NAME = "digits"
DEFAULT_SIZE = 32
CLASSES = tuple(str(d) for d in range(10))
# load_digits stores 4x4-block counts of set pixels, so 16 is full intensity.
_MAX_VALUE = 16.0


def load(path: Path | None, *, seed: int, image_size: int | None, test_fraction: float) -> DatasetSplits:
    if path is not None:
        raise DatasetError(
            f"the digits dataset is embedded in scikit-learn and takes no path, but got {path}. "
            "Remove --path / dataset.path, or pick a dataset that reads files (e.g. mnist, gtsrb, cifar10, folder)."
        )
    size = check_image_size(image_size, DEFAULT_SIZE)
    bunch = load_digits()
    # 8x8 is far smaller than any camera frame; upscaling gives the models and attacks a realistic input size.
    small = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / _MAX_VALUE).unsqueeze(1)
    images = resize_images(small.clamp_(0.0, 1.0), size).contiguous()
    labels = np.asarray(bunch.target, dtype=np.int64)
    return split_dataset(NAME, images, labels, CLASSES, "sklearn", test_fraction=test_fraction, seed=seed)
