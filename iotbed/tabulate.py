"""Turning a finished run's nodes into the tables analysis reads (`iotbed.run_tables`), for both runtimes.

`tables_from` takes the nodes one process ran: a simulation's, a one-process live run's, or one live
worker's share, so each worker measures the models it holds (a repaired model never leaves the process that
made it). `run_tables_from` completes a run's tables with what needs no node: the backdoored updates and how
the clean and the backdoored model score offline. `sim_tables` is the simulation's whole path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from iotbed.deployment import Artefacts, BackdoorInUpdate, Deployment, Nodes
from iotbed.naming import repaired_version
from iotbed.nodes.edge_server import EdgeServer
from iotbed.nodes.gateway import ScreeningGateway
from iotbed.run_tables import (
    AttackCount,
    BackdoorUpdate,
    CalibrationScore,
    EdgeRow,
    NodeTables,
    OfflineScore,
    RepairRow,
    ReviewerRow,
    RunTables,
    ScreenedFrame,
    ScreenRow,
)
from iotbed.sim.tcp import TcpConnection
from iotbed.sim.trace import TraceRecorder


def tables_from(
    nodes: Nodes, recorder: TraceRecorder, artefacts: Artefacts, chosen: set[str] | None = None
) -> NodeTables:
    """What the nodes of the `chosen` clients (all by default) recorded, with the STRIP calibration scores
    and the offline scores of the repaired models they hold. Attack counts come from every window: a
    process counts only the frames its own cameras (or proxies) changed."""

    def mine(name: str) -> bool:
        return chosen is None or name in chosen

    edges = [e for e in nodes.edges if mine(e.name)]
    gateways = [g for g in nodes.gateways if mine(g.name)]
    screens, screened = _screens(gateways)
    return NodeTables(
        edges=[EdgeRow(e.name, e.batches, e.busy_s, e.classifier.version, e.unknown_frames) for e in edges],
        reviewers=[
            ReviewerRow(
                d.name,
                d.config.reviewers,
                d.reviewed,
                d.busy_s,
                d.waited_s,
                d.max_queue,
                len(d.waiting.items),
                d.unknown_frames,
            )
            for d in nodes.reviewers
            if mine(d.name)
        ],
        model_events=list(recorder.model_events),
        screens=screens,
        screened=screened,
        calibration=_calibration(gateways, artefacts.backdoors),
        repairs=[_repair_row(e.name, r) for e in edges for r in e.repairs],
        offline=_repaired_scores(edges, artefacts),
        attacks=[AttackCount(w.label, w.frames_attacked) for w in nodes.windows],
    )


def run_tables_from(nodes: NodeTables, *, trace: pa.Table, broker: dict[str, Any], artefacts: Artefacts) -> RunTables:
    """A run's tables: its nodes' (one process's, or the workers' merged), with the backdoored updates and
    the offline scores of the model the edge starts with and of each backdoored update."""
    reference = [
        score
        for version, bd in artefacts.backdoors.items()
        for score in (
            _offline_score(artefacts.model, version, "clean_model", bd, artefacts),
            _offline_score(bd.model, version, "backdoored", bd, artefacts),
        )
    ]
    backdoors = [_backdoor_update(v, bd) for v, bd in artefacts.backdoors.items()]
    nodes = dataclasses.replace(nodes, offline=[*reference, *nodes.offline])
    return RunTables.of(nodes, trace=trace, broker=broker, backdoors=backdoors)


def sim_tables(deployment: Deployment, artefacts: Artefacts) -> RunTables:
    nodes = tables_from(deployment.nodes, deployment.recorder, artefacts)
    nodes.links = link_rows(deployment)
    trace = deployment.recorder.to_table()
    return run_tables_from(nodes, trace=trace, broker=broker_stats(deployment), artefacts=artefacts)


def link_rows(deployment: Deployment) -> list[dict[str, Any]]:
    """One row per simulated link direction (for links.csv). Utilisation is over the traffic period (the
    scenario's duration), as offered load is, not over the drain after it, when the cameras are quiet."""
    rows = []
    period = deployment.capture_until_s
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
                        "utilisation": d.stats.bytes_sent * 8.0 / d.transmitter.bandwidth_bps / period,
                        "max_queue_packets": d.transmitter.max_occupancy,
                    }
                )
    return rows


def tcp_rows(deployment: Deployment) -> list[dict[str, Any]]:
    """One row per end of each client's TCP connection to the simulated broker (tcp.csv): what it sent,
    what it resent and why (a timeout, duplicate ACKs / RACK / a partial ACK, a tail loss probe), and its last
    RTT estimate. Empty with `transport: udp`; a client on the broker's node (loopback) has none."""
    rows = []
    for client in deployment.broker.clients:
        connection = client.tcp
        if not isinstance(connection, TcpConnection):
            continue
        for role, end in (("client", connection.a), ("broker", connection.b)):
            stats = end.stats
            rows.append(
                {
                    "client": client.client_id,
                    "end": role,
                    "node": end.node,
                    "peer": end.peer.node,
                    **{f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)},
                    "retransmissions": stats.retransmissions,
                    "srtt_s": end.srtt,
                    "min_rtt_s": end.min_rtt if end.min_rtt != float("inf") else None,
                    "rto_s": end.rto,
                }
            )
    return rows


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


