"""Shared test set-up: a model cache inside the checkout, so tests neither read nor fill the user's cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotbed.models import TrainConfig

# The broker fixtures (each test that names one gets its own Mosquitto on a free port).
pytest_plugins = ["mosquitto_fixtures"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SCENARIOS = REPO / "scenarios"

os.environ.setdefault("IOTBED_CACHE_DIR", str(REPO / ".cache" / "iotbed-tests"))

# The digits BadNet the backdoor test modules share (by value, so all of them read one model-cache entry):
# training short enough for a test, long enough for ~97% clean accuracy; target class and poisoning ratio.
FAST = TrainConfig(epochs=12, batch_size=64, lr=3e-3, lr_schedule="cosine")
TARGET = 0
RATIO = 0.15


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"the shared datasets are not at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module of many small tensor ops: on two shared cores a second intra-op
    thread mostly waits (small-batch training ran several times faster). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
