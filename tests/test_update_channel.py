"""Signed model updates: the verifier's every refusal, keys that follow the seed, the shipped attack scenario
in simulation with signing on and off, the verification cost in simulated time, and the same attacks live
against a real Mosquitto."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import SCENARIOS
from hypothesis import given, settings
from hypothesis import strategies as st

import iotbed
from iotbed.analysis.compare import compare_runs
from iotbed.broker.wire import quarantine_body
from iotbed.emulation.runner import emulate
from iotbed.errors import ScenarioError
from iotbed.nodes.payloads import ModelUpdate, Quarantine
from iotbed.sim.devices import BUILTIN_PROFILES
from iotbed.sim.rng import RandomStreams
from iotbed.trust.documents import Target, TrustError, parse_trust_list, parse_update_metadata
from iotbed.trust.keys import derive_key
from iotbed.trust.provisioning import KeyRing

ATTACKS = SCENARIOS / "update_channel_attacks.yaml"
TARGET = Target("digits", "lenet5")
BLOB_1, BLOB_2, BLOB_3 = b"model-1" * 10, b"model-2" * 10, b"model-3" * 10


def _ring(seed: int = 0) -> KeyRing:
    return KeyRing.draw(seed, [50.0], ["gw-0"], ["edge-0"], TARGET, 10.0)


def _refusal(verifier, update: ModelUpdate, now: float = 1.0) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(TrustError) as refused:
        verifier.check_update(update, now)
    return refused.value.reason


def test_the_verifier_refuses_each_forgery_with_its_reason() -> None:
    ring = _ring()
    registry = ring.registry_key(0.0)
    verifier = ring.verifier(1, BLOB_1)
    signed_2 = ring.sign(registry, ModelUpdate(2, BLOB_2), 0.0)
    assert verifier.check_update(signed_2, 1.0).action == "adopt"

    stranger = derive_key(RandomStreams(0), "stranger")
    assert _refusal(verifier, ModelUpdate(2, BLOB_2)) == "unsigned"
    assert _refusal(verifier, ModelUpdate(2, BLOB_2, b"{not json")) == "malformed_metadata"
    assert _refusal(verifier, ring.sign(stranger, ModelUpdate(2, BLOB_2), 0.0)) == "untrusted_key"
    assert _refusal(verifier, ring.sign(ring.gateways["gw-0"], ModelUpdate(2, BLOB_2), 0.0)) == "untrusted_key"
    forged = signed_2.metadata.replace(b'"version":2', b'"version":9')
    assert _refusal(verifier, ModelUpdate(9, BLOB_2, forged)) == "bad_signature"
    assert _refusal(verifier, ModelUpdate(9, BLOB_2, signed_2.metadata)) == "version_mismatch"
    assert _refusal(verifier, ModelUpdate(2, BLOB_3, signed_2.metadata)) == "hash_mismatch"
    other = dataclasses.replace(ring, target=Target("gtsrb", "lenet5"))
    assert _refusal(verifier, other.sign(registry, ModelUpdate(2, BLOB_2), 0.0)) == "wrong_target"
    assert _refusal(verifier, signed_2, now=10.0) == "expired"

    verifier.adopted(verifier.check_update(signed_2, 1.0).metadata)
    assert verifier.check_update(signed_2, 2.0).action == "current"  # a retained update coming again
    first = ring.sign(registry, ModelUpdate(1, BLOB_1), 0.0)
    assert _refusal(verifier, first, 2.0) == "replay"  # the blob it served before
    assert _refusal(verifier, ring.sign(registry, ModelUpdate(2, BLOB_3), 0.0), 2.0) == "rollback"

    renewal = ring.renewal(2, hashlib.sha256(BLOB_2).hexdigest(), 9.0, 0)
    assert verifier.check_update(renewal, 9.5).action == "renew"
    verifier.renewed(verifier.check_update(renewal, 9.5).metadata)
    assert verifier.expires == 19.0 and not verifier.stale(18.9) and verifier.stale(19.0)


def test_a_rotation_revokes_the_old_registry_key_and_only_the_root_can_rotate() -> None:
    ring = _ring()
    verifier = ring.verifier(1, BLOB_1)
    old = ring.sign(ring.registry[0], ModelUpdate(2, BLOB_2), 60.0)
    new = ring.sign(ring.registry[1], ModelUpdate(3, BLOB_3), 60.0)
    assert _refusal(verifier, new, 61.0) == "untrusted_key"  # not before the new trust list arrives
    forged = parse_trust_list(ring.trust_lists[1])
    with pytest.raises(TrustError, match="bad_signature"):
        verifier.check_trust_list(ring.trust_lists[1].replace(forged.signature.hex().encode(), b"0" * 128))
    assert verifier.check_trust_list(ring.trust_lists[1]).version == 2
    assert verifier.check_trust_list(ring.trust_lists[0]) is None  # an old list changes nothing
    assert _refusal(verifier, old, 61.0) == "untrusted_key"
    assert verifier.check_update(new, 61.0).action == "adopt"


def test_quarantine_notices_count_only_from_the_gateway_named() -> None:
    ring = _ring()
    verifier = ring.verifier(1, BLOB_1)
    notice = Quarantine(2, torch.rand(2, 1, 8, 8), "gw-0")
    body = quarantine_body(notice)
    key = ring.gateways["gw-0"]
    signed = dataclasses.replace(notice, key=key.key_id, signature=key.sign(body))
    verifier.check_quarantine(signed, body)
    impostor = dataclasses.replace(notice, gateway="gw-1")  # gw-0's own key, in gw-1's name
    impostor = dataclasses.replace(impostor, key=key.key_id, signature=key.sign(quarantine_body(impostor)))
    for forged, reason in (
        (notice, "unsigned"),
        (impostor, "untrusted_key"),
        (dataclasses.replace(signed, signature=bytes(64)), "bad_signature"),
    ):
        with pytest.raises(TrustError, match=reason):
            verifier.check_quarantine(forged, quarantine_body(forged))


def test_the_same_seed_draws_the_same_keys_and_signatures() -> None:
    a, b, c = _ring(1), _ring(1), _ring(2)
    assert a.trust_lists == b.trust_lists and a.trust_lists != c.trust_lists
    update = ModelUpdate(2, BLOB_2)
    assert a.sign(a.registry[0], update, 0.0) == b.sign(b.registry[0], update, 0.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_metadata_parsing_refuses_any_bytes_cleanly(data: bytes) -> None:
    for parse in (parse_update_metadata, parse_trust_list):
        try:
            parse(data)
        except TrustError:
            pass


def _security(summary: dict) -> dict:  # type: ignore[type-arg]
    return {row["attack"]: row for row in summary["security"]["attacks"]}


def test_every_update_channel_attack_is_refused_with_its_reason_in_simulation(tmp_path: Path) -> None:
    scenario = iotbed.load_scenario(ATTACKS)
    summary = iotbed.run(scenario, tmp_path / "signed", progress=False).summary
    attacks = _security(summary)
    expected = {
        "rogue@20s": "unsigned",
        "rogue@22s": "untrusted_key",
        "forged_quarantine@26s": "quarantine:unsigned",
        "replay@30s": "replay",
        "rollback@33s": "version_mismatch",
        "rogue@42s": "untrusted_key",  # the stolen first key, revoked by the rotation at 38 s
    }
    for label, reason in expected.items():
        refused_by = 1 if label.startswith("forged") else 2  # the edge takes notices; the gateway too takes updates
        assert attacks[label]["refused"] == {reason: refused_by} and attacks[label]["taken_by"] == [], label
    freeze = attacks["freeze@48s"]
    assert freeze["held_messages"] > 0 and freeze["stale"] == ["edge-0", "gw-0"]
    assert 48.0 < freeze["first_stale_s"] <= 48.0 + scenario.security.metadata_expiry
    assert {row["version"] for row in summary["security"]["behind"]} == {7}  # the update held back past its expiry
    versions = {e["version"] for e in summary["model_events"] if e["event"] == "adopted"}
    assert versions == {2, 3}
    assert summary["security"]["key_rotations"] == 1

    unsigned = iotbed.run(
        iotbed.load_scenario(ATTACKS, ["security.signing=false"]), tmp_path / "unsigned", progress=False
    ).summary
    plain = _security(unsigned)
    for label in ("rogue@20s", "rogue@22s", "forged_quarantine@26s", "rollback@33s"):
        assert plain[label]["taken_by"] == ["edge-0"], label
    assert unsigned["security"]["refused"] == {}


def test_checking_an_update_costs_the_devices_time(tmp_path: Path) -> None:
    """The edge hosts the broker and the registry, so an update reaches it without a link: it adopts an unsigned
    update at the instant it is published, and a signed one a signature check and a hash later."""
    overrides = ["duration=8s", "security.attacks=[]", "security.key_rotations=[]", "registry.updates=[{at: 5s}]"]
    times = {}
    for signing in ("true", "false"):
        scenario = iotbed.load_scenario(ATTACKS, [*overrides, f"security.signing={signing}"])
        summary = iotbed.run(scenario, tmp_path / signing, progress=False).summary
        adopted = next(e for e in summary["model_events"] if e["node"] == "edge-0" and e["event"] == "adopted")
        times[signing] = (adopted["time_s"], adopted["size_bytes"])
    profile = BUILTIN_PROFILES["edge_server_8core"]
    (signed_at, nbytes), (plain_at, _) = times["true"], times["false"]
    assert plain_at == 5.0
    assert signed_at - plain_at == pytest.approx(profile.verify_seconds(nbytes - 6), rel=1e-6)


def test_update_channel_attack_entries_are_checked() -> None:
    bad = {
        "security.attacks=[{kind: freeze, at: 5s}]": "freeze takes `stop:`",
        "security.attacks=[{kind: replay, at: 5s, update: 9}]": "no registry update 9",
        "security.attacks=[{kind: replay, at: 500s}]": "at or after the end",
        "security.attacks=[{kind: rollback, at: 5s, node: cam-99}]": "not a node",
        "security.refresh_interval=10s": "below metadata_expiry",
    }
    for override, message in bad.items():
        with pytest.raises(ScenarioError, match=message):
            iotbed.load_scenario(ATTACKS, [override])


LIVE = [
    "duration=16s",
    "registry.updates=[{at: 1s, train: {seed: 1, epochs: 5}}, {at: 2500ms, train: {seed: 2, epochs: 5}},"
    " {at: 3s, train: {seed: 3, epochs: 5}, publisher: cam-3},"
    " {at: 8s, train: {seed: 5, epochs: 5}, publisher: cam-2, signed_by: registry}]",
    "security.metadata_expiry=3s",
    "security.refresh_interval=1s",
    "security.key_rotations=[7s]",
    "security.attacks=[{kind: forged_quarantine, at: 4s, update: 0}, {kind: replay, at: 5s, update: 0},"
    " {kind: rollback, at: 6s}, {kind: freeze, at: 9s, stop: 14s}]",
]


def test_the_same_attacks_are_refused_for_the_same_reasons_live(plain_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scenario = iotbed.load_scenario(ATTACKS, LIVE)
    simulated = iotbed.run(scenario, tmp_path / "sim", progress=False).summary
    live = emulate(scenario, plain_broker.url, out_dir=tmp_path / "live", progress=False).summary
    for summary in (simulated, live):
        attacks = _security(summary)
        assert attacks["rogue@3s"]["refused"] == {"unsigned": 2}
        assert attacks["forged_quarantine@4s"]["refused"] == {"quarantine:unsigned": 1}
        assert attacks["replay@5s"]["refused"] == {"replay": 2}
        assert attacks["rollback@6s"]["refused"] == {"version_mismatch": 2}
        assert attacks["rogue@8s"]["refused"] == {"untrusted_key": 2}
        assert attacks["freeze@9s"]["stale"] == ["edge-0", "gw-0"]
        assert {e["version"] for e in summary["model_events"] if e["event"] == "adopted"} == {2, 3}
    assert live["broker"]["malformed"] == 0
    rows = {r["metric"]: r for r in compare_runs(tmp_path / "sim", tmp_path / "live")}
    refused = [m for m in rows if m.startswith("security.refused.")]
    assert len(refused) >= 5 and all(rows[m]["diff"] == 0 for m in refused)
