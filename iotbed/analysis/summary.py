"""The run summary: figures computed from a run's tables (`iotbed.run_tables`), as plain JSON data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.compute as pc

from iotbed.analysis.selective import aurc, e_aurc
from iotbed.naming import group_of
from iotbed.nodes.cloud import escalation_topic
from iotbed.run_tables import RunTables
from iotbed.sim.trace import DELIVERED, DROPPED, IN_FLIGHT


def _percentiles_ms(latency_s: np.ndarray) -> dict[str, float | None]:
    if latency_s.size == 0:
        return {"mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    ms = latency_s * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def _count_by(values: np.ndarray) -> dict[str, int]:
    keys, counts = np.unique(values, return_counts=True)
    return {str(k): int(c) for k, c in zip(keys, counts)}


def _link_groups(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not rows:
        return out
    for key in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == key]
        util = np.array([r["utilisation"] for r in members])
        out[key] = {
            "links": len(members),
            "bytes": int(sum(r["bytes_sent"] for r in members)),
            "utilisation_mean": float(util.mean()),
            "utilisation_max": float(util.max()),
            "dropped_queue_full": int(sum(r["dropped_queue_full"] for r in members)),
            "dropped_loss": int(sum(r["dropped_loss"] for r in members)),
            "max_queue_packets": int(max(r["max_queue_packets"] for r in members)),
        }
    return out


def _selective(
    trace: Any,
    delivered: np.ndarray,
    correct: np.ndarray,
    attacked: np.ndarray,
    conditions: np.ndarray,
    escalates_to: dict[str, str],
    duration_s: float,
) -> dict[str, Any] | None:
    """The reject option's figures over the delivered frames an edge scored: coverage (the share accepted),
    selective risk (the error rate on accepted frames), system accuracy (right and accepted, over all scored:
    an abstention serves nothing), AURC and E-AURC of the score, and the rejection rate per kind of frame."""
    score = trace.column("score").to_numpy(zero_copy_only=False)
    scored = delivered & ~np.isnan(score)
    if not scored.any():
        return None
    rejected = trace.column("rejected").to_numpy(zero_copy_only=False).astype(bool)
    accepted = scored & ~rejected

    def figures(mask: np.ndarray) -> dict[str, Any]:
        m, a = scored & mask, accepted & mask
        if not m.any():
            return {"frames": 0}
        return {
            "frames": int(m.sum()),
            "coverage": float(a.sum() / m.sum()),
            "selective_risk": float(1.0 - correct[a].mean()) if a.any() else None,
            "system_accuracy": float((correct & a).sum() / m.sum()),
        }

    everything = np.ones(len(score), dtype=bool)
    resolver = trace.column("resolver").to_numpy(zero_copy_only=False)
    escalated: dict[str, Any] = {}
    if escalates_to or (resolver != "").any():  # an abstaining edge escalates nothing: no `escalated` figures
        escalated = _escalated(trace, scored, rejected, accepted, correct, resolver, escalates_to, duration_s)
    return {
        **figures(everything),
        **({"escalated": escalated} if escalated else {}),
        "accuracy_without_rejection": float(correct[scored].mean()),
        "aurc": aurc(score[scored], correct[scored]),
        "e_aurc": e_aurc(score[scored], correct[scored]),
        "clean": figures(~attacked & (conditions == "")),
        "attacked": figures(attacked),
        "by_condition": {str(c): figures(conditions == c) for c in sorted(set(conditions.tolist()) - {""})},
    }


def _map_values(values: np.ndarray, fn: Callable[[str], str]) -> np.ndarray:
    """`fn` of each value, computed once per distinct value (a trace has many rows, few node names)."""
    distinct, inverse = np.unique(values.astype(str), return_inverse=True)
    return np.array([fn(v) for v in distinct.tolist()], dtype=object)[inverse]


def _escalated(
    trace: Any,
    scored: np.ndarray,
    rejected: np.ndarray,
    accepted: np.ndarray,
    correct: np.ndarray,
    resolver: np.ndarray,
    escalates_to: dict[str, str],
    duration_s: float,
) -> dict[str, Any]:
    """What escalation did: resolved frames, their accuracy and latency per path (accepted at the edge, and
    through each resolver group: the trip there, the wait and review or classification), the system
    accuracy, and the escalations' bytes per second as their first hop carries them (each rejected frame
    republished once: the camera's PUBLISH, headers included, with the escalation topic)."""
    column = trace.column
    resolved = scored & rejected & (resolver != "")
    final = column("final_prediction").to_numpy() == column("label").to_numpy()
    t_capture, t_done = column("t_capture").to_numpy(), column("t_done").to_numpy()
    t_escalated, t_resolved = column("t_escalated").to_numpy(), column("t_resolved").to_numpy()
    edges = column("edge").to_numpy(zero_copy_only=False)
    target = _map_values(edges, lambda edge: escalates_to.get(edge, ""))
    sent = scored & rejected & (target != "")
    # The republished PUBLISH differs from the camera's only in its topic.
    topics = column("topic").to_numpy(zero_copy_only=False)
    cameras = column("camera").to_numpy(zero_copy_only=False)
    publish = column("publish_bytes").to_numpy()
    resend = [
        int(publish[i]) - len(topics[i]) + len(escalation_topic(target[i], cameras[i])) for i in np.flatnonzero(sent)
    ]
    groups = _map_values(resolver, lambda node: group_of(node) if node else "")
    by_resolver = {
        str(g): {
            "resolved": int((resolved & (groups == g)).sum()),
            "accuracy": float(final[resolved & (groups == g)].mean()),
            "latency_ms": _percentiles_ms((t_resolved - t_capture)[resolved & (groups == g)]),
            "transit_ms": _percentiles_ms((t_escalated - t_done)[resolved & (groups == g)]),
            "resolve_ms": _percentiles_ms((t_resolved - t_escalated)[resolved & (groups == g)]),
        }
        for g in sorted(set(groups[resolved].tolist()))
    }
    return {
        "rejected": int((scored & rejected).sum()),
        "resolved": int(resolved.sum()),
        "accuracy": float(final[resolved].mean()) if resolved.any() else None,
        "latency_ms": _percentiles_ms((t_resolved - t_capture)[resolved]),
        "accepted_latency_ms": _percentiles_ms((t_done - t_capture)[accepted]),
        "by_resolver": by_resolver,
        "bytes_per_s": float(sum(resend)) / duration_s,
        # right at the edge or right where it was escalated, over every scored frame (unresolved serve nothing)
        "system_accuracy": float(((correct & accepted) | (final & resolved)).sum() / scored.sum()),
    }


