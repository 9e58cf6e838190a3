"""Where escalated frames go: the reject option's `escalate` sends a rejected frame over the network to a
`clouds:` group (a stronger model on its own device profile) or a `reviewers:` group (people at a review
desk, `iotbed.nodes.reviewers`). Both write the final verdict into the frame's record.

An edge republishes a rejected frame on `escalations/<group>/<camera>`, so each group hears only its own
frames; the frame travels the network like any other message (the WAN link's bytes, queueing and delay),
and its resolver looks its record up by frame id.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import simpy

from iotbed.broker.messages import Publish
from iotbed.broker.transport import Transport
from iotbed.broker.wire import ESCALATIONS_ROOT
from iotbed.naming import group_of
from iotbed.nodes.batching import FrameBatcher
from iotbed.nodes.classifier import EdgeClassifier
from iotbed.nodes.payloads import Frame
from iotbed.sim.clock import recording_clock
from iotbed.sim.devices import DeviceProfile
from iotbed.sim.trace import FrameRecord, TraceRecorder

ESCALATIONS_FILTER = f"{ESCALATIONS_ROOT}/#"


def escalation_topic(group: str, camera: str) -> str:
    return f"{ESCALATIONS_ROOT}/{group}/{camera}"


def escalations_filter(group: str) -> str:
    """What a resolver group subscribes to: its own escalations, shared among its nodes."""
    return f"$share/{group}/{ESCALATIONS_ROOT}/{group}/#"


class EscalationResolver:
    """Takes the escalated frames of a group's topic: each once (QoS 1 duplicates ignored), and only those
    that an edge escalating to this group rejected, on the topic of the frame's own camera; anything else
    (forged, replayed, or meant for another group) is counted in `unknown_frames` and dropped."""

    def __init__(self, env: simpy.Environment, name: str, recorder: TraceRecorder, from_edges: frozenset[str]) -> None:
        self.env = env
        self.name = name
        self.recorder = recorder
        self.from_edges = from_edges  # the edge servers that escalate to this node's group
        self.group = group_of(name)
        self._now = recording_clock(env)
        self.unknown_frames = 0

    def _on_frame(self, message: Publish) -> None:
        frame = message.payload
        if not isinstance(frame, Frame):
            return
        record = self.recorder.record(frame.frame_id)
        if (
            record is None
            or not record.rejected
            or record.edge not in self.from_edges
            or message.topic != escalation_topic(self.group, record.camera)
        ):
            self.unknown_frames += 1
            return
        if record.t_escalated >= 0:  # a QoS 1 duplicate of one already taken
            return
        record.t_escalated = self._now()
        self._take(frame, record)

    def _take(self, frame: Frame, record: FrameRecord) -> None:
        raise NotImplementedError

    def _resolve(self, record: FrameRecord, prediction: int, at: float) -> None:
        record.final_prediction = prediction
        record.resolver = self.name
        record.t_resolved = at


@dataclass(frozen=True)
class CloudConfig:
    subscribe: str
    qos: int
    max_batch: int
    max_wait_s: float
    cores: int | None


class CloudServer(EscalationResolver):
    """Classifies escalated frames in batches with its own model and device profile."""

    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        transport: Transport,
        config: CloudConfig,
        classifier: EdgeClassifier,
        device: DeviceProfile,
        recorder: TraceRecorder,
        from_edges: frozenset[str],
    ) -> None:
        super().__init__(env, name, recorder, from_edges)
        self.transport = transport
        self.config = config
        self.classifier = classifier
        self.device = device
        self._batch = FrameBatcher(env, config.max_batch, config.max_wait_s)
        self.batches = 0
        self.busy_s = 0.0

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        self.transport.subscribe(self.config.subscribe, self._on_frame, self.config.qos)
        while True:
            taken = yield from self._batch.next_batch()
            predictions = self.classifier.predict([frame for frame, _ in taken])
            compute = self.device.seconds_for(len(taken), self.classifier.flops_per_image, self.config.cores)
            started = self._now()
            yield self.env.timeout(compute)
            self.batches += 1
            self.busy_s += compute
            for (_, record), prediction in zip(taken, predictions.tolist()):
                self._resolve(record, prediction, started + compute)

    def _take(self, frame: Frame, record: FrameRecord) -> None:
        self._batch.add(frame, record)
