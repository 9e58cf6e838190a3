"""What travels in MQTT messages: camera frames, model updates and quarantine notices.

In simulation a payload is an object that knows its encoded size (`nbytes`); the bytes themselves are
built only where something must read them (a real broker, or a defense that changes pixels).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from iotbed.codecs.pixel_drop import PixelDropCodec, mask_from_seed

# magic, version, codec, channels, height, width, frame id, camera index, capture time, image index, label
FRAME_HEADER = struct.Struct("!2sBBBHHQIdIh")
FRAME_MAGIC = b"IB"
CODEC_RAW = 0
CODEC_PIXEL_DROP = 1  # the header, then `iotbed.codecs.pixel_drop.encode`'s bytes


@dataclass(slots=True)
class Frame:
    """One captured image. `pixels is None` means the dataset image `image_index`, untouched; otherwise
    float32 (C, H, W) in [0, 1] on the 8-bit grid (an attacker changed them, or they came off the wire).

    A pixel-dropped frame carries its codec and the seed its mask is drawn from (`mask_seed`); the mask
    itself is made only where something needs it (`drop_mask`), or comes decoded from the wire (`mask`).
    Dropped pixels are not in the payload: whatever `pixels` holds there is never read.
    """

    frame_id: int
    camera_index: int
    captured_at: float
    image_index: int
    label: int
    shape: tuple[int, int, int]  # C, H, W
    nbytes: int
    pixels: np.ndarray | None = None
    drop: PixelDropCodec | None = None
    mask_seed: int = -1
    mask: np.ndarray | None = None  # bool (H, W), True = dropped
    attack: str = ""  # the attacks that changed the pixels, joined by "+"

    def drop_mask(self) -> np.ndarray | None:
        """The (H, W) drop mask of a pixel-dropped frame, or None for a whole frame."""
        if self.mask is None and self.drop is not None:
            _, h, w = self.shape
            self.mask = mask_from_seed(self.mask_seed, h, w, self.drop.ws, self.drop.rate).numpy()
        return self.mask


def raw_frame_bytes(shape: tuple[int, int, int]) -> int:
    """A raw frame: the fixed header plus one byte per pixel and channel (8-bit camera output)."""
    c, h, w = shape
    return FRAME_HEADER.size + c * h * w


def encode_raw_frame(frame: Frame, pixels_u8: np.ndarray) -> bytes:
    c, h, w = frame.shape
    header = FRAME_HEADER.pack(
        FRAME_MAGIC,
        1,
        CODEC_RAW,
        c,
        h,
        w,
        frame.frame_id,
        frame.camera_index,
        frame.captured_at,
        frame.image_index,
        frame.label,
    )
    return header + np.ascontiguousarray(pixels_u8, dtype=np.uint8).tobytes()


@dataclass(slots=True)
class ModelUpdate:
    """A versioned model: safetensors bytes, as the registry publishes them, and the signed metadata that
    vouches for them (`iotbed.trust.documents`; empty when updates are not signed). A message with
    metadata and no blob renews the metadata of a version already delivered."""

    version: int
    blob: bytes
    metadata: bytes = b""

    @property
    def nbytes(self) -> int:
        # a 4-byte version and a 2-byte metadata length, the metadata, then the safetensors file
        return 6 + len(self.metadata) + len(self.blob)


TRUST_TOPIC = "models/trust"


@dataclass(slots=True)
class SignedTrustList:
    """The root-signed list of keys devices trust (`iotbed.trust.documents`), as canonical JSON bytes."""

    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


def metadata_topic(models_topic: str) -> str:
    """Where the registry renews the metadata of the version in service (retained, beside the update)."""
    return f"{models_topic}/metadata"


QUARANTINE_TOPIC = "models/quarantine"


@dataclass(slots=True)
class Quarantine:
    """A gateway's verdict on a model version, with the frames it flagged (the edge's D_poison) and, in
    CoDefend's own flow, the gateway's clean labelled images (D_valid) for the edge to repair with."""

    version: int
    flagged: torch.Tensor  # (K, C, H, W) in [0, 1]
    gateway: str
    key: bytes = b""  # the signing gateway's key id, when notices are signed
    signature: bytes = b""  # Ed25519 over the notice's bytes without key and signature
    valid: torch.Tensor | None = None  # (M, C, H, W) in [0, 1]: D_valid, where the gateway sends it
    valid_labels: torch.Tensor | None = None  # (M,) int64

    @property
    def valid_count(self) -> int:
        return 0 if self.valid is None else len(self.valid)

    @property
    def nbytes(self) -> int:
        # the header and the gateway's name, 8-bit pixels of the flagged frames and of D_valid, D_valid's
        # 16-bit labels, then key id and signature
        body = QUARANTINE_HEADER.size + len(self.gateway.encode("utf-8")) + int(self.flagged.numel())
        if self.valid is not None:
            body += int(self.valid.numel()) + QUARANTINE_LABEL_BYTES * self.valid_count
        return body + len(self.key) + len(self.signature)


# magic, format version, model version, flagged count, D_valid count, channels, height, width, gateway name length
QUARANTINE_HEADER = struct.Struct("!2sBIIIBHHB")
QUARANTINE_LABEL_BYTES = 2
QUARANTINE_MAGIC = b"IQ"


@dataclass(slots=True)
class EncryptedFrame:
    """A frame as a CKKS-encrypting camera sends it: the image's ciphertexts, one per channel, as SEAL
    serialised them. Nothing else about the image travels: the edge reads no label or image index."""

    frame_id: int
    camera_index: int
    key_owner: str  # whose public context the edge computes with, and where the result goes
    ciphertexts: list[bytes]

    @property
    def nbytes(self) -> int:
        return ENCRYPTED_HEADER.size + 1 + len(self.key_owner.encode()) + sum(4 + len(c) for c in self.ciphertexts)


@dataclass(slots=True)
class EncryptedResult:
    """The encrypted logits of one frame, on their way back to the key owner."""

    frame_id: int
    model_version: int
    ciphertext: bytes

    @property
    def nbytes(self) -> int:
        return ENCRYPTED_HEADER.size + 4 + len(self.ciphertext)


@dataclass(slots=True)
class EncryptedRound:
    """One leg of an interactive round: the edge's masked hidden layer to the key holder (`party`: the edge
    to reply to), or the key holder's ReLU of it back (`party`: the key holder)."""

    frame_id: int
    step: int  # the step of the edge's evaluation that produced (or that takes) it: 1 or 2
    party: str
    ciphertext: bytes

    @property
    def nbytes(self) -> int:
        return ENCRYPTED_HEADER.size + 1 + len(self.party.encode()) + 4 + len(self.ciphertext)


# magic, format version, frame id, camera index (a frame) or model version (a result), ciphertext count; a
# frame then has its key owner's name (1-byte length), and every ciphertext comes with a 4-byte length
ENCRYPTED_HEADER = struct.Struct("!2sBQIB")
ENCRYPTED_FRAME_MAGIC = b"IE"
ENCRYPTED_RESULT_MAGIC = b"IR"
ENCRYPTED_ROUND_MAGIC = b"IN"  # the header's camera-index field holds the step


def context_topic(camera: str) -> str:
    """Where a camera publishes (retained) the public context others compute on its ciphertexts with."""
    return f"privacy/context/{camera}"


def results_topic(camera: str) -> str:
    """Where the edge sends a camera's encrypted results."""
    return f"privacy/results/{camera}"


def rounds_topic(key_holder: str) -> str:
    """Where an interactive edge sends a key holder its masked hidden layers."""
    return f"privacy/rounds/{key_holder}"


def replies_topic(edge: str) -> str:
    """Where a key holder sends an edge the ReLU of what it was sent."""
    return f"privacy/replies/{edge}"
