"""A device's side of the update channel: what it checks before it loads a model or believes a notice.

The device is provisioned with the root public key and trust list version 1. An update is accepted only
when all of these hold, checked in this order (the first that fails is the refusal's reason):

    unsigned            it carries no metadata
    malformed_metadata  its metadata does not parse (`documents.parse_update_metadata`)
    untrusted_key       the signer is not in the trust list held, or its role may not sign updates
    bad_signature       the signature does not verify
    version_mismatch    the message's version is not the signed one
    wrong_target        signed for another dataset or architecture
    hash_mismatch       the blob's SHA-256 is not the signed one
    replay              this device has seen this very blob before (an old update sent again)
    rollback            its version is not above the version served
    expired             its metadata expired before it arrived (held back: a freeze)

A metadata-only message for the version served renews that version's expiry (the registry's timestamp);
when the expiry passes with no renewal the device reports itself `stale`, which is how a freeze that
withholds every update is noticed. A retained update that comes again (on a reconnect) is `current` and
ignored, not refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from iotbed.nodes.payloads import ModelUpdate, Quarantine
from iotbed.trust.documents import (
    UPDATE_SIGNERS,
    Target,
    TrustedKey,
    TrustError,
    TrustList,
    UpdateMetadata,
    blob_digest,
    parse_trust_list,
    parse_update_metadata,
)
from iotbed.trust.keys import signature_valid

Action = Literal["adopt", "renew", "current", "ignore"]


@dataclass(frozen=True)
class Verdict:
    action: Action
    metadata: UpdateMetadata


@dataclass
class UpdateVerifier:
    root_public: bytes
    trust: TrustList
    target: Target
    version: int  # the highest version accepted (a rollback after a quarantine does not lower it)
    sha256: str  # its blob's digest
    expires: float = math.inf  # when the metadata of that version runs out
    seen: set[str] = field(default_factory=set)  # digests of every blob this device has held

    def check_update(self, update: ModelUpdate, now: float) -> Verdict:
        """What to do with `update` at run time `now`; raises `TrustError` with the reason it is refused."""
        meta = authenticate(update, self.trust, self.target)
        if not update.blob:  # metadata only: renews the version served
            if meta.version == self.version and meta.sha256 == self.sha256:
                self._fresh(meta, now)
                return Verdict("renew", meta)
            return Verdict("ignore", meta)
        digest = meta.sha256  # the blob's, checked
        if meta.version == self.version and digest == self.sha256:
            return Verdict("current", meta)
        if digest in self.seen:
            raise TrustError("replay", f"version {meta.version} was received before")
        if meta.version <= self.version:
            raise TrustError("rollback", f"version {meta.version} is not above version {self.version} in service")
        self._fresh(meta, now)
        return Verdict("adopt", meta)

    def _fresh(self, meta: UpdateMetadata, now: float) -> None:
        if meta.expires <= now:
            raise TrustError("expired", f"metadata of version {meta.version} expired at {meta.expires:.3f} s")

    def adopted(self, meta: UpdateMetadata) -> None:
        self.seen.add(self.sha256)
        self.version, self.sha256, self.expires = meta.version, meta.sha256, meta.expires
        self.seen.add(meta.sha256)

    def renewed(self, meta: UpdateMetadata) -> None:
        self.expires = max(self.expires, meta.expires)

    def stale(self, now: float) -> bool:
        return now >= self.expires

    def check_trust_list(self, data: bytes) -> TrustList | None:
        """A later trust list signed by the root (a key rotation), or None for the one held or an older one."""
        trust = parse_trust_list(data)
        if not signature_valid(self.root_public, trust.signature, trust.signed_bytes):
            raise TrustError("bad_signature", f"trust list version {trust.version} is not signed by the root key")
        if trust.version <= self.trust.version:
            return None
        self.trust = trust
        return trust

    def check_quarantine(self, notice: Quarantine, body: bytes) -> None:
        """A notice counts only when a gateway of the trust list signed `body` (its bytes without the
        signature) under its own name."""
        if not notice.signature:
            raise TrustError("unsigned", f"quarantine of version {notice.version} is not signed")
        trusted = check_signer(self.trust, notice.key, notice.signature, body, ("gateway",))
        if trusted.holder != notice.gateway:
            raise TrustError("untrusted_key", f"{trusted.holder}'s key signed a notice in {notice.gateway}'s name")


def authenticate(
    update: ModelUpdate, trust: TrustList, target: Target, roles: tuple[str, ...] = UPDATE_SIGNERS
) -> UpdateMetadata:
    """`update`'s metadata once it is known to be signed by a key of `trust` with one of `roles`, for this
    version, this target and (when the message carries one) this blob; else `TrustError`, with the first of
    unsigned, malformed_metadata, untrusted_key, bad_signature, version_mismatch, wrong_target, hash_mismatch."""
    if not update.metadata:
        raise TrustError("unsigned", f"version {update.version} carries no signed metadata")
    meta = parse_update_metadata(update.metadata)
    check_signer(trust, meta.key, meta.signature, meta.signed_bytes, roles)
    if meta.version != update.version:
        raise TrustError("version_mismatch", f"message says version {update.version}, signed {meta.version}")
    if meta.target != target:
        raise TrustError("wrong_target", f"signed for {meta.target}, this device serves {target}")
    if update.blob:
        digest = blob_digest(update.blob)
        if digest != meta.sha256:
            raise TrustError("hash_mismatch", f"blob SHA-256 {digest[:16]}..., signed {meta.sha256[:16]}...")
    return meta


def check_signer(trust: TrustList, key_id: bytes, signature: bytes, data: bytes, roles: tuple[str, ...]) -> TrustedKey:
    """The key of `trust` that signed `data`, if it has one of `roles` and the signature verifies."""
    trusted = trust.keys.get(key_id)
    if trusted is None or trusted.role not in roles:
        what = "no key of" if trusted is None else f"a {trusted.role} key, not one of"
        raise TrustError("untrusted_key", f"signed by {key_id.hex()}: {what} the trust list's {'/'.join(roles)}")
    if not signature_valid(trusted.public, signature, data):
        raise TrustError("bad_signature", f"the signature by {key_id.hex()} ({trusted.holder}) does not verify")
    return trusted
