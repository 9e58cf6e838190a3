"""The keys of one run, drawn from its seed: the root key devices pin, one registry key per key period
(a rotation starts a new one), a key per screening gateway and per repairing edge, and the trust list of
each period, signed by the root. Devices are provisioned with trust list 1 and the signed metadata of the
model they start with."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from iotbed.nodes.payloads import ModelUpdate
from iotbed.sim.rng import RandomStreams
from iotbed.trust.documents import Target, TrustedKey, blob_digest, parse_trust_list, sign_trust_list, sign_update
from iotbed.trust.keys import SigningKey, derive_key
from iotbed.trust.verifier import UpdateVerifier


@dataclass
class KeyRing:
    root: SigningKey
    registry: list[SigningKey]  # one per key period
    rotations: list[float]  # when period i + 1 starts
    gateways: dict[str, SigningKey]
    repairers: dict[str, SigningKey]
    target: Target
    expiry_s: float
    trust_lists: list[bytes] = field(default_factory=list)  # period i's list, version i + 1

    @classmethod
    def draw(
        cls,
        seed: int,
        rotations: list[float],
        gateways: list[str],
        repairers: list[str],
        target: Target,
        expiry_s: float,
    ) -> KeyRing:
        streams = RandomStreams(seed)
        rotations = sorted(rotations)
        ring = cls(
            derive_key(streams, "root"),
            [derive_key(streams, "registry", str(i)) for i in range(len(rotations) + 1)],
            rotations,
            {g: derive_key(streams, "gateway", g) for g in gateways},
            {e: derive_key(streams, "repair", e) for e in repairers},
            target,
            expiry_s,
        )
        others = [TrustedKey(k.key_id, k.public, "gateway", g) for g, k in ring.gateways.items()]
        others += [TrustedKey(k.key_id, k.public, "repair", e) for e, k in ring.repairers.items()]
        for i, key in enumerate(ring.registry):
            entries = [TrustedKey(key.key_id, key.public, "registry", "registry"), *others]
            ring.trust_lists.append(sign_trust_list(ring.root, i + 1, entries))
        return ring

    def registry_key(self, at_s: float) -> SigningKey:
        return self.registry[bisect.bisect_right(self.rotations, at_s)]

    def sign(self, key: SigningKey, update: ModelUpdate, at_s: float) -> ModelUpdate:
        """`update` with metadata signed by `key` at run time `at_s`, valid for the expiry from then."""
        digest = blob_digest(update.blob)
        metadata = sign_update(key, update.version, digest, self.target, at_s + self.expiry_s)
        return ModelUpdate(update.version, update.blob, metadata)

    def renewal(self, version: int, sha256: str, at_s: float, period: int) -> ModelUpdate:
        """A metadata-only message renewing `version` from `at_s`, signed by the registry's key of `period`."""
        metadata = sign_update(self.registry[period], version, sha256, self.target, at_s + self.expiry_s)
        return ModelUpdate(version, b"", metadata)

    def verifier(self, version: int, blob: bytes) -> UpdateVerifier:
        """A device as provisioned: root key, trust list 1, serving `version` (`blob`) with fresh metadata."""
        return UpdateVerifier(
            self.root.public,
            parse_trust_list(self.trust_lists[0]),
            self.target,
            version,
            blob_digest(blob),
            self.expiry_s,
        )
