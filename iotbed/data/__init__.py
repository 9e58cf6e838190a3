"""Image datasets for the testbed: loaders for embedded and on-disk datasets, all returning the same types.

    from iotbed.data import load_splits
    splits = load_splits("gtsrb", "/data/gtsrb", image_size=32)
    splits.train.images  # float32 (N, 3, 32, 32) in [0, 1]

Every problem a user can fix (missing files, wrong format, unknown name) raises `iotbed.errors.DatasetError`.
"""

from __future__ import annotations

from iotbed.data.dataset import DatasetSplits, ImageDataset
from iotbed.data.registry import DatasetInfo, describe, list_datasets, load_splits

__all__ = ["DatasetInfo", "DatasetSplits", "ImageDataset", "describe", "list_datasets", "load_splits"]
