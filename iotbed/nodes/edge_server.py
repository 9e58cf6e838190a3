"""An edge server: batches arriving frames, spends compute time from its device profile, classifies the
real pixels with the model it currently serves, and hot-swaps the model when the registry publishes one.

When a gateway quarantines a model version, the edge stops serving it (back to the newest version it held
before) and never adopts it again; an edge with a CoDefend repairer then gathers the notices of every
gateway that quarantines that version within the repairer's pooling window, repairs the quarantined model
once from all their flagged frames (`iotbed.nodes.repair.select_d_poison` picks which) and publishes the
repaired one (`iotbed.naming.repaired_version`), which every node adopts. The repair runs where the runtime's `offload` puts it: at once in a simulation, on a thread in a
live run, so the edge goes on serving frames while it trains.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy
import torch
from torch import nn

from iotbed.broker.messages import Publish
from iotbed.broker.transport import Transport
from iotbed.defenses.reject import Threshold
from iotbed.errors import ModelError
from iotbed.naming import repaired_version
from iotbed.nodes.batching import FrameBatcher
from iotbed.nodes.classifier import EdgeClassifier
from iotbed.nodes.cloud import escalation_topic
from iotbed.nodes.encrypted import EncryptedService
from iotbed.nodes.payloads import (
    QUARANTINE_TOPIC,
    EncryptedFrame,
    EncryptedResult,
    EncryptedRound,
    Frame,
    ModelUpdate,
    Quarantine,
    context_topic,
    replies_topic,
    results_topic,
    rounds_topic,
)
from iotbed.nodes.repair import CoDefendRepairer, select_d_poison
from iotbed.nodes.update_channel import UpdateChannel
from iotbed.sim.clock import wall_clock
from iotbed.sim.devices import DeviceProfile
from iotbed.sim.offload import Offload, inline
from iotbed.sim.trace import FrameRecord, ModelEvent, TraceRecorder

ROUND_TIMEOUT_S = 30.0  # an interactive frame whose key holder does not answer by then is given up


@dataclass(frozen=True)
class EdgeConfig:
    frames_filter: str
    frames_qos: int
    models_topic: str
    models_qos: int
    max_batch: int
    max_wait_s: float
    cores: int | None
    models_publish_qos: int = 1
    escalate_qos: int | None = None  # the reject option escalates rejected frames at this QoS (None: abstains)
    escalate_to: str = ""  # the clouds or reviewers group it escalates to
    results_qos: int = 1  # encrypted results back to their cameras
    # A durable subscription: the non-shared filters to subscribe to instead of `frames_filter`.
    durable_filters: tuple[str, ...] | None = None


class EdgeServer:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        transport: Transport,
        config: EdgeConfig,
        classifier: EdgeClassifier,
        device: DeviceProfile,
        recorder: TraceRecorder,
        load_model: Callable[[bytes], nn.Module],
        repairer: CoDefendRepairer | None = None,
        model_to_bytes: Callable[[nn.Module, int], bytes] | None = None,
        offload: Offload | None = None,
        channel: UpdateChannel | None = None,
        sign_repaired: Callable[[ModelUpdate, float], ModelUpdate] | None = None,
        reject: Threshold | None = None,
        encrypted: EncryptedService | None = None,
    ) -> None:
        self.env = env
        self.name = name
        self.transport = transport
        self.config = config
        self.classifier = classifier
        self.device = device
        self.recorder = recorder
        self._load_model = load_model
        self._batch = FrameBatcher(env, config.max_batch, config.max_wait_s)
        self.unknown_frames = 0
        self.refused_updates = 0
        self._wall = wall_clock(env)  # live runs record wall-clock times
        self._seen: set[int] = set()
        self.batches = 0
        self.busy_s = 0.0
        self.held: dict[int, nn.Module] = {classifier.version: classifier.model}  # versions it served
        self.quarantined: set[int] = set()
        self.repairer = repairer
        self._to_bytes = model_to_bytes
        self._offload = offload if offload is not None else inline(env)
        self.repairs: list[dict[str, Any]] = []
        self._pooling: dict[int, list[Quarantine]] = {}  # version -> the notices gathered for its repair
        self._pool_full: dict[int, simpy.Event] = {}  # version -> every screening gateway's notice is in
        self.channel = channel if channel is not None else UpdateChannel(env, name, device, recorder, None)
        self._sign_repaired = sign_repaired
        self.reject = reject  # the reject option's threshold on the classifier's score
        self.encrypted = encrypted  # classifies CKKS-encrypted frames, where cameras send them

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        durable = self.config.durable_filters
        for frames_filter in durable if durable is not None else (self.config.frames_filter,):
            self.transport.subscribe(frames_filter, self._on_frame, self.config.frames_qos)
        self.channel.subscribe(self.transport, self.config.models_topic, self.config.models_qos, self._adopt)
        self.transport.subscribe(QUARANTINE_TOPIC, self._on_quarantine, 1)
        if self.encrypted is not None:
            self.transport.subscribe(context_topic("+"), self.encrypted.on_context, 1)
            if self.encrypted.interactive:
                self.transport.subscribe(replies_topic(self.name), self.encrypted.on_reply, self.config.results_qos)
                self._he_cores = simpy.Resource(self.env, capacity=self.config.cores or self.device.cores)
        yield from self._serve()

    def _stamp(self) -> float:
        return self.env.now if self._wall is None else self._wall()

    def _on_frame(self, message: Publish) -> None:
        frame = message.payload
        # an encrypted frame only where this edge can evaluate one (an edge without the service never batches one)
        if not isinstance(frame, Frame) and not (isinstance(frame, EncryptedFrame) and self.encrypted is not None):
            return
        record = self.recorder.record(frame.frame_id)
        if record is None:  # an id no camera of this run handed out: a forged or replayed frame
            self.unknown_frames += 1
            return
        if frame.frame_id in self._seen:  # a QoS 1 duplicate: counted, not classified twice
            record.duplicates += 1
            return
        self._seen.add(frame.frame_id)
        record.t_edge = self._stamp()
        record.edge = self.name
        self._batch.add(frame, record)

    def _adopt(self, update: ModelUpdate) -> bool:
        if update.version <= self.classifier.version or update.version in self.quarantined:
            return False
        try:
            model = self._load_model(update.blob)
        except ModelError:  # well-formed on the wire, but not a model of this architecture: refused, counted
            self.refused_updates += 1
            self.channel.refuse(update.version, update.nbytes, "not_a_model")
            return False
        self.held[update.version] = model
        self.classifier.swap(model, update.version)
        self.recorder.model_events.append(
            ModelEvent(self._stamp(), self.name, "adopted", update.version, update.nbytes)
        )
        return True

    def _on_quarantine(self, message: Publish) -> None:
        notice = message.payload
        if isinstance(notice, Quarantine) and (
            notice.version not in self.quarantined or notice.version in self._pooling
        ):
            self.channel.take_quarantine(notice, self._believe)

    def _believe(self, notice: Quarantine) -> None:
        pool = self._pooling.get(notice.version)
        if pool is not None:  # a repair is gathering evidence: one notice per gateway joins it
            if all(n.gateway != notice.gateway for n in pool):
                pool.append(notice)
                self._pool_complete(notice.version)
            return
        if notice.version in self.quarantined:
            return
        self.quarantined.add(notice.version)
        self.recorder.model_events.append(
            ModelEvent(self._stamp(), self.name, "quarantine_accepted", notice.version, notice.nbytes, notice.gateway)
        )
        if self.classifier.version == notice.version:
            previous = self._trusted_before(notice.version)
            if previous is not None:
                self.classifier.swap(self.held[previous], previous)
                self.recorder.model_events.append(ModelEvent(self._stamp(), self.name, "rolled_back", previous, 0))
        if self.repairer is not None and notice.version in self.held:
            self._pooling[notice.version] = [notice]
            self._pool_full[notice.version] = self.env.event()
            self._pool_complete(notice.version)
            self.env.process(self._repair(notice.version))

    def _trusted_before(self, version: int) -> int | None:
        """The newest version held before `version` that is not quarantined: where the edge falls back to."""
        return max((v for v in self.held if v < version and v not in self.quarantined), default=None)

    def _pool_complete(self, version: int) -> None:
        assert self.repairer is not None
        full = self._pool_full[version]
        if len(self._pooling[version]) >= self.repairer.screening_gateways and not full.triggered:
            full.succeed()

    def _repair(self, version: int) -> Generator[simpy.Event, object, None]:
        """Gather every screening gateway's notice (or wait the pooling window), then repair once."""
        assert self.repairer is not None and self._to_bytes is not None
        repairer, quarantined = self.repairer, self.held[version]
        yield self.env.timeout(repairer.pool_window_s) | self._pool_full[version]
        del self._pool_full[version]
        notices = self._pooling.pop(version)
        events = self.recorder.model_events
        events.append(ModelEvent(self._stamp(), self.name, "repair_started", version, 0))
        started = self.env.now
        flagged = torch.cat([n.flagged for n in notices])
        previous = self._trusted_before(version)
        rolled_back = self.held[previous] if previous is not None else quarantined
        kept = select_d_poison(quarantined, rolled_back, flagged, repairer.d_poison)
        d_poison = flagged[kept]
        d_valid, refused = repairer.gateways_d_valid(notices) if repairer.d_valid == "gateways" else (None, 0)
        repaired = self._offload(lambda: repairer.repair(quarantined, d_poison, d_valid, rolled_back))
        outcome = yield repaired
        # The device's modelled time, or the host's where the real training took longer (a live run).
        remaining = outcome.sim_seconds - (self.env.now - started)
        if remaining > 0:
            yield self.env.timeout(remaining)
        repaired_as = repaired_version(version)
        update = ModelUpdate(repaired_as, self._to_bytes(outcome.model, repaired_as))
        if self._sign_repaired is not None:
            update = self._sign_repaired(update, self.channel.now())
        self.repairs.append(
            {
                "quarantined_version": version,
                "version": repaired_as,
                "flagged": len(flagged),
                "gateways": [n.gateway for n in notices],
                "kept": kept.tolist(),
                "d_valid": len(d_valid) if d_valid is not None else len(repairer.clean),
                "d_valid_from": "gateways" if d_valid is not None else "edge",
                "d_valid_refused": refused,
                "kept_generated": outcome.kept_generated,
                "started_s": started,
                "published_s": self.env.now,
                "sim_seconds": outcome.sim_seconds,
                "wall_seconds": outcome.wall_seconds,
                "flops": outcome.flops,
            }
        )
        events.append(ModelEvent(self._stamp(), self.name, "repaired", repaired_as, update.nbytes))
        self.transport.publish(self.config.models_topic, update, self.config.models_publish_qos, retain=True)

    def _serve(self) -> Generator[simpy.Event, object, None]:
        env, config = self.env, self.config
        while True:
            taken = yield from self._batch.next_batch()
            start = self._stamp()
            version = self.classifier.version
            sealed: list[tuple[EncryptedFrame, FrameRecord]] = (
                [(frame, record) for frame, record in taken if isinstance(frame, EncryptedFrame)]
                if self.encrypted is not None  # plain deployments skip the per-frame type check
                else []
            )
            if sealed:
                taken = [(frame, record) for frame, record in taken if not isinstance(frame, EncryptedFrame)]
                if self.encrypted is not None and self.encrypted.interactive:
                    for frame, record in sealed:  # each waits on its own round trips; the edge goes on serving
                        self.env.process(self._serve_interactive(frame, record, version))
                else:
                    yield from self._serve_encrypted(sealed, start, version)
                if not taken:
                    continue
                start = self._stamp()
            n = len(taken)
            batch = [frame for frame, _ in taken]
            predictions = self.classifier.predict(batch)
            compute = self.device.seconds_for(n, self.classifier.flops_per_image, config.cores)
            yield env.timeout(compute)
            self.batches += 1
            self.busy_s += compute
            # The device profile's time, not the host's: in a live run the real inference above took host
            # time, which shows as the run's lag, not as the modelled device's latency.
            done = start + compute
            for (_, record), prediction in zip(taken, predictions.tolist()):
                record.t_infer_start = start
                record.t_done = done
                record.prediction = prediction
                record.model_version = version
            detection = self.classifier.last_detection
            if detection is not None:
                for (_, record), value in zip(taken, detection.tolist()):
                    record.detect_score = value
                    record.detected = value > 1.0
            scores = self.classifier.last_scores
            if scores is not None and self.reject is not None:
                self._reject(taken, scores, self.reject.value)

    def _serve_encrypted(
        self, taken: list[tuple[EncryptedFrame, FrameRecord]], start: float, version: int
    ) -> Generator[simpy.Event, object, None]:
        """Evaluate encrypted frames for real, charge the device's time for them, and send each camera its
        encrypted result; the camera decrypts it and records the prediction."""
        service = self.encrypted
        assert service is not None
        model = self.classifier.model
        results = [(frame, record, service.evaluate(frame, model, version)) for frame, record in taken]
        compute = self.device.he_seconds(service.costs.evaluate_s, len(taken), self.config.cores)
        yield self.env.timeout(compute)
        self.batches += 1
        self.busy_s += compute
        for frame, record, result in results:
            record.t_infer_start = start
            record.model_version = version
            if result is not None:
                self.transport.publish(results_topic(frame.key_owner), result, self.config.results_qos)

    def _serve_interactive(
        self, frame: EncryptedFrame, record: FrameRecord, version: int
    ) -> Generator[simpy.Event, object, None]:
        """An interactive evaluation: each step computed for real and charged on one core, the masked hidden
        layers sent to the frame's key holder, its ReLU awaited (at most `ROUND_TIMEOUT_S`)."""
        service = self.encrypted
        assert service is not None
        model = self.classifier.model
        record.t_infer_start = self._stamp()
        record.model_version = version
        masks = service.masks_for(model, version)
        inputs = frame.ciphertexts
        for step, seconds in enumerate(service.costs.stage_s):
            out = service.step(frame, step, inputs, masks, model, version)
            if out is None:
                return
            busy = self.device.he_seconds(seconds, cores=1)
            with self._he_cores.request() as turn:
                yield turn
                yield self.env.timeout(busy)
                self.busy_s += busy
            if step == len(service.costs.stage_s) - 1:
                result = EncryptedResult(frame.frame_id, version, out)
                self.transport.publish(results_topic(frame.key_owner), result, self.config.results_qos)
                return
            reply = service.expect(frame.frame_id, step + 1, frame.key_owner)
            leg = EncryptedRound(frame.frame_id, step + 1, self.name, out)
            self.transport.publish(rounds_topic(frame.key_owner), leg, self.config.results_qos)
            got = yield reply | self.env.timeout(ROUND_TIMEOUT_S)
            if reply not in got:
                service.forget(frame.frame_id, step + 1)
                service.refused["no_reply"] += 1
                return
            inputs = [got[reply].ciphertext]  # type: ignore[index]

    def _reject(self, taken: list[tuple[Frame, FrameRecord]], scores: np.ndarray, threshold: float) -> None:
        """Mark the frames scored below the reject option's threshold, and escalate them where the edge does
        (to a cloud or a review desk, over the network)."""
        escalate_qos = self.config.escalate_qos
        for (frame, record), score, rejected in zip(taken, scores.tolist(), (scores < threshold).tolist()):
            record.score = score
            record.rejected = rejected
            if rejected and escalate_qos is not None:
                self.transport.publish(escalation_topic(self.config.escalate_to, record.camera), frame, escalate_qos)
