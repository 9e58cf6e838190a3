"""Encrypted frames, encrypted results and public contexts as bytes on a real broker.

Every length is checked against the message and against a bound before anything is sliced or handed to
SEAL: at most `MAX_CIPHERTEXTS` ciphertexts of at most `max_ciphertext_bytes` each, a key owner's name of
at most 64 topic-safe characters. SEAL's own checks come later, where the edge loads the ciphertexts
(`EncryptedCnn.load_inputs`).
"""

from __future__ import annotations

import re
import struct

from iotbed.nodes.payloads import (
    ENCRYPTED_FRAME_MAGIC,
    ENCRYPTED_HEADER,
    ENCRYPTED_RESULT_MAGIC,
    ENCRYPTED_ROUND_MAGIC,
    EncryptedFrame,
    EncryptedResult,
    EncryptedRound,
)
from iotbed.privacy.ckks import PublicContext

FORMAT_VERSION = 1
MAX_CIPHERTEXTS = 4  # one per image channel
DEFAULT_MAX_CIPHERTEXT_BYTES = 8 << 20  # a fresh ciphertext at N = 32768 with 881 bits is ~7 MB uncompressed
MAX_CONTEXT_BYTES = 256 << 20
PRIVACY_ROOT = "privacy"
_LENGTH = struct.Struct("!I")
_OWNER = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class EncryptedPayloadError(ValueError):
    """Bytes that are no encrypted frame, result or public context. `reason` keys the counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _name(name: str) -> bytes:
    if not _OWNER.fullmatch(name):
        raise ValueError(f"{name!r} is not a node name")
    return bytes([len(name)]) + name.encode()


def encode_frame(frame: EncryptedFrame) -> bytes:
    head = ENCRYPTED_HEADER.pack(
        ENCRYPTED_FRAME_MAGIC, FORMAT_VERSION, frame.frame_id, frame.camera_index, len(frame.ciphertexts)
    )
    return head + _name(frame.key_owner) + b"".join(_LENGTH.pack(len(c)) + c for c in frame.ciphertexts)


def encode_round(leg: EncryptedRound) -> bytes:
    head = ENCRYPTED_HEADER.pack(ENCRYPTED_ROUND_MAGIC, FORMAT_VERSION, leg.frame_id, leg.step, 1)
    return head + _name(leg.party) + _LENGTH.pack(len(leg.ciphertext)) + leg.ciphertext


def encode_result(result: EncryptedResult) -> bytes:
    head = ENCRYPTED_HEADER.pack(ENCRYPTED_RESULT_MAGIC, FORMAT_VERSION, result.frame_id, result.model_version, 1)
    return head + _LENGTH.pack(len(result.ciphertext)) + result.ciphertext


def _ciphertexts(data: bytes, at: int, count: int, max_bytes: int) -> list[bytes]:
    out = []
    for i in range(count):
        if at + _LENGTH.size > len(data):
            raise EncryptedPayloadError("truncated", f"ciphertext {i}'s length is cut off")
        (n,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if n > max_bytes:
            raise EncryptedPayloadError("oversized", f"ciphertext {i} of {n} bytes is over {max_bytes}")
        if at + n > len(data):
            raise EncryptedPayloadError("truncated", f"ciphertext {i} needs {n} bytes, {len(data) - at} are left")
        out.append(bytes(data[at : at + n]))
        at += n
    if at != len(data):
        raise EncryptedPayloadError("bad_length", f"{len(data) - at} bytes after the last ciphertext")
    return out


def _header(data: bytes, magic: bytes, max_count: int) -> tuple[int, int, int]:
    if len(data) < ENCRYPTED_HEADER.size:
        raise EncryptedPayloadError("truncated", f"{len(data)} bytes is shorter than the header")
    got, version, frame_id, number, count = ENCRYPTED_HEADER.unpack_from(data)
    if got != magic:
        raise EncryptedPayloadError("bad_magic", f"starts {got!r}, not {magic!r}")
    if version != FORMAT_VERSION:
        raise EncryptedPayloadError("bad_version", f"format version {version}")
    if not 1 <= count <= max_count:
        raise EncryptedPayloadError("bad_header", f"{count} ciphertexts (1 to {max_count} allowed)")
    return frame_id, number, count


def _read_name(data: bytes, at: int) -> tuple[str, int]:
    if at >= len(data):
        raise EncryptedPayloadError("truncated", "no node name")
    n = data[at]
    raw = bytes(data[at + 1 : at + 1 + n])
    name = raw.decode("ascii", errors="replace")
    if len(raw) != n or not _OWNER.fullmatch(name):
        raise EncryptedPayloadError("bad_header", "the node name is no node name")
    return name, at + 1 + n


def decode_frame(
    data: bytes, max_ciphertexts: int = MAX_CIPHERTEXTS, max_ciphertext_bytes: int = DEFAULT_MAX_CIPHERTEXT_BYTES
) -> EncryptedFrame:
    frame_id, camera_index, count = _header(data, ENCRYPTED_FRAME_MAGIC, min(max_ciphertexts, MAX_CIPHERTEXTS))
    owner, at = _read_name(data, ENCRYPTED_HEADER.size)
    return EncryptedFrame(frame_id, camera_index, owner, _ciphertexts(data, at, count, max_ciphertext_bytes))


def decode_round(data: bytes, max_ciphertext_bytes: int = DEFAULT_MAX_CIPHERTEXT_BYTES) -> EncryptedRound:
    frame_id, step, count = _header(data, ENCRYPTED_ROUND_MAGIC, 1)
    party, at = _read_name(data, ENCRYPTED_HEADER.size)
    (ciphertext,) = _ciphertexts(data, at, count, max_ciphertext_bytes)
    return EncryptedRound(frame_id, step, party, ciphertext)


def decode_result(data: bytes, max_ciphertext_bytes: int = DEFAULT_MAX_CIPHERTEXT_BYTES) -> EncryptedResult:
    frame_id, version, count = _header(data, ENCRYPTED_RESULT_MAGIC, 1)
    (ciphertext,) = _ciphertexts(data, ENCRYPTED_HEADER.size, count, max_ciphertext_bytes)
    return EncryptedResult(frame_id, version, ciphertext)


def decode_context(data: bytes, max_bytes: int = MAX_CONTEXT_BYTES) -> PublicContext:
    try:
        return PublicContext.from_bytes(data, None, max_bytes)
    except ValueError as exc:
        raise EncryptedPayloadError("bad_context", str(exc)) from None


def is_encrypted_frame(data: bytes) -> bool:
    return data[:2] == ENCRYPTED_FRAME_MAGIC
