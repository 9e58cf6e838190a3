"""What a scenario's `security:` section makes of the update channel before a run: the key ring, the
registry's updates signed as each entry says, the freeze windows, and the message each update-channel
attacker will send. `iotbed.deployment.build_nodes` puts them on nodes; both runtimes send the same bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from iotbed.naming import INITIAL_MODEL_VERSION, group_nodes, node_name
from iotbed.nodes.payloads import QUARANTINE_TOPIC, ModelUpdate, Quarantine
from iotbed.nodes.registry import Freeze, ScheduledUpdate
from iotbed.nodes.update_attacker import CraftedMessage
from iotbed.scenario.schema import Scenario, UpdateChannelAttackSpec
from iotbed.sim.rng import RandomStreams
from iotbed.trust.documents import Target
from iotbed.trust.keys import SigningKey, derive_key
from iotbed.trust.provisioning import KeyRing

ROLLBACK_VERSION = 2**32 - 1  # the top of the version field: adopted, it also shuts out every later update
FORGED_FLAGGED_FRAMES = 8


@dataclass
class ChannelSetup:
    keys: KeyRing | None
    initial_blob: bytes
    updates: list[ScheduledUpdate]  # signed as their entries say
    freezes: tuple[Freeze, ...] = ()
    attackers: list[tuple[str, str, CraftedMessage]] = field(default_factory=list)  # (client id, node, message)


def attacker_clients(scenario: Scenario) -> list[tuple[str, str]]:
    """(client id, node) of each update-channel attacker that sends a message (a freeze sends none)."""
    first_camera = node_name(scenario.nodes.cameras[0].name, 0) if scenario.nodes.cameras else "registry"
    return [
        (f"{attack.kind}-{i}@{attack.node or first_camera}", attack.node or first_camera)
        for i, attack in enumerate(scenario.security.attacks)
        if attack.kind != "freeze"
    ]


def screening_gateways(scenario: Scenario) -> list[str]:
    return [n for g in scenario.nodes.gateways if g.screen for n in group_nodes(g.name, g.count)]


def repairing_edges(scenario: Scenario) -> list[str]:
    """One repairer per edge group with `repair:`, its first node."""
    return [node_name(g.name, 0) for g in scenario.nodes.edge_servers if g.repair is not None]


def _own_key(scenario: Scenario, holder: str) -> SigningKey:
    return derive_key(RandomStreams(scenario.seed), "attacker", holder)


def setup_channel(
    scenario: Scenario, updates: tuple[ScheduledUpdate, ...], initial_blob: bytes, images: torch.Tensor
) -> ChannelSetup:
    security = scenario.security
    keys = None
    if security.signing:
        keys = KeyRing.draw(
            scenario.seed,
            list(security.key_rotations),
            screening_gateways(scenario),
            repairing_edges(scenario),
            Target(scenario.dataset.name, scenario.model.arch),
            security.metadata_expiry,
        )
    signed = [_sign(scenario, keys, spec.signed_by, u) for spec, u in zip(scenario.registry.updates, updates)]
    setup = ChannelSetup(keys, initial_blob, signed)
    setup.freezes = tuple(Freeze(a.at, a.stop) for a in security.attacks if a.kind == "freeze" and a.stop)
    senders = [a for a in security.attacks if a.kind != "freeze"]
    for (client_id, node), attack in zip(attacker_clients(scenario), senders):
        setup.attackers.append((client_id, node, _crafted(scenario, attack, setup, images)))
    return setup


def _sign(
    scenario: Scenario, keys: KeyRing | None, signed_by: str | None, scheduled: ScheduledUpdate
) -> ScheduledUpdate:
    if keys is None:
        return scheduled
    who = signed_by or ("registry" if scheduled.publisher is None else "none")
    if who == "none":
        return scheduled
    if who == "self":
        key = _own_key(scenario, scheduled.publisher or "registry")
    elif scheduled.publisher is None:
        key = keys.registry_key(scheduled.at_s)
    else:
        key = keys.registry[0]  # a rogue publisher with the registry's first key, stolen
    return ScheduledUpdate(scheduled.at_s, keys.sign(key, scheduled.update, scheduled.at_s), scheduled.publisher)


def _crafted(
    scenario: Scenario, attack: UpdateChannelAttackSpec, setup: ChannelSetup, images: torch.Tensor
) -> CraftedMessage:
    models_topic = scenario.registry.topic
    label = attack.label
    if attack.kind == "replay":
        old = setup.updates[attack.update].update
        return CraftedMessage(attack.at, label, models_topic, old, old.version)
    if attack.kind == "rollback":
        metadata = b""
        if setup.keys is not None:  # the metadata the starting model was provisioned with, captured
            first = ModelUpdate(INITIAL_MODEL_VERSION, setup.initial_blob)
            metadata = setup.keys.sign(setup.keys.registry[0], first, 0.0).metadata
        payload = ModelUpdate(ROLLBACK_VERSION, setup.initial_blob, metadata)
        return CraftedMessage(attack.at, label, models_topic, payload, ROLLBACK_VERSION)
    version = setup.updates[attack.update].update.version
    gateway = attack.gateway or screening_gateways(scenario)[0]
    notice = Quarantine(version, images[:FORGED_FLAGGED_FRAMES].clone(), gateway)
    if attack.signed_by == "self":
        from iotbed.broker.wire import quarantine_body

        key = _own_key(scenario, f"{attack.kind}@{attack.at}")
        notice = Quarantine(version, notice.flagged, gateway, key.key_id, key.sign(quarantine_body(notice)))
    return CraftedMessage(attack.at, label, QUARANTINE_TOPIC, notice, version)
