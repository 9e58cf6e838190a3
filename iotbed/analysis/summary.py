"""The run summary: figures computed from the trace and the network's counters, as plain JSON data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iotbed.deployment import Deployment
from iotbed.nodes.edge_server import EdgeServer
from iotbed.sim.trace import DELIVERED, DROPPED, IN_FLIGHT, ModelEvent


def _percentiles_ms(latency_s: np.ndarray) -> dict[str, float | None]:
    if latency_s.size == 0:
        return {"mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    ms = latency_s * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def _count_by(values: np.ndarray) -> dict[str, int]:
    keys, counts = np.unique(values, return_counts=True)
    return {str(k): int(c) for k, c in zip(keys, counts)}


def link_rows(deployment: Deployment, sim_end_s: float) -> list[dict[str, Any]]:
    """One row per link direction (for links.csv)."""
    rows = []
    for group in deployment.link_groups:
        for key, directions in group.directions.items():
            for d in directions:
                rows.append(
                    {
                        "link": d.name,
                        "group": key,
                        "bandwidth_bps": d.transmitter.bandwidth_bps,
                        "packets_sent": d.stats.packets_sent,
                        "bytes_sent": d.stats.bytes_sent,
                        "packets_delivered": d.stats.packets_delivered,
                        "dropped_queue_full": d.stats.dropped_queue_full,
                        "dropped_loss": d.stats.dropped_loss,
                        "utilisation": d.stats.bytes_sent * 8.0 / d.transmitter.bandwidth_bps / sim_end_s,
                        "max_queue_packets": d.transmitter.max_occupancy,
                    }
                )
    return rows


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


def broker_stats(deployment: Deployment) -> dict[str, Any]:
    stats = deployment.broker.stats
    return {
        "node": deployment.broker.node,
        "publishes_received": stats.publishes_received,
        "messages_routed": stats.messages_routed,
        "no_subscriber": stats.no_subscriber,
        "queued_offline": stats.queued_offline,
        "queue_drops": stats.dropped_queue_full,
        "deepest_queue": stats.max_session_queue,
        "wills_published": stats.wills_published,
        "restarts": stats.restarts,
    }


def summarise(
    trace: pa.Table,
    *,
    scenario_name: str,
    seed: int,
    duration_s: float,
    sim_end_s: float,
    wall_time_s: float,
    model_info: dict[str, Any],
    links: list[dict[str, Any]],
    edges: list[EdgeServer],
    broker: dict[str, Any],
    model_events: list[ModelEvent],
    mode: str = "simulated",
    cameras: int | None = None,
    reference: np.ndarray | None = None,
    setup: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's figures. `reference` is, per frame, whether the bare model classifies the frame's image as
    captured (or, for an attacked frame, the attack's oblivious version) right: the undefended reference
    (NaN where there is none). `setup` (codecs, defenses, attacks) is copied into the summary."""
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

    by_attack = {
        str(label): {
            "frames": int((labels == label).sum()),
            "delivered": int((delivered & (labels == label)).sum()),
            "accuracy": accuracy(labels == label),
            "undefended_reference": reference_accuracy(labels == label),
        }
        for label in sorted(set(labels.tolist()) - {""})
    }
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
            "links": _link_groups(links),
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
        },
        **(setup or {}),
        "edge_servers": {
            e.name: {
                "batches": e.batches,
                "unknown_frames": e.unknown_frames,
                "frames_classified": int(((edge_names == e.name) & delivered).sum()),
                "mean_batch_size": float(((edge_names == e.name) & delivered).sum()) / e.batches if e.batches else None,
                "utilisation": e.busy_s / sim_end_s,
                "model_version": e.classifier.version,
            }
            for e in edges
        },
        "broker": broker,
        "model": model_info,
        "model_events": [
            {"time_s": e.time_s, "node": e.node, "event": e.event, "version": e.version, "size_bytes": e.size_bytes}
            for e in model_events
        ],
    }
