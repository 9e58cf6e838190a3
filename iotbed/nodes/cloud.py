"""A cloud server: classifies the frames edge servers escalate (the reject option's `escalate`), in batches,
with its own model and device profile, and writes the final verdict into each frame's record.

An edge republishes a rejected frame on `escalations/<camera>`; the frame travels the network to the cloud
like any other message (the WAN link's bytes, queueing and delay); the cloud looks its record up by frame id.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

import simpy

from iotbed.broker.messages import Publish
from iotbed.broker.transport import Transport
from iotbed.broker.wire import ESCALATIONS_ROOT
from iotbed.nodes.classifier import EdgeClassifier
from iotbed.nodes.payloads import Frame
from iotbed.sim.clock import wall_clock
from iotbed.sim.devices import DeviceProfile
from iotbed.sim.trace import FrameRecord, TraceRecorder


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
        self._pending: deque[tuple[Frame, FrameRecord, float]] = deque()
        self._wake: simpy.Event = env.event()
        self._wall = wall_clock(env)
        self.unknown_frames = 0
        self.batches = 0
        self.busy_s = 0.0

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        self.transport.subscribe(self.config.subscribe, self._on_frame, self.config.qos)
        while True:
            if not self._pending:
                self._wake = self.env.event()
                yield self._wake
            deadline = self._pending[0][2] + self.config.max_wait_s
            if len(self._pending) < self.config.max_batch and self.env.now < deadline:
                self._wake = self.env.event()
                yield self._wake | self.env.timeout(deadline - self.env.now)
            taken = [self._pending.popleft() for _ in range(min(len(self._pending), self.config.max_batch))]
            predictions = self.classifier.predict([frame for frame, _, _ in taken])
            compute = self.device.seconds_for(len(taken), self.classifier.flops_per_image, self.config.cores)
            started = self.env.now if self._wall is None else self._wall()
            yield self.env.timeout(compute)
            self.batches += 1
            self.busy_s += compute
            for (_, record, _), prediction in zip(taken, predictions.tolist()):
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
        self._pending.append((frame, record, self.env.now))
        if not self._wake.triggered and (len(self._pending) == 1 or len(self._pending) >= self.config.max_batch):
            self._wake.succeed()
