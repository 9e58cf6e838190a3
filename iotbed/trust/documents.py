"""The signed documents of the update channel, as they travel:

* update metadata, signed by a key the trust list gives the `registry` (or `repair`) role:
  `{"signed": {"type": "model-update", "version", "sha256", "dataset", "arch", "expires", "key"}, "sig"}`;
  a metadata-only message (the same metadata with no blob) renews `expires` for the version held;
* the trust list, signed by the pinned root key: `{"signed": {"type": "trust", "version", "keys": [{"id",
  "public", "role", "holder"}]}, "sig"}`. Devices are provisioned with version 1 and accept a later one
  (a key rotation), after which only its keys count.

Every document is canonical JSON (`keys.canonical`) of bounded size; `parse_*` refuse anything else with
`TrustError(reason, detail)` before any of it is believed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from iotbed.trust.keys import KEY_ID_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES, SigningKey, canonical, key_id_of

MAX_METADATA_BYTES = 4096
MAX_TRUST_LIST_BYTES = 64 * 1024
MAX_TRUSTED_KEYS = 1024
ROLES = ("registry", "repair", "gateway")
UPDATE_SIGNERS = ("registry", "repair")


class TrustError(ValueError):
    """A document refused; `reason` is the key counted in the `security` summary."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """What an update is for: the dataset and architecture a node serves."""

    dataset: str
    arch: str


@dataclass(frozen=True)
class UpdateMetadata:
    version: int
    sha256: str  # hex, of the safetensors blob
    target: Target
    expires: float  # run seconds
    key: bytes  # the signer's key id
    signature: bytes
    signed_bytes: bytes  # what the signature covers


@dataclass(frozen=True)
class TrustedKey:
    key_id: bytes
    public: bytes
    role: str
    holder: str  # the node holding it (a gateway's name, for its quarantine notices)


@dataclass(frozen=True)
class TrustList:
    version: int
    keys: dict[bytes, TrustedKey]
    signature: bytes = b""
    signed_bytes: bytes = b""


def blob_digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def sign_update(key: SigningKey, version: int, blob_sha256: str, target: Target, expires: float) -> bytes:
    signed = {
        "type": "model-update",
        "version": int(version),
        "sha256": blob_sha256,
        "dataset": target.dataset,
        "arch": target.arch,
        "expires": float(expires),
        "key": key.key_id.hex(),
    }
    return canonical({"signed": signed, "sig": key.sign(canonical(signed)).hex()})


def sign_trust_list(root: SigningKey, version: int, keys: list[TrustedKey]) -> bytes:
    signed = {
        "type": "trust",
        "version": int(version),
        "keys": [{"id": k.key_id.hex(), "public": k.public.hex(), "role": k.role, "holder": k.holder} for k in keys],
    }
    return canonical({"signed": signed, "sig": root.sign(canonical(signed)).hex()})


def _envelope(data: bytes, limit: int, kind: str) -> tuple[dict[str, Any], bytes, bytes]:
    if len(data) > limit:
        raise TrustError("malformed_metadata", f"{len(data)} bytes of {kind} is over the {limit}-byte limit")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TrustError("malformed_metadata", f"{kind} is not JSON: {type(exc).__name__}") from None
    if not isinstance(doc, dict) or set(doc) != {"signed", "sig"} or not isinstance(doc["signed"], dict):
        raise TrustError("malformed_metadata", f"{kind} must be {{'signed': {{...}}, 'sig': hex}}")
    signature = _hex(doc["sig"], SIGNATURE_BYTES, "sig")
    if doc["signed"].get("type") != kind:
        raise TrustError("malformed_metadata", f"a {doc['signed'].get('type')!r} document where {kind} was expected")
    return doc["signed"], signature, canonical(doc["signed"])


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _hex(value: Any, size: int, field: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size:
        raise TrustError("malformed_metadata", f"{field} must be {2 * size} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise TrustError("malformed_metadata", f"{field} is not hex") from None


def _field(signed: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = signed.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TrustError("malformed_metadata", f"field {name!r} is missing or not a {kind}")
    return value


def parse_update_metadata(data: bytes) -> UpdateMetadata:
    signed, signature, signed_bytes = _envelope(data, MAX_METADATA_BYTES, "model-update")
    if set(signed) != {"type", "version", "sha256", "dataset", "arch", "expires", "key"}:
        raise TrustError("malformed_metadata", f"update metadata fields {sorted(signed)}")
    version = _field(signed, "version", int)
    if not 0 <= version < 2**32:
        raise TrustError("malformed_metadata", f"version {version} is outside [0, 2^32)")
    expires = float(_field(signed, "expires", (int, float)))
    if not math.isfinite(expires):
        raise TrustError("malformed_metadata", "expires is not finite")
    sha = _hex(_field(signed, "sha256", str), 32, "sha256").hex()
    target = Target(_field(signed, "dataset", str), _field(signed, "arch", str))
    key = _hex(_field(signed, "key", str), KEY_ID_BYTES, "key")
    return UpdateMetadata(version, sha, target, expires, key, signature, signed_bytes)


def parse_trust_list(data: bytes) -> TrustList:
    signed, signature, signed_bytes = _envelope(data, MAX_TRUST_LIST_BYTES, "trust")
    if set(signed) != {"type", "version", "keys"}:
        raise TrustError("malformed_metadata", f"trust list fields {sorted(signed)}")
    version = _field(signed, "version", int)
    entries = _field(signed, "keys", list)
    if not 1 <= version < 2**32 or len(entries) > MAX_TRUSTED_KEYS:
        raise TrustError("malformed_metadata", f"trust list version {version} with {len(entries)} keys")
    keys: dict[bytes, TrustedKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != {"id", "public", "role", "holder"}:
            raise TrustError("malformed_metadata", "a trust list key must have id, public, role and holder")
        key_id = _hex(entry["id"], KEY_ID_BYTES, "id")
        public = _hex(entry["public"], PUBLIC_KEY_BYTES, "public")
        if key_id_of(public) != key_id:
            raise TrustError("malformed_metadata", f"trust list key {entry['id']} is not the id of its public key")
        role, holder = entry["role"], entry["holder"]
        if role not in ROLES or not isinstance(holder, str):
            raise TrustError("malformed_metadata", f"trust list role {role!r} (known: {', '.join(ROLES)})")
        keys[key_id] = TrustedKey(key_id, public, role, holder)
    return TrustList(version, keys, signature, signed_bytes)
