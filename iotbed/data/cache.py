"""A small on-disk cache of decoded uint8 arrays, for datasets that are slow to decode (GTSRB).

Stored as `.npz` and read with allow_pickle=False: a cache file is then plain array data, so a tampered
cache directory cannot execute code. Writes go to a temporary file renamed into place, so an interrupted
run never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import platformdirs

CACHE_ENV = "IOTBED_CACHE_DIR"


def cache_dir() -> Path:
    """Where decoded datasets are kept: $IOTBED_CACHE_DIR, else the platform's user cache dir."""
    override = os.environ.get(CACHE_ENV)
    base = Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("iotbed"))
    return base / "datasets"


def load_arrays(path: Path, expected: frozenset[str]) -> dict[str, np.ndarray] | None:
    """The arrays in a cache entry, or None when it is absent or unreadable (the caller then rebuilds it)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            if set(archive.files) != expected:
                return None
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a cache entry atomically; a cache that cannot be written is a warning, not a failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(
            f"could not write the dataset cache {path} ({exc.strerror or exc}); the next load will decode again. "
            f"Set {CACHE_ENV} to a writable folder to enable caching.",
            stacklevel=3,
        )
