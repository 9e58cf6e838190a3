"""A cloud server: classifies the frames edge servers escalate (the reject option's `escalate`), in batches,
with its own model and device profile, and writes the final verdict into each frame's record.

An edge republishes a rejected frame on `escalations/<camera>`; the frame travels the network to the cloud
like any other message (the WAN link's bytes, queueing and delay); the cloud looks its record up by frame id.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import simpy

from iotbed.broker.messages import Publish
from iotbed.broker.transport import Transport
from iotbed.broker.wire import ESCALATIONS_ROOT
from iotbed.nodes.batching import FrameBatcher
from iotbed.nodes.classifier import EdgeClassifier
from iotbed.nodes.payloads import Frame
from iotbed.sim.clock import recording_clock
from iotbed.sim.devices import DeviceProfile
from iotbed.sim.trace import TraceRecorder

ESCALATIONS_FILTER = f"{ESCALATIONS_ROOT}/#"


def escalation_topic(camera: str) -> str:
    return f"{ESCALATIONS_ROOT}/{camera}"


@dataclass(frozen=True)
class CloudConfig:
    subscribe: str
    qos: int
    max_batch: int
    max_wait_s: float
    cores: int | None


class CloudServer:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        transport: Transport,
        config: CloudConfig,
        classifier: EdgeClassifier,
        device: DeviceProfile,
        recorder: TraceRecorder,
    ) -> None:
        self.env = env
        self.name = name
        self.transport = transport
        self.config = config
        self.classifier = classifier
        self.device = device
        self.recorder = recorder
        self._batch = FrameBatcher(env, config.max_batch, config.max_wait_s)
        self._now = recording_clock(env)
        self.unknown_frames = 0
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
                record.final_prediction = prediction
                record.resolver = self.name
                record.t_resolved = started + compute

    def _on_frame(self, message: Publish) -> None:
        frame = message.payload
        if not isinstance(frame, Frame):
            return
        record = self.recorder.record(frame.frame_id)
        if record is None or not record.rejected:  # no edge of this run escalated it: forged or replayed
            self.unknown_frames += 1
            return
        if record.resolver:  # a QoS 1 duplicate of one already classified
            return
        self._batch.add(frame, record)
