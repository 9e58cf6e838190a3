"""Default training configurations per architecture and dataset, tuned for a 2-core CPU.

Measured on 2 Xeon cores at 2.5 GHz, torch 2.13 CPU (test accuracy, training wall time):

PLACEHOLDER
"""

from __future__ import annotations

from iotbed.models.architectures import resolve_arch
from iotbed.models.training import TrainConfig


def default_train_config(arch: str, dataset_name: str = "") -> TrainConfig:
    """The tuned config for `arch` on the dataset family named by `dataset_name` (matched by
    substring: "digits", "mnist", "gtsrb", "cifar"), else the architecture's general default."""
    name = resolve_arch(arch)
    ds = dataset_name.lower()
    if name == "lenet5":
        if "digits" in ds:
            return TrainConfig(epochs=20, batch_size=32, lr=2e-3, lr_schedule="cosine")
        return TrainConfig(epochs=10, batch_size=64, lr=2e-3, lr_schedule="cosine", augmentation="shift")
    if name == "gtsrb_cnn":
        return TrainConfig(epochs=8, batch_size=64, lr=1e-3, weight_decay=1e-4, lr_schedule="cosine", augmentation="shift")
    # cifar_cnn
    return TrainConfig(epochs=15, batch_size=64, lr=1e-3, weight_decay=5e-4, lr_schedule="cosine", augmentation="shift")
