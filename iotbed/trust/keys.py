"""Ed25519 keys for the update channel, drawn from the scenario's seed so that a run signs the same bytes
every time (Ed25519 signatures are deterministic), and canonical bytes to sign."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from iotbed.sim.rng import RandomStreams

KEY_ID_BYTES = 8
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


def key_id_of(public: bytes) -> bytes:
    """The first 8 bytes of the public key's SHA-256: what a signature names its key by."""
    return hashlib.sha256(public).digest()[:KEY_ID_BYTES]


def canonical(value: Any) -> bytes:
    """The one byte string a JSON value signs as: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    public: bytes  # raw 32 bytes

    @property
    def key_id(self) -> bytes:
        return key_id_of(self.public)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def derive_key(streams: RandomStreams, *name: str) -> SigningKey:
    """The key named `name` under the scenario's seed (the same seed, the same key)."""
    seed = streams.generator("trust-key", *name).bytes(32)
    private = Ed25519PrivateKey.from_private_bytes(seed)
    return SigningKey(private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def signature_valid(public: bytes, signature: bytes, data: bytes) -> bool:
    if len(public) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
