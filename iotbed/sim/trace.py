"""The trace: one row per frame, written as Parquet with a fixed schema.

Nodes and the network update a frame's record as it travels (bytes charged on every link, timestamps at
each hop, retries, duplicates, the verdict at the edge). Statuses are settled once at the end, so a frame
that was lost once and then retransmitted counts as delivered, with its retry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from iotbed.broker.messages import Publish
from iotbed.sim.links import LinkDirection
from iotbed.sim.network import Packet
from iotbed.sim.tcp import TcpSegment

DELIVERED = "delivered"
DROPPED = "dropped"
IN_FLIGHT = "in_flight"
# Losses after which a QoS 1/2 frame is still held by MQTT and sent again (after `retry_interval` with
# `transport: udp`, on the next connection after "tcp_closed").
TRANSIENT_LOSSES = frozenset({"link_loss", "queue_full", "broker_down", "tcp_closed"})


class FrameRecord:
    __slots__ = (
        "frame_id",
        "camera",
        "topic",
        "image_index",
        "label",
        "payload_bytes",
        "publish_bytes",
        "qos",
        "t_capture",
        "t_first_hop",
        "t_broker",
        "t_broker_ack",
        "t_edge",
        "t_infer_start",
        "t_done",
        "wire_bytes",
        "retries",
        "losses",
        "duplicates",
        "drop_reason",
        "drop_link",
        "edge",
        "model_version",
        "prediction",
        "attack",
        "condition",
        "score",
        "rejected",
        "detect_score",
        "detected",
        "resolver",
        "final_prediction",
        "t_escalated",
        "t_resolved",
        "encrypted",
        "t_encrypted",
        "t_result",
        "result_bytes",
        "round_trips",
        "round_bytes",
    )

    def __init__(
        self,
        frame_id: int,
        camera: str,
        topic: str,
        image_index: int,
        label: int,
        payload_bytes: int,
        publish_bytes: int,
        qos: int,
        t_capture: float,
    ) -> None:
        self.frame_id = frame_id
        self.camera = camera
        self.topic = topic
        self.image_index = image_index
        self.label = label
        self.payload_bytes = payload_bytes
        self.publish_bytes = publish_bytes
        self.qos = qos
        self.t_capture = t_capture
        self.t_first_hop = -1.0
        self.t_broker = -1.0  # arrival at the broker (simulation only: a live run cannot see it)
        self.t_broker_ack = -1.0  # the publisher holds the broker's PUBACK (QoS 2: PUBCOMP); QoS 0: never
        self.t_edge = -1.0
        self.t_infer_start = -1.0
        self.t_done = -1.0
        self.wire_bytes = 0
        self.retries = 0
        self.losses = 0
        self.duplicates = 0
        self.drop_reason = ""
        self.drop_link = ""
        self.edge = ""
        self.model_version = -1
        self.prediction = -1
        self.attack = ""
        self.condition = ""  # the camera condition it was captured under (`fog-3`), if any
        self.score = math.nan  # the edge's confidence score, with the reject option
        self.rejected = False  # the edge abstained on it
        self.detect_score = math.nan  # the edge's detector (Defed): above 1 where it flagged the frame
        self.detected = False  # the detector flagged it, and relabelled it
        self.resolver = ""  # the cloud or review desk that resolved it after the edge escalated it
        self.final_prediction = -1  # its verdict
        self.t_escalated = -1.0  # the escalated frame reached its resolver (then queued, classified or reviewed)
        self.t_resolved = -1.0
        self.encrypted = False  # sent as CKKS ciphertexts (`privacy:`)
        self.t_encrypted = -1.0  # the camera finished encrypting it
        self.t_result = -1.0  # its encrypted result reached the camera (then decrypted: t_done)
        self.result_bytes = 0  # the encrypted result's payload
        self.round_trips = 0  # interactive: ReLU rounds with the key holder
        self.round_bytes = 0  # interactive: the payloads of both legs of every round


TRACE_SCHEMA = pa.schema(
    [
        ("frame_id", pa.int64()),
        ("camera", pa.string()),
        ("topic", pa.string()),
        ("image_index", pa.int32()),
        ("label", pa.int16()),
        ("payload_bytes", pa.int32()),
        ("publish_bytes", pa.int32()),
        ("qos", pa.int8()),
        ("t_capture", pa.float64()),
        ("t_first_hop", pa.float64()),
        ("t_broker", pa.float64()),
        ("t_broker_ack", pa.float64()),
        ("t_edge", pa.float64()),
        ("t_infer_start", pa.float64()),
        ("t_done", pa.float64()),
        ("latency_s", pa.float64()),
        ("wire_bytes", pa.int64()),
        ("retries", pa.int32()),
        ("losses", pa.int32()),
        ("duplicates", pa.int32()),
        ("status", pa.string()),
        ("drop_reason", pa.string()),
        ("drop_link", pa.string()),
        ("edge", pa.string()),
        ("model_version", pa.int64()),  # versions are 32-bit unsigned on the wire
        ("prediction", pa.int16()),
        ("correct", pa.bool_()),
        ("attack", pa.string()),
        ("condition", pa.string()),
        ("score", pa.float64()),
        ("rejected", pa.bool_()),
        ("detect_score", pa.float64()),
        ("detected", pa.bool_()),
        ("resolver", pa.string()),
        ("final_prediction", pa.int64()),
        ("t_escalated", pa.float64()),
        ("t_resolved", pa.float64()),
        ("encrypted", pa.bool_()),
        ("t_encrypted", pa.float64()),
        ("t_result", pa.float64()),
        ("result_bytes", pa.int32()),
        ("round_trips", pa.int8()),
        ("round_bytes", pa.int32()),
    ]
)


@dataclass(frozen=True)
class ModelEvent:
    time_s: float
    node: str
    event: str  # published, adopted, refused, quarantined, rolled_back, repaired, stale, attack, ...
    version: int
    size_bytes: int
    reason: str = ""  # why a message was refused (`iotbed.trust.verifier`), or which attack sent it


# What an edge server writes into a frame's record; the camera's side writes the rest.
EDGE_FIELDS = (
    "t_edge",
    "edge",
    "t_infer_start",
    "t_done",
    "prediction",
    "model_version",
    "duplicates",
    "score",
    "rejected",
    "detect_score",
    "detected",
    "resolver",  # clouds and review desks run beside the edge servers, in the same worker
    "final_prediction",
    "t_escalated",
    "t_resolved",
)


# What the key owner, not the edge, writes into an encrypted frame's record: it decrypts the prediction.
KEY_OWNER_FIELDS = frozenset({"prediction", "t_done"})


class TraceRecorder:
    """Collects frame records and model events for one run; the only maker of frame records, and the
    writer of the trace table. Frame ids are `first_id + id_step * k` for the k-th frame, so recorders in
    several processes hand out ids that never collide. A recorder that takes `arrivals` (a live run's edge
    worker, whose frames were captured in other processes) keeps a blank record per frame id it is asked
    for, for the edge's side of it."""

    def __init__(self, first_id: int = 0, id_step: int = 1) -> None:
        self.records: list[FrameRecord] = []
        self.model_events: list[ModelEvent] = []
        self.first_id = first_id
        self.id_step = id_step
        self.arrivals: dict[int, FrameRecord] | None = None

    def take_arrivals(self) -> None:
        self.arrivals = {}

    def record(self, frame_id: int) -> FrameRecord | None:
        """The record of frame `frame_id`, or None for an id this run never handed out (a forged frame)."""
        if self.arrivals is not None:
            found = self.arrivals.get(frame_id)
            if found is None:
                found = self.arrivals[frame_id] = FrameRecord(frame_id, "", "", -1, -1, 0, 0, 0, -1.0)
            return found
        k, rest = divmod(frame_id - self.first_id, self.id_step)
        return self.records[k] if rest == 0 and 0 <= k < len(self.records) else None

    def frames(self) -> list[FrameRecord]:
        """Every record this recorder holds: the frames captured here, or the arrivals it was asked for."""
        return list(self.arrivals.values()) if self.arrivals is not None else self.records

    def new_frame(
        self,
        camera: str,
        topic: str,
        image_index: int,
        label: int,
        payload_bytes: int,
        publish_bytes: int,
        qos: int,
        t_capture: float,
    ) -> FrameRecord:
        record = FrameRecord(
            self.first_id + self.id_step * len(self.records),
            camera,
            topic,
            image_index,
            label,
            payload_bytes,
            publish_bytes,
            qos,
            t_capture,
        )
        self.records.append(record)
        return record

    # Network and broker listeners: a lost packet about a frame is noted; the status is settled at the end.
    # A TCP segment lost on a link or in a queue is only counted: TCP sends it again, so it is no reason for
    # the frame to be lost; one that arrives at a closed connection ("tcp_closed") is.
    def on_packet_dropped(self, packet: Packet, reason: str, link: LinkDirection | None) -> None:
        record = packet.frame
        if isinstance(record, FrameRecord):
            record.losses += 1
            if reason != "tcp_closed" and type(packet.message) is TcpSegment:
                return
            record.drop_reason = reason
            record.drop_link = link.name if link is not None else ""

    def on_undelivered(self, message: Publish, reason: str) -> None:
        record = message.record
        if isinstance(record, FrameRecord):
            record.drop_reason = reason
            record.drop_link = ""

    def on_not_connected(self, message: Publish) -> None:
        record = message.record
        if isinstance(record, FrameRecord):
            record.drop_reason = "not_connected"

    def on_give_up(self, message: Publish) -> None:
        record = message.record
        if isinstance(record, FrameRecord):
            record.drop_reason = "max_retries"

    def on_acked(self, message: Publish, now: float) -> None:
        record = message.record
        if record is not None and record.t_broker_ack < 0:
            record.t_broker_ack = now

    def on_retry(self, message: Publish) -> None:
        record = message.record
        if isinstance(record, FrameRecord):
            record.retries += 1

    def to_table(self) -> pa.Table:
        records = self.records
        columns: dict[str, Any] = {name: [getattr(r, name) for r in records] for name in FrameRecord.__slots__}
        t_done = np.asarray(columns["t_done"], dtype=np.float64)
        t_capture = np.asarray(columns["t_capture"], dtype=np.float64)
        delivered = t_done >= 0
        # A QoS 1/2 frame whose last packet was lost is still being retransmitted: in flight, not dropped.
        has_reason = np.asarray(
            [
                bool(reason) and (qos == 0 or reason not in TRANSIENT_LOSSES)
                for reason, qos in zip(columns["drop_reason"], columns["qos"])
            ],
            dtype=bool,
        )
        status = np.where(delivered, DELIVERED, np.where(has_reason, DROPPED, IN_FLIGHT))
        columns["status"] = status.tolist()
        columns["drop_reason"] = np.where(delivered, "", np.asarray(columns["drop_reason"], dtype=object)).tolist()
        columns["drop_link"] = np.where(delivered, "", np.asarray(columns["drop_link"], dtype=object)).tolist()
        columns["latency_s"] = np.where(delivered, t_done - t_capture, np.nan)
        prediction = np.asarray(columns["prediction"], dtype=np.int64)
        columns["correct"] = (delivered & (prediction == np.asarray(columns["label"], dtype=np.int64))).tolist()
        return pa.table(
            {field.name: pa.array(columns[field.name], type=field.type) for field in TRACE_SCHEMA}, schema=TRACE_SCHEMA
        )


def model_events_table(events: list[ModelEvent]) -> pa.Table:
    """Model events as written to model_events.csv."""
    return pa.table(
        {
            "time_s": pa.array([e.time_s for e in events], pa.float64()),
            "node": pa.array([e.node for e in events], pa.string()),
            "event": pa.array([e.event for e in events], pa.string()),
            "version": pa.array([e.version for e in events], pa.int64()),
            "size_bytes": pa.array([e.size_bytes for e in events], pa.int64()),
            "reason": pa.array([e.reason for e in events], pa.string()),
        }
    )
