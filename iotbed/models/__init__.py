"""Image classifiers for the testbed: architectures, deterministic training, safetensors storage,
a train-once model cache and FLOP counts for simulated device compute time."""

from __future__ import annotations

from iotbed.models.architectures import (
    ARCHITECTURES,
    ArchInfo,
    CifarCnn,
    GtsrbCnn,
    ImageClassifier,
    LeNet5,
    ModelSpec,
    Normalize,
    build_model,
    resolve_arch,
)
from iotbed.models.cache import (
    ENV_CACHE_DIR,
    TrainedModel,
    cache_key,
    get_or_train,
    resolve_cache_dir,
    spec_for_dataset,
)
from iotbed.models.defaults import default_train_config
from iotbed.models.flops import count_flops
from iotbed.models.store import load_model, model_from_bytes, model_to_bytes, save_model
from iotbed.models.training import (
    EpochStats,
    LabeledImages,
    TrainConfig,
    TrainReport,
    evaluate,
    predict,
    train_model,
)

__all__ = [
    "ARCHITECTURES",
    "ENV_CACHE_DIR",
    "ArchInfo",
    "CifarCnn",
    "EpochStats",
    "GtsrbCnn",
    "ImageClassifier",
    "LabeledImages",
    "LeNet5",
    "ModelSpec",
    "Normalize",
    "TrainConfig",
    "TrainReport",
    "TrainedModel",
    "build_model",
    "cache_key",
    "count_flops",
    "default_train_config",
    "evaluate",
    "get_or_train",
    "load_model",
    "model_from_bytes",
    "model_to_bytes",
    "predict",
    "resolve_arch",
    "resolve_cache_dir",
    "save_model",
    "spec_for_dataset",
    "train_model",
]
