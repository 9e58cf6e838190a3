"""An edge server: batches arriving frames, spends compute time from its device profile, classifies the
real pixels with the model it currently serves, and hot-swaps the model when the registry publishes one."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass

import simpy
from torch import nn

from iotbed.broker.messages import Publish
from iotbed.broker.transport import Transport
from iotbed.nodes.classifier import EdgeClassifier
from iotbed.nodes.payloads import Frame, ModelUpdate
from iotbed.sim.devices import DeviceProfile
from iotbed.sim.trace import FrameRecord, ModelEvent, TraceRecorder


@dataclass(frozen=True)
class EdgeConfig:
    frames_filter: str
    frames_qos: int
    models_topic: str
    models_qos: int
    max_batch: int
    max_wait_s: float
    cores: int | None


class EdgeServer:
    def __init__(self, env: simpy.Environment, name: str, transport: Transport, config: EdgeConfig,
                 classifier: EdgeClassifier, device: DeviceProfile, recorder: TraceRecorder,
                 load_model: Callable[[bytes], nn.Module]) -> None:  # fmt: skip
        self.env = env
        self.name = name
        self.transport = transport
        self.config = config
        self.classifier = classifier
        self.device = device
        self.recorder = recorder
        self._load_model = load_model
        self._pending: deque[Frame] = deque()
        self._seen: set[int] = set()
        self._wake: simpy.Event = env.event()
        self.batches = 0
        self.busy_s = 0.0

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        self.transport.subscribe(self.config.frames_filter, self._on_frame, self.config.frames_qos)
        self.transport.subscribe(self.config.models_topic, self._on_model, self.config.models_qos)
        yield from self._serve()

    def _record(self, frame: Frame) -> FrameRecord:
        return self.recorder.records[frame.frame_id]

    def _on_frame(self, message: Publish) -> None:
        frame = message.payload
        if not isinstance(frame, Frame):
            return
        if frame.frame_id in self._seen:  # a QoS 1 duplicate: counted, not classified twice
            self._record(frame).duplicates += 1
            return
        self._seen.add(frame.frame_id)
        record = self._record(frame)
        record.t_edge = self.env.now
        record.edge = self.name
        self._pending.append(frame)
        # Wake the worker for the first frame of a batch, or when the batch is full; not for every frame.
        if not self._wake.triggered and (len(self._pending) == 1 or len(self._pending) >= self.config.max_batch):
            self._wake.succeed()

    def _on_model(self, message: Publish) -> None:
        update = message.payload
        if not isinstance(update, ModelUpdate) or update.version <= self.classifier.version:
            return
        self.classifier.swap(self._load_model(update.blob), update.version)
        self.recorder.model_events.append(ModelEvent(self.env.now, self.name, "adopted", update.version, update.nbytes))

    def _serve(self) -> Generator[simpy.Event, object, None]:
        env, config = self.env, self.config
        while True:
            if not self._pending:
                self._wake = env.event()
                yield self._wake
            # Wait until the batch is full or its oldest frame has waited max_wait.
            deadline = self._record(self._pending[0]).t_edge + config.max_wait_s
            if len(self._pending) < config.max_batch and env.now < deadline:
                self._wake = env.event()
                yield self._wake | env.timeout(deadline - env.now)
            n = min(len(self._pending), config.max_batch)
            batch = [self._pending.popleft() for _ in range(n)]
            start = env.now
            predictions = self.classifier.predict(batch)
            version = self.classifier.version
            compute = self.device.seconds_for(n, self.classifier.flops_per_image, config.cores)
            yield env.timeout(compute)
            self.batches += 1
            self.busy_s += compute
            done = env.now
            for frame, prediction in zip(batch, predictions.tolist()):
                record = self._record(frame)
                record.t_infer_start = start
                record.t_done = done
                record.prediction = prediction
                record.model_version = version