def _screens(gateways: list[ScreeningGateway]) -> tuple[list[ScreenRow], list[ScreenedFrame]]:
    screens: list[ScreenRow] = []
    screened: list[ScreenedFrame] = []
    for g in gateways:
        for n, s in enumerate(g.stats.screens):
            screens.append(
                ScreenRow(
                    g.name,
                    n,
                    s.time_s,
                    s.version,
                    s.n_frames,
                    s.n_flagged,
                    s.p_value,
                    s.backdoored,
                    s.compute_s,
                    s.boundary,
                    s.kind,
                )
            )
            for frame_id, score in zip(s.frame_ids.tolist(), s.scores.tolist()):
                screened.append(ScreenedFrame(g.name, n, frame_id, score))
    return screens, screened


def _calibration(gateways: list[ScreeningGateway], backdoors: dict[int, BackdoorInUpdate]) -> list[CalibrationScore]:
    """For each backdoored version and each kind of screen, the scores of the clean calibration images under it,
    at the first gateway of that kind that screened it (a group's gateways share images and settings, and the
    seed is fixed)."""
    rows: list[CalibrationScore] = []
    for version in backdoors:
        done: set[str] = set()
        for g in gateways:
            model = g.model_for(version)
            kind = g.settings.kind
            if kind in done or model is None or not any(s.version == version for s in g.stats.screens):
                continue
            done.add(kind)
            rows += [CalibrationScore(g.name, version, e) for e in _calibration_scores(g, model).tolist()]
    return rows


def _calibration_scores(g: ScreeningGateway, model: torch.nn.Module) -> torch.Tensor:
    """The scores a gateway's screen gives its clean calibration images under `model` (low = trojaned)."""
    generator = torch.Generator().manual_seed(0)
    if g.settings.kind == "sentinet":
        from iotbed.defenses.sentinet import SentinetDetector, detection_scores

        sentinet = SentinetDetector(model, g.overlays, n_pastes=g.settings.n_blends, generator=generator)
        scores = sentinet.score(g.calibration)
        return detection_scores(sentinet.calibrate_scores(scores, frr=g.settings.frr), scores)
    from iotbed.defenses.strip import StripDetector

    return StripDetector(model, g.overlays, n_blends=g.settings.n_blends, generator=generator).score(g.calibration)


def _repair_row(edge: str, repair: dict[str, Any]) -> RepairRow:
    return RepairRow(
        edge,
        repair["quarantined_version"],
        repair["version"],
        repair["flagged"],
        repair["started_s"],
        repair["published_s"],
        repair["sim_seconds"],
        repair["wall_seconds"],
        repair["flops"],
        tuple(repair["gateways"]),
        tuple(repair["kept"]),
        repair["d_valid"],
        repair["d_valid_from"],
        repair["d_valid_refused"],
        repair["kept_generated"],
    )


def _repaired_scores(edges: list[EdgeServer], artefacts: Artefacts) -> list[OfflineScore]:
    held = {v: m for e in edges for v, m in e.held.items()}
    return [
        _offline_score(held[repaired_version(version)], version, "repaired", bd, artefacts)
        for version, bd in artefacts.backdoors.items()
        if repaired_version(version) in held
    ]


def _backdoor_update(version: int, bd: BackdoorInUpdate) -> BackdoorUpdate:
    parts = getattr(bd.trigger, "parts", ())
    return BackdoorUpdate(
        version,
        bd.update_index,
        bd.target,
        bd.trigger.name,
        tuple(p.name for p in parts),
        tuple(int(k) for k in bd.frame_triggers) if bd.frame_triggers is not None else (),
        bd.source_classes,
    )


def _offline_score(
    model: nn.Module, version: int, kind: str, bd: BackdoorInUpdate, artefacts: Artefacts
) -> OfflineScore:
    """`model`'s clean accuracy, and success rate of `bd`'s trigger, on the cameras' test split: on the
    images the backdoor aims at (its source classes, or all but the target), each of several triggers
    also alone, and a source-specific one's flip rate on the other classes."""
    from iotbed.attacks.backdoor import backdoor_metrics
    from iotbed.data.dataset import ImageDataset

    labels = torch.from_numpy(artefacts.labels)
    classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    ds = ImageDataset("test", artefacts.images, labels, classes, "the cameras' test split")
    m = backdoor_metrics(model, ds, bd.trigger, bd.target, source_classes=bd.source_classes or None)
    return OfflineScore(
        version,
        kind,
        m.clean_accuracy,
        m.attack_success_rate,
        m.robust_accuracy,
        m.n_clean,
        m.n_triggered,
        m.attack_success_rate_by_trigger,
        m.non_source_flip_rate,
        m.n_non_source,
    )
