"""Train once, reuse everywhere: a content-addressed on-disk cache of trained models.

The key is a sha256 over everything that determines the weights: the training set's fingerprint,
the architecture and its constructor arguments, the full TrainConfig (which holds the seed) and a
format version. Files live in `<cache dir>/models/<key>.safetensors` with a `<key>.json` beside it
(test accuracy per test set, wall time, per-epoch loss, config) for people and reports. Both are
written by atomic rename, so processes racing on the same key at worst train twice; neither ever
reads a half-written file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch

from iotbed.errors import ModelError
from iotbed.models import training
from iotbed.models.architectures import ImageClassifier, ModelSpec, resolve_arch
from iotbed.models.defaults import default_train_config
from iotbed.models.store import load_model, save_model
from iotbed.models.training import LabeledImages, TrainConfig, TrainReport

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "IOTBED_CACHE_DIR"
# Bump when a change (to training, architectures or file layout) makes old cache entries wrong.
CACHE_FORMAT_VERSION = 2  # 2: gtsrb_cnn dropout 0.5 -> 0.25


@dataclass(frozen=True)
class TrainedModel:
    model: ImageClassifier  # in eval mode
    arch: str
    key: str
    path: Path
    test_accuracy: float | None  # None when no test set was given
    trained_now: bool  # False when the weights came from the cache
    train_report: TrainReport | None  # None when the weights came from the cache


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir` if given, else $IOTBED_CACHE_DIR, else the platform's user cache dir for iotbed."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("iotbed"))


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # float64 then rounded: the values enter the cache key, so keep them stable to the last digit
    # shown. A constant channel gets std 1 rather than a division by zero.
    means, stds = [], []
    for c in range(images.shape[1]):
        channel = images[:, c].double()
        m = round(float(channel.mean()), 6)
        s = round(float(channel.std()), 6)
        means.append(m)
        stds.append(s if s > 1e-6 else 1.0)
    return tuple(means), tuple(stds)


def spec_for_dataset(arch: str, ds: LabeledImages) -> ModelSpec:
    """Constructor arguments for `arch` fitted to `ds`: its shape, classes and per-channel mean/std."""
    images = ds.images
    if images.ndim != 4 or images.shape[0] == 0:
        raise ModelError(f"training images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    _, c, h, w = images.shape
    if h != w:
        raise ModelError(f"the architectures take square images; this dataset has {h}x{w}, resize it first")
    # ImageDataset knows its class list; a bare protocol object falls back to the largest label.
    num_classes = getattr(ds, "num_classes", None)
    if not isinstance(num_classes, int):
        num_classes = int(ds.labels.max()) + 1
    mean, std = _channel_stats(images)
    return ModelSpec(arch=resolve_arch(arch), in_channels=c, num_classes=num_classes, image_size=h, mean=mean, std=std)


def cache_key(spec: ModelSpec, dataset_fingerprint: str, config: TrainConfig) -> str:
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": dataset_fingerprint,
        "arch": spec.arch,
        "model_args": {
            "in_channels": spec.in_channels,
            "num_classes": spec.num_classes,
            "image_size": spec.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "train_config": config.to_json(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict[str, Any]:
    # The JSON is a side note; if it is missing or damaged, start a fresh one.
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cache_folder(cache_dir: str | os.PathLike[str] | None, name: str) -> Path:
    """The cache's `name` folder, made if missing."""
    folder = resolve_cache_dir(cache_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the cache directory {folder}: {exc}; set {ENV_CACHE_DIR}") from exc
    return folder


def load_cached(path: Path, arch: str, key: str) -> ImageClassifier | None:
    """The model cached at `path` under `key`, or None where there is none or it is unusable (a warning: the
    caller trains it again and overwrites it)."""
    if not path.exists():
        return None
    try:
        model, metadata = load_model(path, arch=arch)
        if metadata.get("cache_key") != key:
            raise ModelError(f"it records cache key {metadata.get('cache_key')!r}")
    except ModelError as exc:
        log.warning("cached model %s is unusable (%s); retraining it", path, exc)
        return None
    return model


def get_or_train(
    arch: str,
    train_ds: LabeledImages,
    config: TrainConfig | None = None,
    *,
    test_ds: LabeledImages | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TrainedModel:
    """The model of `arch` trained on `train_ds` with `config`, from the cache or trained now and cached.

    `config=None` uses `default_train_config(arch, train_ds.name)`. With `test_ds`, its accuracy is
    measured (or read from the JSON when this exact test set was measured before). A cache file
    that fails to load is logged as a warning, retrained and overwritten.
    """
    arch = resolve_arch(arch)
    if config is None:
        config = default_train_config(arch, str(getattr(train_ds, "name", "")))
    spec = spec_for_dataset(arch, train_ds)
    fingerprint = train_ds.fingerprint()
    key = cache_key(spec, fingerprint, config)
    models_dir = cache_folder(cache_dir, "models")
    path = models_dir / f"{key}.safetensors"
    info_path = models_dir / f"{key}.json"

    model = load_cached(path, arch, key)

    report: TrainReport | None = None
    info = read_json(info_path)
    if model is None:
        model = spec.build()
        report = training.train_model(model, train_ds, config, progress=progress)
        save_model(
            path,
            model,
            {"cache_key": key, "dataset_fingerprint": fingerprint, "train_config": config.to_json()},
        )
        info = {
            "key": key,
            "arch": arch,
            "model_args": asdict(spec),
            "dataset": str(getattr(train_ds, "name", "")),
            "dataset_fingerprint": fingerprint,
            "train_config": config.to_dict(),
            "train_wall_time_s": report.wall_time_s,
            "train_epochs": report.to_dict()["epochs"],
            "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        }
        info_dirty = True
    else:
        info_dirty = False

    test_accuracy: float | None = None
    if test_ds is not None:
        test_fp = test_ds.fingerprint()
        # Accuracy per test-set fingerprint (a model may be scored on several test sets); the
        # top-level "test_accuracy" is the latest one, for listings such as `iotbed models list`.
        stored = info.get("test_accuracies")
        if not isinstance(stored, dict):
            stored = info["test_accuracies"] = {}
        if report is None and test_fp in stored:
            with contextlib.suppress(TypeError, ValueError):
                test_accuracy = float(stored[test_fp])
        if test_accuracy is None:
            test_accuracy = training.evaluate(model, test_ds)
            stored[test_fp] = test_accuracy
            info_dirty = True
        if info.get("test_accuracy") != test_accuracy:
            info["test_accuracy"] = test_accuracy
            info_dirty = True
    if info_dirty:
        try:
            write_json_atomic(info_path, info)
        except OSError as exc:
            log.warning("could not write %s: %s", info_path, exc)

    return TrainedModel(
        model=model.eval(),
        arch=arch,
        key=key,
        path=path,
        test_accuracy=test_accuracy,
        trained_now=report is not None,
        train_report=report,
    )