def _reviewers(rows: list[Any], open_s: float) -> dict[str, Any]:
    """Each review desk: frames reviewed, utilisation (busy reviewer-seconds over reviewers x the whole run:
    reviews go on after the cameras stop), mean wait in the queue, the longest queue and what still waited
    at the end."""
    return {
        r.name: {
            "reviewers": r.reviewers,
            "reviewed": r.reviewed,
            "utilisation": r.busy_s / (r.reviewers * open_s),
            "mean_wait_s": r.waited_s / r.reviewed if r.reviewed else None,
            "max_queue": r.max_queue,
            "waiting_at_end": r.waiting_at_end,
            "unknown_frames": r.unknown_frames,
        }
        for r in rows
    }


# TcpStats counters the summary adds up per direction (tcp.csv has them all, per connection end).
TCP_COUNTERS = (
    "segments_sent",
    "bytes_sent",
    "wire_bytes",
    "retransmissions",
    "retransmits_rto",
    "retransmits_fast",
    "retransmits_tlp",
    "timeouts",
    "fast_recoveries",
    "acks_sent",
    "dup_acks",
    "duplicates_received",
    "messages_delivered",
)
TCP_RETRANSMISSIONS = ("retransmissions", "retransmits_rto", "retransmits_fast", "retransmits_tlp", "timeouts")
DIRECTIONS = {"client": "client_to_broker", "broker": "broker_to_client"}


def simulated_shaping(transport: str) -> dict[str, Any]:
    """The summary's `shaping` for a simulation: which transport carried MQTT, and so what repaired losses."""
    if transport == "tcp":
        return {
            "mode": "simulated",
            "transport": "tcp",
            "loss": "TCP resends lost segments (RTO, fast retransmit, RACK, tail loss probe; iotbed.sim.tcp) and "
            "delivers in order; MQTT resends unacknowledged messages only when a session resumes",
        }
    return {
        "mode": "simulated",
        "transport": "udp",
        "loss": "one packet per MQTT packet, as MQTT-SN over UDP: a lost packet is lost, and MQTT resends QoS 1/2 "
        "messages after retry_interval",
    }


