"""Shared test set-up: a model cache inside the checkout, so tests neither read nor fill the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SCENARIOS = REPO / "scenarios"

os.environ.setdefault("IOTBED_CACHE_DIR", str(REPO / ".cache" / "iotbed-tests"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"the shared datasets are not at {SHARED_DATASETS}")
    return SHARED_DATASETS
