"""The summary's `security` section: what happened on the model-update channel, from the model events.

Every refusal by reason (overall and per node), the devices that went stale (their metadata expired: a
freeze) or learnt of a version they never received (`behind`), key rotations, and per attack (rogue and
stolen-key publishers, `security.attacks`) what the nodes did with it: how many refused it, for which
reasons, and how many took it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from iotbed.naming import update_version
from iotbed.run_tables import RunTables
from iotbed.scenario import Scenario
from iotbed.sim.trace import ModelEvent
from iotbed.units import format_duration


def _outcome(events: list[ModelEvent], sender: str, at: float, version: int, quarantine: bool) -> dict[str, Any]:
    after = [e for e in events if e.time_s >= at and e.version == version and e.node != sender]
    if quarantine:
        refused = [e for e in after if e.event == "refused" and e.reason.startswith("quarantine:")]
        taken = [e for e in after if e.event == "quarantine_accepted"]
    else:
        refused = [e for e in after if e.event == "refused" and not e.reason.startswith("quarantine:")]
        taken = [e for e in after if e.event == "adopted"]
    return {
        "refused": dict(sorted(Counter(e.reason for e in refused).items())),
        "taken_by": sorted({e.node for e in taken}),
    }


def security_section(tables: RunTables, scenario: Scenario) -> dict[str, Any] | None:
    """None for a run with nothing on the update channel to report."""
    events = tables.model_events
    security = scenario.security
    rogue = [e for e in events if e.event == "published" and e.node.startswith("rogue@")]
    attacks = [e for e in events if e.event == "attack"]
    if not (security.signing or security.attacks or rogue):
        return None
    refused = [e for e in events if e.event == "refused"]
    by_node: dict[str, Counter[str]] = {}
    for e in refused:
        by_node.setdefault(e.node, Counter())[e.reason] += 1
    stale = [e for e in events if e.event == "stale"]
    rows = []
    for i, spec in enumerate(scenario.registry.updates):
        if spec.publisher is None:
            continue
        sender, version = f"rogue@{spec.publisher}", update_version(i)
        sent = next((e.time_s for e in rogue if e.node == sender and e.version == version), spec.at)
        rows.append(
            {"attack": f"rogue@{format_duration(spec.at)}", "sender": sender, "time_s": sent, "version": version}
        )
        rows[-1].update(_outcome(events, sender, sent, version, quarantine=False))
    for e in attacks:
        rows.append({"attack": e.reason, "sender": e.node, "time_s": e.time_s, "version": e.version})
        rows[-1].update(_outcome(events, e.node, e.time_s, e.version, quarantine=e.reason.startswith("forged_")))
    for freeze in (a for a in security.attacks if a.kind == "freeze"):
        held = [e for e in events if e.event == "held" and freeze.at <= e.time_s < (freeze.stop or freeze.at)]
        went_stale = [e for e in stale if e.time_s >= freeze.at]
        rows.append(
            {
                "attack": freeze.label,
                "sender": "registry",
                "time_s": freeze.at,
                "held_messages": len(held),
                "stale": sorted({e.node for e in went_stale}),
                "first_stale_s": min((e.time_s for e in went_stale), default=None),
            }
        )
    return {
        "signing": security.signing,
        "refused": dict(sorted(Counter(e.reason for e in refused).items())),
        "refused_by_node": {node: dict(sorted(c.items())) for node, c in sorted(by_node.items())},
        "stale": [{"node": e.node, "time_s": e.time_s, "version": e.version} for e in stale],
        "behind": [{"node": e.node, "time_s": e.time_s, "version": e.version} for e in events if e.event == "behind"],
        "key_rotations": sum(e.event == "key_rotated" for e in events),
        "attacks": sorted(rows, key=lambda r: r["time_s"]),
    }
