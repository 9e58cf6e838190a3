"""The run summary: figures computed from a run's tables (`iotbed.run_tables`), as plain JSON data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from iotbed.analysis.selective import aurc, e_aurc
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
    escalating: bool,
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
    if escalating or (resolver != "").any():  # an abstaining edge escalates nothing: no `escalated` figures
        resolved = scored & rejected & (resolver != "")
        final = trace.column("final_prediction").to_numpy() == trace.column("label").to_numpy()
        waited = trace.column("t_resolved").to_numpy() - trace.column("t_capture").to_numpy()
        escalated = {
            "rejected": int((scored & rejected).sum()),
            "resolved": int(resolved.sum()),
            "accuracy": float(final[resolved].mean()) if resolved.any() else None,
            "latency_ms": _percentiles_ms(waited[resolved]),
            # right at the edge or right in the cloud, over every scored frame (unresolved serve nothing)
            "system_accuracy": float(((correct & accepted) | (final & resolved)).sum() / scored.sum()),
        }
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
    escalating = any(d.get("reject", {}).get("escalates") for d in (setup or {}).get("defenses", {}).values())
    selective = _selective(trace, delivered, correct, attacked, conditions, escalating)
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