def tcp_section(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's `tcp` section from tcp.csv's rows (one per end of each client's connection): each
    direction's totals, and the retransmissions by what triggered them per client group."""

    def total(members: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, int]:
        return {k: int(sum(r[k] for r in members)) for k in keys}

    by_group: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(group_of(r["client"]) for r in rows):
        members = [r for r in rows if group_of(r["client"]) == group]
        by_group[group] = {
            direction: total([r for r in members if r["end"] == end], TCP_RETRANSMISSIONS)
            for end, direction in DIRECTIONS.items()
        }
    return {
        "connections": len({r["client"] for r in rows}),
        **{
            direction: total([r for r in rows if r["end"] == end], TCP_COUNTERS)
            for end, direction in DIRECTIONS.items()
        },
        "by_group": by_group,
    }


def summarise(
    tables: RunTables,
    *,
    scenario_name: str,
    seed: int,
    duration_s: float,
    sim_end_s: float,
    wall_time_s: float,
    model_info: dict[str, Any],
    mode: str = "simulated",
    cameras: int | None = None,
    reference: np.ndarray | None = None,
    setup: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's figures. `reference` is, per frame, whether the bare model classifies the frame's image as
    captured (or, for an attacked frame, the attack's oblivious version) right: the undefended reference
    (NaN where there is none). `setup` (codecs, defenses, attacks) is copied into the summary."""
    trace = tables.trace
    status = trace.column("status").to_numpy(zero_copy_only=False)
    delivered = status == DELIVERED
    dropped = status == DROPPED
    reasons = trace.column("drop_reason").to_numpy(zero_copy_only=False)[dropped]
    latency = trace.column("latency_s").to_numpy()[delivered]
    correct = trace.column("correct").to_numpy(zero_copy_only=False)
    attacked = trace.column("attack").to_numpy(zero_copy_only=False) != ""
    payload = trace.column("payload_bytes").to_numpy()
    n = len(status)
    n_delivered = int(delivered.sum())

    def accuracy(mask: np.ndarray) -> float | None:
        m = delivered & mask
        return float(correct[m].mean()) if m.any() else None

    edge_names = trace.column("edge").to_numpy(zero_copy_only=False)
    labels = trace.column("attack").to_numpy(zero_copy_only=False)
    n_cameras = cameras or len(set(trace.column("camera").to_pylist())) or 1

    def reference_accuracy(mask: np.ndarray) -> float | None:
        if reference is None:
            return None
        values = reference[delivered & mask]
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else None

    def breakdown(column: np.ndarray) -> dict[str, dict[str, Any]]:
        """Frames, delivered, accuracy and the undefended reference per non-empty value of `column`."""
        return {
            str(label): {
                "frames": int((column == label).sum()),
                "delivered": int((delivered & (column == label)).sum()),
                "accuracy": accuracy(column == label),
                "undefended_reference": reference_accuracy(column == label),
            }
            for label in sorted(set(column.tolist()) - {""})
        }

    conditions = trace.column("condition").to_numpy(zero_copy_only=False)
    by_attack, by_condition = breakdown(labels), breakdown(conditions)
    escalates_to = {
        edge: d["reject"]["to"]
        for edge, d in (setup or {}).get("defenses", {}).items()
        if d.get("reject", {}).get("escalates")
    }
    selective = _selective(trace, delivered, correct, attacked, conditions, escalates_to, duration_s)
    publish = trace.column("publish_bytes").to_numpy()
    return {
        "scenario": scenario_name,
        "mode": mode,
        "seed": seed,
        "sim_time_s": duration_s,
        "sim_end_s": sim_end_s,
        "wall_time_s": wall_time_s,
        "frames": {
            "captured": n,
            "delivered": n_delivered,
            "dropped": _count_by(reasons),
            "dropped_total": int(dropped.sum()),
            "in_flight": int((status == IN_FLIGHT).sum()),
            "retries": int(pc.sum(trace.column("retries")).as_py() or 0),
            "duplicates": int(pc.sum(trace.column("duplicates")).as_py() or 0),
            "delivery_ratio": n_delivered / n if n else None,
        },
        "throughput": {
            "frames_per_s": n_delivered / duration_s,
            "goodput_mbps": float(payload[delivered].sum()) * 8.0 / duration_s / 1e6,
        },
        "latency_ms": _percentiles_ms(latency),
        "bandwidth": {
            "payload_bytes_per_frame_mean": float(payload.mean()) if n else None,
            "bytes_per_frame_mean": float(trace.column("publish_bytes").to_numpy().mean()) if n else None,
            "wire_bytes_per_frame_mean": float(trace.column("wire_bytes").to_numpy().mean()) if n else None,
            # what a camera offers its first link: MQTT PUBLISH with TCP/IP headers, first transmissions only
            "per_camera_kbps": float(publish.sum()) * 8.0 / duration_s / n_cameras / 1e3,
            "links": _link_groups(tables.links),
        },
        "accuracy": {
            "overall": accuracy(np.ones(n, dtype=bool)),
            "clean": accuracy(~attacked),
            "attacked": accuracy(attacked),
            "undefended_reference": {
                "overall": reference_accuracy(np.ones(n, dtype=bool)),
                "clean": reference_accuracy(~attacked),
                "attacked": reference_accuracy(attacked),
            },
            "by_attack": by_attack,
            "by_condition": by_condition,
        },
        **({"selective": selective} if selective else {}),
        **({"reviewers": _reviewers(tables.reviewers, sim_end_s)} if tables.reviewers else {}),
        **(setup or {}),
        "edge_servers": {
            e.name: {
                "batches": e.batches,
                "unknown_frames": e.unknown_frames,
                "frames_classified": int(((edge_names == e.name) & delivered).sum()),
                "mean_batch_size": float(((edge_names == e.name) & delivered).sum()) / e.batches if e.batches else None,
                "utilisation": e.busy_s / duration_s,  # over the traffic period, as the links
                "model_version": e.model_version,
            }
            for e in tables.edges
        },
        "broker": tables.broker,
        "model": model_info,
        "model_events": [
            {
                "time_s": e.time_s,
                "node": e.node,
                "event": e.event,
                "version": e.version,
                "size_bytes": e.size_bytes,
                "reason": e.reason,
            }
            for e in tables.model_events
        ],
    }
