"""Saving and loading models as safetensors (never pickles), to files or to bytes for MQTT updates.

A model file holds the state dict (weights plus the `Normalize` buffers) and string metadata: the
architecture and its constructor arguments, so `load_model` can rebuild the module, and a sha256 of
the tensors, so a damaged file is reported instead of silently loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from iotbed.errors import ModelError
from iotbed.models.architectures import ImageClassifier, ModelSpec, resolve_arch

SUFFIX = ".safetensors"
FORMAT = "iotbed-model"
FORMAT_VERSION = "1"
# Keys save_model writes itself; caller metadata may not override them.
_RESERVED = ("format", "format_version", "weights_sha256")
# safetensors headers are small; refuse absurd lengths before allocating.
_MAX_HEADER = 100 * 1024 * 1024


def _tensors(model: ImageClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _metadata_for(
    model: ImageClassifier, metadata: Mapping[str, str] | None, tensors: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    if not isinstance(model, ImageClassifier):
        raise ModelError(f"only models built by iotbed.models.build_model can be saved (got {type(model).__name__})")
    out = model.spec.to_metadata()
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ModelError(f"model metadata must map str to str (got {key!r}: {type(value).__name__})")
        if key in _RESERVED:
            raise ModelError(f"model metadata key {key!r} is reserved")
        if key in out and out[key] != value:
            raise ModelError(f"model metadata {key}={value!r} contradicts the model ({key}={out[key]!r})")
        out[key] = value
    out.update(format=FORMAT, format_version=FORMAT_VERSION, weights_sha256=_digest(tensors))
    return out


def _with_suffix(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.name.endswith(SUFFIX) else p.with_name(p.name + SUFFIX)


def save_model(path: str | os.PathLike[str], model: ImageClassifier, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `model` to `<path>.safetensors` atomically and return the path written.

    `metadata` adds string entries (e.g. "train_config": TrainConfig.to_json()); the architecture and
    its arguments are always recorded. A reader never sees a half-written file: the data goes to a
    temporary file in the same directory, is fsynced, then renamed over the target.
    """
    target = _with_suffix(path)
    tensors = _tensors(model)
    md = _metadata_for(model, metadata, tensors)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        safetensors.torch.save_file(tensors, tmp, metadata=md)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a model file is not a secret
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise ModelError(f"cannot write model file {target}: {exc}") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target


def model_to_bytes(model: ImageClassifier, metadata: Mapping[str, str] | None = None) -> bytes:
    """The same safetensors content `save_model` writes, as bytes (e.g. an MQTT payload)."""
    tensors = _tensors(model)
    return safetensors.torch.save(tensors, metadata=_metadata_for(model, metadata, tensors))


def _header_metadata(data: bytes, source: str) -> dict[str, str]:
    # safetensors layout: u64 little-endian header length, JSON header, raw tensor data.
    if len(data) < 8:
        raise ModelError(f"{source} is not a safetensors model ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ModelError(f"{source} is corrupt or not a safetensors model (header length {n})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # nesting past the JSON parser's depth
        raise ModelError(f"{source} is corrupt or not a safetensors model: bad header ({type(exc).__name__})") from None
    md = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(md) if isinstance(md, dict) else {}


def _build_from(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], source: str, arch: str | None
) -> ImageClassifier:
    if metadata.get("format") != FORMAT:
        raise ModelError(f"{source} is a safetensors file but not an iotbed model (no format={FORMAT!r} metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{source} has model format version {metadata.get('format_version')!r}; "
            f"this iotbed reads version {FORMAT_VERSION}"
        )
    expected = metadata.get("weights_sha256")
    if expected is not None and _digest(tensors) != expected:
        raise ModelError(f"{source} is corrupt: its weights do not match the checksum stored with them")
    spec = ModelSpec.from_metadata(metadata, source=source)
    if arch is not None and resolve_arch(arch) != spec.arch:
        raise ModelError(f"{source} holds a {spec.arch!r} model, not the {resolve_arch(arch)!r} asked for")
    model = spec.build()
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own)
        if k in tensors and tensors[k].shape != own[k].shape
    ]
    # load_state_dict would silently cast an int or float64 tensor into a float32 parameter: refuse it instead
    retyped = [
        f"{k}: file {tensors[k].dtype} vs model {own[k].dtype}"
        for k in sorted(own)
        if k in tensors and tensors[k].dtype != own[k].dtype
    ]
    if missing or unexpected or mismatched or retyped:
        details = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(unexpected)}" if unexpected else "",
                f"shape mismatch {', '.join(mismatched)}" if mismatched else "",
                f"dtype mismatch {', '.join(retyped)}" if retyped else "",
            )
            if part
        )
        raise ModelError(f"{source} does not fit the {spec.arch} architecture it names ({spec}): {details}")
    model.load_state_dict(dict(tensors), strict=True)
    return model.eval()


def _from_bytes(data: bytes, source: str, arch: str | None) -> tuple[ImageClassifier, dict[str, str]]:
    metadata = _header_metadata(data, source)
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{source} is corrupt or not a safetensors model: {exc}") from None
    return _build_from(tensors, metadata, source, arch), metadata


def model_from_bytes(data: bytes, *, arch: str | None = None) -> tuple[ImageClassifier, dict[str, str]]:
    """Inverse of `model_to_bytes`: the rebuilt model (eval mode) and its metadata."""
    return _from_bytes(data, "model payload", arch)


def load_model(path: str | os.PathLike[str], *, arch: str | None = None) -> tuple[ImageClassifier, dict[str, str]]:
    """Rebuild a model saved by `save_model`; returns it in eval mode with its metadata.

    `path` may omit the `.safetensors` suffix. With `arch`, a file holding another architecture is
    refused. A missing, truncated or tampered file raises ModelError.
    """
    p = Path(path)
    if not p.exists() and _with_suffix(p).exists():
        p = _with_suffix(p)
    source = f"model file {p}"
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"no model file at {p}") from None
    except OSError as exc:
        raise ModelError(f"cannot read {source}: {exc}") from None
    return _from_bytes(data, source, arch)
