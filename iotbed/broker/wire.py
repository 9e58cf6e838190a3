"""Payload bytes for a real broker: frames and model updates, encoded and strictly decoded.

In simulation a payload is an object that only knows its size; over a real broker it must become bytes and
come back. The formats are those `iotbed.nodes.payloads` sizes:

* Frame: `FRAME_HEADER` (magic "IB", format version 1, codec, C, H, W, frame id, camera index,
  capture time, image index, label), then for codec 0 (raw) C*H*W uint8 pixels, for codec 1 (pixel drop)
  the bytes of `iotbed.codecs.pixel_drop.encode` (its header, the mask as bitmap or seed, the kept pixels).
  Decoded frames carry `pixels` as a float32 array in [0, 1] of shape (C, H, W), the convention the
  models use, and a pixel-dropped one its `mask` (dropped pixels read 0).
* ModelUpdate: a 4-byte big-endian version, a 2-byte metadata length M (0: unsigned), M bytes of signed
  metadata (`iotbed.trust.documents`), then a safetensors file (absent in a metadata-only renewal).
* Quarantine (on `models/quarantine`): `QUARANTINE_HEADER` (magic "IQ", format version 2, model version,
  flagged count K, clean count M, C, H, W, the gateway name's length), the gateway's name in UTF-8, then
  K*C*H*W uint8 pixels of the flagged frames, M*C*H*W of the gateway's clean images (D_valid, sent only in
  CoDefend's own flow) and their M labels as big-endian uint16; a signed notice ends with the gateway's
  8-byte key id and a 64-byte Ed25519 signature of everything before them.
* SignedTrustList (on `models/trust`): the root-signed JSON document, at most
  `iotbed.trust.documents.MAX_TRUST_LIST_BYTES`.

Anything else on a topic (a will, a status line) stays `bytes`. Received data is untrusted: an attacker can
publish anything on a topic it may write. `decode` checks lengths, the header and the safetensors index
before building an object, and raises `MalformedPayload` (with a short `reason`) for data that is
truncated, oversized, of the wrong format or inconsistent; a subscriber counts it and skips the message.
Every size a payload declares is bounded before anything is allocated: a frame's shape by `MAX_FRAME_DIM`
(and, given the scenario's `frame_shape`, must be that shape), a pixel-drop body's own header by the frame
header's shape, by its exact length and by a pixel budget (the decoded frame is never larger than a raw
frame of `max_frame_bytes`, nor than `pixel_drop.MAX_DECODE_PIXELS`); no other exception escapes `decode`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from iotbed.codecs import pixel_drop
from iotbed.nodes.payloads import (
    CODEC_PIXEL_DROP,
    CODEC_RAW,
    FRAME_HEADER,
    FRAME_MAGIC,
    QUARANTINE_HEADER,
    QUARANTINE_LABEL_BYTES,
    QUARANTINE_MAGIC,
    QUARANTINE_TOPIC,
    TRUST_TOPIC,
    EncryptedFrame,
    EncryptedResult,
    EncryptedRound,
    Frame,
    ModelUpdate,
    Quarantine,
    SignedTrustList,
    context_topic,
    replies_topic,
    results_topic,
    rounds_topic,
)
from iotbed.privacy import wire as encrypted_wire
from iotbed.privacy.ckks import PublicContext
from iotbed.trust.documents import MAX_METADATA_BYTES, MAX_TRUST_LIST_BYTES
from iotbed.trust.keys import KEY_ID_BYTES, SIGNATURE_BYTES

FRAME_FORMAT_VERSION = 1
QUARANTINE_FORMAT_VERSION = 2
MODEL_VERSION = struct.Struct("!IH")  # version, metadata length
QUARANTINE_SIGNATURE_BYTES = KEY_ID_BYTES + SIGNATURE_BYTES
SAFETENSORS_HEADER_LEN = struct.Struct("<Q")

FRAMES_ROOT = "frames"
ESCALATIONS_ROOT = "escalations"  # frames an edge server sends on to a cloud (`iotbed.nodes.cloud`)
MODELS_ROOT = "models"

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024  # 16 MiB: a 3x2048x2048 raw frame is 12 MiB
DEFAULT_MAX_MODEL_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_QUARANTINE_BYTES = 64 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024
MAX_FRAME_DIM = 8192
FRAME_BYTES_MARGIN = 64  # slack on top of the largest encoding of the scenario's frame shape

_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

PixelsFor = Callable[[Frame], np.ndarray]


class MalformedPayload(ValueError):
    """Received bytes that are not a valid payload for their topic. `reason` is a short key for counters:
    truncated, oversized, bad_magic, bad_version, bad_codec, bad_shape, bad_length, bad_header, bad_model."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _pixels_u8(frame: Frame, pixels_for: PixelsFor | None) -> np.ndarray:
    if frame.pixels is not None:
        # Pixels a node changed (an attack, a defense) are float in [0, 1]: back to 8 bits, as a camera sends.
        pixels = np.asarray(frame.pixels)
        if pixels.dtype != np.uint8:
            pixels = np.clip(np.rint(np.asarray(pixels, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    elif pixels_for is not None:
        pixels = np.asarray(pixels_for(frame))
        if pixels.dtype != np.uint8:
            raise TypeError(f"pixels_for must return uint8 (C, H, W), got {pixels.dtype}")
    else:
        raise ValueError(f"frame {frame.frame_id} has no pixels; pass pixels_for to encode it")
    if tuple(pixels.shape) != tuple(frame.shape):
        raise ValueError(f"frame {frame.frame_id}: pixels of shape {pixels.shape}, expected {frame.shape} (C, H, W)")
    return pixels


def encode_frame(frame: Frame, pixels_for: PixelsFor | None = None) -> bytes:
    c, h, w = frame.shape
    codec = CODEC_RAW if frame.drop is None else CODEC_PIXEL_DROP
    header = FRAME_HEADER.pack(
        FRAME_MAGIC,
        FRAME_FORMAT_VERSION,
        codec,
        c,
        h,
        w,
        frame.frame_id,
        frame.camera_index,
        frame.captured_at,
        frame.image_index,
        frame.label,
    )
    pixels = _pixels_u8(frame, pixels_for)
    if frame.drop is None:
        return header + np.ascontiguousarray(pixels).tobytes()
    drop = frame.drop
    return header + pixel_drop.encode(
        pixels,
        frame.drop_mask(),
        ws=drop.ws,
        rate=drop.rate,
        mask_format=drop.mask_format,
        seed=frame.mask_seed if frame.mask_seed >= 0 else None,  # a decoded bitmap frame has its mask, no seed
    )


def encode_model_update(update: ModelUpdate) -> bytes:
    if len(update.metadata) > MAX_METADATA_BYTES:
        raise ValueError(f"update metadata of {len(update.metadata)} bytes is over {MAX_METADATA_BYTES}")
    return MODEL_VERSION.pack(update.version, len(update.metadata)) + bytes(update.metadata) + bytes(update.blob)


def encode_quarantine(notice: Quarantine) -> bytes:
    if bool(notice.key) != bool(notice.signature) or len(notice.key) + len(notice.signature) not in (
        0,
        QUARANTINE_SIGNATURE_BYTES,
    ):
        raise ValueError("a signed quarantine notice needs an 8-byte key id and a 64-byte signature")
    return quarantine_body(notice) + notice.key + notice.signature


def _pixels(images: Any) -> bytes:
    return np.clip(np.rint(images.detach().cpu().numpy().astype(np.float32) * 255.0), 0, 255).astype(np.uint8).tobytes()


def quarantine_body(notice: Quarantine) -> bytes:
    """A notice's bytes without its key id and signature: what a gateway signs."""
    if notice.flagged.ndim != 4:
        raise ValueError(f"flagged frames must be (K, C, H, W), got shape {tuple(notice.flagged.shape)}")
    k, c, h, w = (int(v) for v in notice.flagged.shape)
    m = notice.valid_count
    if m and (notice.valid is None or tuple(notice.valid.shape[1:]) != (c, h, w) or notice.valid_labels is None):
        raise ValueError("D_valid must be (M, C, H, W) images like the flagged frames, with M labels")
    if m and (
        len(notice.valid_labels) != m or int(notice.valid_labels.min()) < 0 or int(notice.valid_labels.max()) > 0xFFFF
    ):  # type: ignore[arg-type, union-attr]
        raise ValueError("D_valid needs one label in [0, 65535] per image")
    name = notice.gateway.encode("utf-8")
    if len(name) > 255:
        raise ValueError(f"gateway name {notice.gateway!r} is over 255 bytes")
    header = QUARANTINE_HEADER.pack(
        QUARANTINE_MAGIC, QUARANTINE_FORMAT_VERSION, notice.version, k, m, c, h, w, len(name)
    )
    body = header + name + _pixels(notice.flagged)
    if m:
        labels = notice.valid_labels.detach().cpu().numpy().astype(">u2")  # type: ignore[union-attr]
        body += _pixels(notice.valid) + labels.tobytes()
    return body


def encode(payload: Any, pixels_for: PixelsFor | None = None) -> bytes:
    """The bytes to publish for `payload` (a Frame, a ModelUpdate, a Quarantine, bytes or str)."""
    if isinstance(payload, Frame):
        return encode_frame(payload, pixels_for)
    if isinstance(payload, ModelUpdate):
        return encode_model_update(payload)
    if isinstance(payload, Quarantine):
        return encode_quarantine(payload)
    if isinstance(payload, SignedTrustList):
        return bytes(payload.data)
    if isinstance(payload, EncryptedFrame):
        return encrypted_wire.encode_frame(payload)
    if isinstance(payload, EncryptedResult):
        return encrypted_wire.encode_result(payload)
    if isinstance(payload, EncryptedRound):
        return encrypted_wire.encode_round(payload)
    if isinstance(payload, PublicContext):
        return payload.to_bytes()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    raise TypeError(f"cannot put a {type(payload).__name__} on the wire; expected Frame, ModelUpdate, bytes or str")


def max_frame_bytes_for(shape: tuple[int, int, int]) -> int:
    """The largest frame of `shape` (C, H, W) `encode_frame` can write, plus `FRAME_BYTES_MARGIN`: a raw frame,
    or a pixel-drop one with a bitmap mask that drops nothing (the frame header, the codec's header, the
    bitmap, every pixel)."""
    c, h, w = _check_frame_shape(shape)
    dropped = FRAME_HEADER.size + pixel_drop.HEADER.size + max(-(-h * w // 8), pixel_drop.SEED.size) + c * h * w
    return max(FRAME_HEADER.size + c * h * w, dropped) + FRAME_BYTES_MARGIN


def _check_frame_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    c, h, w = (int(x) for x in shape)
    if not (1 <= c <= 4 and 1 <= h <= MAX_FRAME_DIM and 1 <= w <= MAX_FRAME_DIM):
        raise ValueError(f"frame_shape must be (C, H, W) with 1 <= C <= 4, 1 <= H, W <= {MAX_FRAME_DIM}, got {shape}")
    return c, h, w


def decode_frame(
    data: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES, frame_shape: tuple[int, int, int] | None = None
) -> Frame:
    """A Frame from `encode_frame`'s bytes; `MalformedPayload` for anything else. With `frame_shape` (the
    scenario's (C, H, W)), a frame of any other shape is refused (`bad_shape`)."""
    n = len(data)
    if n > max_bytes:
        raise MalformedPayload("oversized", f"{n} bytes is over the {max_bytes}-byte limit for a frame")
    if n < FRAME_HEADER.size:
        raise MalformedPayload("truncated", f"{n} bytes is shorter than the {FRAME_HEADER.size}-byte frame header")
    magic, version, codec, c, h, w, frame_id, camera, captured_at, image_index, label = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise MalformedPayload("bad_magic", f"frame magic {magic!r}, expected {FRAME_MAGIC!r}")
    if version != FRAME_FORMAT_VERSION:
        raise MalformedPayload("bad_version", f"frame format version {version}, expected {FRAME_FORMAT_VERSION}")
    if codec not in (CODEC_RAW, CODEC_PIXEL_DROP):
        raise MalformedPayload("bad_codec", f"frame codec {codec}, this decoder reads raw (0) and pixel drop (1)")
    if not (1 <= c <= 4 and 1 <= h <= MAX_FRAME_DIM and 1 <= w <= MAX_FRAME_DIM):
        raise MalformedPayload("bad_shape", f"frame shape {(c, h, w)} is out of range")
    if frame_shape is not None and (c, h, w) != tuple(frame_shape):
        raise MalformedPayload("bad_shape", f"frame shape {(c, h, w)}, this run's frames are {tuple(frame_shape)}")
    if not np.isfinite(captured_at):
        raise MalformedPayload("bad_header", f"capture time {captured_at} is not finite")
    if codec == CODEC_PIXEL_DROP:
        # The decoded frame may not hold more pixels than a raw frame of max_bytes (or the scenario's frame).
        budget = c * h * w if frame_shape is not None else min(max_bytes, pixel_drop.MAX_DECODE_PIXELS)
        return _decode_dropped(data, (c, h, w), budget, frame_id, camera, captured_at, image_index, label)
    expected = FRAME_HEADER.size + c * h * w
    if n != expected:
        raise MalformedPayload("bad_length", f"{n} bytes for a {c}x{h}x{w} frame, expected {expected}")
    pixels_u8 = np.frombuffer(data, dtype=np.uint8, count=c * h * w, offset=FRAME_HEADER.size).reshape(c, h, w)
    pixels = pixels_u8.astype(np.float32) * np.float32(1.0 / 255.0)
    return Frame(frame_id, camera, captured_at, image_index, label, (c, h, w), n, pixels)


def _decode_dropped(
    data: bytes,
    shape: tuple[int, int, int],
    max_pixels: int,
    frame_id: int,
    camera: int,
    captured_at: float,
    image_index: int,
    label: int,
) -> Frame:
    body = bytes(data[FRAME_HEADER.size :])
    if len(body) < pixel_drop.HEADER.size:
        raise MalformedPayload("truncated", f"pixel-drop body of {len(body)} bytes is shorter than its header")
    body_shape = tuple(pixel_drop.HEADER.unpack_from(body)[3:6])
    if body_shape != shape:  # checked before the codec builds anything
        raise MalformedPayload("bad_shape", f"pixel-drop body of shape {body_shape}, the header says {shape}")
    try:
        # The codec checks its own header (window, rate, mask format) and the exact length before allocating.
        pixels_u8, mask = pixel_drop.decode(body, shape=shape, max_pixels=max_pixels)
        _, _, code, _, _, _, ws, rate = pixel_drop.HEADER.unpack_from(body)
        drop = pixel_drop.PixelDropCodec(ws, rate, "seed" if code == 1 else "bitmap")
        # a seed-format frame keeps its seed, so a node that changes its pixels can send it on as it came
        seed = pixel_drop.SEED.unpack_from(body, pixel_drop.HEADER.size)[0] if code == 1 else -1
    except pixel_drop.PixelDropFormatError as exc:
        raise MalformedPayload("bad_codec", f"pixel-drop body: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever else the codec raises on hostile input, never past here
        raise MalformedPayload("bad_codec", f"pixel-drop body: {type(exc).__name__}: {exc}") from None
    if pixels_u8.shape != shape:
        raise MalformedPayload("bad_shape", f"pixel-drop body of shape {pixels_u8.shape}, the header says {shape}")
    pixels = pixels_u8.astype(np.float32) * np.float32(1.0 / 255.0)
    return Frame(
        frame_id,
        camera,
        captured_at,
        image_index,
        label,
        shape,
        len(data),
        pixels,
        drop=drop,
        mask_seed=seed,
        mask=mask,
    )


def check_safetensors(blob: bytes) -> dict[str, Any]:
    """Validate a safetensors file's index against its length without reading any tensor; returns the index."""
    n = len(blob)
    if n < SAFETENSORS_HEADER_LEN.size:
        raise MalformedPayload("bad_model", "safetensors blob shorter than its 8-byte header length")
    (header_len,) = SAFETENSORS_HEADER_LEN.unpack_from(blob)
    if header_len > MAX_SAFETENSORS_HEADER or SAFETENSORS_HEADER_LEN.size + header_len > n:
        raise MalformedPayload("bad_model", f"safetensors header length {header_len} does not fit {n} bytes")
    try:
        index = json.loads(blob[SAFETENSORS_HEADER_LEN.size : SAFETENSORS_HEADER_LEN.size + header_len])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # deep nesting: RecursionError
        raise MalformedPayload("bad_model", f"safetensors header is not JSON: {exc}") from None
    if not isinstance(index, dict):
        raise MalformedPayload("bad_model", "safetensors header is not a JSON object")
    data_len = n - SAFETENSORS_HEADER_LEN.size - header_len
    for name, info in index.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = 1
            for dim in shape:
                if not isinstance(dim, int) or dim < 0:
                    raise ValueError
                count *= dim
            itemsize = _SAFETENSORS_DTYPE_BYTES[dtype]
            ok = isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len
        except (KeyError, TypeError, ValueError):
            raise MalformedPayload("bad_model", f"safetensors entry {name!r} is malformed") from None
        if not ok or end - start != count * itemsize:
            raise MalformedPayload("bad_model", f"safetensors tensor {name!r} does not fit its offsets")
    return index


def check_model_blob(blob: bytes) -> None:
    """`MalformedPayload` ("bad_model") unless `blob` loads as an iotbed model: its metadata names an
    architecture and every tensor has that architecture's names, shapes and dtypes and the stored checksum
    (`iotbed.models.model_from_bytes`, which raises `ModelError` otherwise)."""
    from iotbed.models import model_from_bytes

    try:
        model_from_bytes(blob)
    except Exception as exc:  # noqa: BLE001 - ModelError, or whatever else hostile bytes make the loader raise
        raise MalformedPayload("bad_model", f"{type(exc).__name__}: {exc}") from None


def decode_model_update(
    data: bytes, max_bytes: int = DEFAULT_MAX_MODEL_BYTES, check_model: bool = False
) -> ModelUpdate:
    """A ModelUpdate; with `check_model`, only one whose blob loads as an iotbed model (`check_model_blob`),
    so that a node's loader never meets one it refuses."""
    n = len(data)
    if n > max_bytes:
        raise MalformedPayload("oversized", f"{n} bytes is over the {max_bytes}-byte limit for a model update")
    if n < MODEL_VERSION.size:
        raise MalformedPayload("truncated", f"{n} bytes is too short for a model update")
    version, meta_len = MODEL_VERSION.unpack_from(data)
    if meta_len > MAX_METADATA_BYTES:
        raise MalformedPayload("bad_header", f"{meta_len} bytes of metadata is over {MAX_METADATA_BYTES}")
    if n < MODEL_VERSION.size + meta_len:
        raise MalformedPayload("truncated", f"{n} bytes cannot hold {meta_len} bytes of metadata")
    metadata = bytes(data[MODEL_VERSION.size : MODEL_VERSION.size + meta_len])
    blob = bytes(data[MODEL_VERSION.size + meta_len :])
    if not blob and not metadata:
        raise MalformedPayload("truncated", "a model update with neither metadata nor a model")
    if blob:
        if len(blob) < SAFETENSORS_HEADER_LEN.size:
            raise MalformedPayload("truncated", f"{len(blob)} bytes is too short for a safetensors file")
        check_safetensors(blob)
        if check_model:
            check_model_blob(blob)
    return ModelUpdate(version, blob, metadata)


def decode_quarantine(data: bytes, max_bytes: int = DEFAULT_MAX_QUARANTINE_BYTES) -> Quarantine:
    import torch

    n = len(data)
    if n > max_bytes:
        raise MalformedPayload("oversized", f"{n} bytes is over the {max_bytes}-byte limit for a quarantine notice")
    if n < QUARANTINE_HEADER.size:
        raise MalformedPayload("truncated", f"{n} bytes is shorter than the quarantine header")
    magic, version, model_version, k, m, c, h, w, name_len = QUARANTINE_HEADER.unpack_from(data)
    if magic != QUARANTINE_MAGIC:
        raise MalformedPayload("bad_magic", f"quarantine magic {magic!r}, expected {QUARANTINE_MAGIC!r}")
    if version != QUARANTINE_FORMAT_VERSION:
        raise MalformedPayload("bad_version", f"quarantine format version {version}")
    if not (1 <= c <= 4 and 1 <= h <= MAX_FRAME_DIM and 1 <= w <= MAX_FRAME_DIM):
        raise MalformedPayload("bad_shape", f"flagged frames of shape {(c, h, w)} are out of range")
    pixels_each = c * h * w
    expected = QUARANTINE_HEADER.size + name_len + (k + m) * pixels_each + QUARANTINE_LABEL_BYTES * m
    if n not in (expected, expected + QUARANTINE_SIGNATURE_BYTES):  # checked before anything is allocated
        raise MalformedPayload(
            "bad_length", f"{n} bytes for {k} flagged and {m} clean {c}x{h}x{w} images, expected {expected}"
        )
    key, signature = bytes(data[expected : expected + KEY_ID_BYTES]), bytes(data[expected + KEY_ID_BYTES :])
    start = QUARANTINE_HEADER.size
    try:
        gateway = bytes(data[start : start + name_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPayload("bad_header", "the gateway's name is not UTF-8") from None
    offset = start + name_len

    def images(count: int) -> torch.Tensor:
        pixels = np.frombuffer(data, dtype=np.uint8, count=count * pixels_each, offset=offset)
        return torch.from_numpy(pixels.reshape(count, c, h, w).astype(np.float32) * np.float32(1.0 / 255.0))

    flagged = images(k)
    if not m:
        return Quarantine(model_version, flagged, gateway, key, signature)
    offset += k * pixels_each
    valid = images(m)
    offset += m * pixels_each
    labels = np.frombuffer(data, dtype=">u2", count=m, offset=offset).astype(np.int64)
    return Quarantine(model_version, flagged, gateway, key, signature, valid, torch.from_numpy(labels))


def _under(topic: str, root: str) -> bool:
    return topic == root or topic.startswith(root + "/")


def decode(
    topic: str,
    data: bytes,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    frame_shape: tuple[int, int, int] | None = None,
    check_model: bool = False,
    encrypted: tuple[int, int] | None = None,
) -> Any:
    """The payload object for `data` received on `topic`: a Frame under `frames/` and `escalations/`, a ModelUpdate under
    `models/` (a Quarantine on `models/quarantine`), encrypted frames, results and public contexts where cameras
    encrypt (`encrypted`: at most how many ciphertexts of how many bytes a frame has), else the bytes unchanged.
    Raises `MalformedPayload` for data that does not decode."""
    if encrypted is not None:
        try:
            if _under(topic, FRAMES_ROOT) and encrypted_wire.is_encrypted_frame(data):
                return encrypted_wire.decode_frame(data, *encrypted)
            if _under(topic, encrypted_wire.PRIVACY_ROOT):
                if topic.startswith(context_topic("")):
                    return encrypted_wire.decode_context(data)
                if topic.startswith(results_topic("")):
                    return encrypted_wire.decode_result(data, encrypted[1])
                if topic.startswith((rounds_topic(""), replies_topic(""))):
                    return encrypted_wire.decode_round(data, encrypted[1])
        except encrypted_wire.EncryptedPayloadError as exc:
            raise MalformedPayload(exc.reason, str(exc)) from None
    if topic == QUARANTINE_TOPIC:
        return decode_quarantine(data)
    if topic == TRUST_TOPIC:
        if len(data) > MAX_TRUST_LIST_BYTES:
            raise MalformedPayload("oversized", f"{len(data)} bytes is over the trust list's {MAX_TRUST_LIST_BYTES}")
        return SignedTrustList(bytes(data))
    if _under(topic, FRAMES_ROOT) or _under(topic, ESCALATIONS_ROOT):
        return decode_frame(data, max_frame_bytes, frame_shape)
    if _under(topic, MODELS_ROOT):
        return decode_model_update(data, max_model_bytes, check_model)
    return bytes(data)


class WireCodec:
    """`encode`/`decode` with fixed settings, as `MqttTransport(codec=...)` takes them.

    `frame_shape`: the scenario's (C, H, W); a received frame of any other shape is refused (`bad_shape`),
    and `max_frame_bytes` defaults to the largest encoding of that shape (`max_frame_bytes_for`) instead of
    `DEFAULT_MAX_FRAME_BYTES`. `encrypted`: (ciphertexts per frame, bytes per ciphertext) where cameras encrypt
    their frames (`iotbed.privacy.wire`). `check_model`: a model update is only delivered if it loads as an iotbed
    model (costs one extra load per received update); else a receiver's loader may meet one it refuses."""

    def __init__(
        self,
        pixels_for: PixelsFor | None = None,
        *,
        max_frame_bytes: int | None = None,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
        frame_shape: tuple[int, int, int] | None = None,
        check_model: bool = False,
        encrypted: tuple[int, int] | None = None,
    ) -> None:
        self.pixels_for = pixels_for
        self.encrypted = encrypted
        self.check_model = check_model
        self.frame_shape = _check_frame_shape(frame_shape) if frame_shape is not None else None
        if max_frame_bytes is None:
            max_frame_bytes = (
                max_frame_bytes_for(self.frame_shape) if self.frame_shape is not None else DEFAULT_MAX_FRAME_BYTES
            )
        self.max_frame_bytes = max_frame_bytes
        self.max_model_bytes = max_model_bytes

    def encode(self, payload: Any) -> bytes:
        return encode(payload, self.pixels_for)

    def decode(self, topic: str, data: bytes) -> Any:
        return decode(
            topic,
            data,
            max_frame_bytes=self.max_frame_bytes,
            max_model_bytes=self.max_model_bytes,
            frame_shape=self.frame_shape,
            check_model=self.check_model,
            encrypted=self.encrypted,
        )


class RawCodec:
    """Bytes in, bytes out (str is sent as UTF-8): the transport's default."""

    def encode(self, payload: Any) -> bytes:
        if isinstance(payload, (bytes, bytearray, memoryview)):
            return bytes(payload)
        if isinstance(payload, str):
            return payload.encode("utf-8")
        raise TypeError(f"RawCodec sends bytes or str, not {type(payload).__name__}; use WireCodec for payload objects")

    def decode(self, topic: str, data: bytes) -> Any:
        return bytes(data)
