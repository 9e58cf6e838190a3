"""Encrypted inference on the nodes: a camera that encrypts its frames and decrypts the results, and what an
edge server needs to classify ciphertexts it cannot read.

The camera uploads its public context (public, relinearisation and Galois keys; about 10 MB at the default
parameters) once, retained, and sends no frame before the broker has it: the upload is charged to its links
like any message, and `ready_at` says when the camera could start. Every frame is really encrypted (host
work), and the device's time for it comes from the measured cost (`iotbed.privacy.costs`). The edge
evaluates for real with the camera's keys and sends the encrypted logits back; the camera decrypts them
and only then has a prediction (`t_done`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy
from torch import nn

from iotbed.broker.messages import Publish
from iotbed.broker.packets import publish_size
from iotbed.nodes.camera import Camera, publish_wire_bytes
from iotbed.nodes.payloads import (
    EncryptedFrame,
    EncryptedResult,
    EncryptedRound,
    Frame,
    context_topic,
    replies_topic,
    results_topic,
    rounds_topic,
)
from iotbed.privacy.ckks import KeyOwner, PublicContext
from iotbed.privacy.costs import HeCosts
from iotbed.privacy.encrypted_cnn import EncryptedCnn, evaluation_context
from iotbed.privacy.interactive import InteractiveCnn
from iotbed.sim.devices import DeviceProfile
from iotbed.sim.trace import FrameRecord


@dataclass
class CameraPrivacy:
    """What an encrypting camera holds: its keys, the network's layout, the measured costs, its device."""

    owner: KeyOwner
    net: EncryptedCnn | InteractiveCnn
    costs: HeCosts
    device: DeviceProfile
    images: np.ndarray  # the dataset images as captured, (N, C, H, W) float32
    seeds: np.random.Generator  # one fresh seed per encryption
    context_qos: int
    results_qos: int


class EncryptingCamera(Camera):
    def __init__(self, *args: Any, privacy: CameraPrivacy, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.privacy = privacy
        self._cpu = simpy.Resource(self.env, capacity=1)  # encryption and decryption share the camera's core
        self._pending: dict[int, FrameRecord] = {}
        self.ready_at: float | None = None
        self.context_bytes = privacy.owner.public.nbytes
        self.results = 0
        self.refused_results = 0
        self._encryption_seeds = self._draw_seeds()

    def _stamp(self) -> float:
        return self.env.now if self._wall is None else self._wall()

    def _ready(self) -> Generator[simpy.Event, object, None]:
        p = self.privacy
        self.transport.subscribe(results_topic(self.name), self._on_result, p.results_qos)
        if isinstance(p.net, InteractiveCnn):
            self.transport.subscribe(rounds_topic(self.name), self._on_round, p.results_qos)
        uploaded = self.transport.publish(
            context_topic(self.name), p.owner.public, p.context_qos, retain=True, confirm=True
        )
        if uploaded is not None:
            yield uploaded
        self.ready_at = self._stamp()

    def _draw_seeds(self) -> Iterator[int]:
        while True:
            yield from self.privacy.seeds.integers(0, 2**63 - 1, size=256, dtype=np.int64).tolist()

    def _send(self, frame: Frame, record: FrameRecord) -> None:
        p = self.privacy
        pixels = frame.pixels if frame.pixels is not None else p.images[frame.image_index]
        ciphertexts = p.net.encrypt(p.owner.public_key, pixels, next(self._encryption_seeds))
        encrypted = EncryptedFrame(frame.frame_id, frame.camera_index, self.name, ciphertexts)
        config = self.config
        record.payload_bytes = encrypted.nbytes
        mqtt = publish_size(config.topic, encrypted.nbytes, config.qos, config.protocol)
        record.publish_bytes = publish_wire_bytes(self.transport, mqtt, config.tcp_ip_overhead)
        record.encrypted = True
        self._pending[frame.frame_id] = record
        self.env.process(self._encrypt_and_publish(encrypted, record))

    def _encrypt_and_publish(self, frame: EncryptedFrame, record: FrameRecord) -> Generator[simpy.Event, object, None]:
        p = self.privacy
        with self._cpu.request() as turn:
            yield turn
            yield self.env.timeout(p.device.he_seconds(p.costs.encrypt_s, cores=1))
        record.t_encrypted = self._stamp()
        self.transport.publish(self.config.topic, frame, self.config.qos, record=record)

    def _on_result(self, message: Publish) -> None:
        result = message.payload
        record = self._pending.pop(result.frame_id, None) if isinstance(result, EncryptedResult) else None
        if record is None:  # not a result, or for no frame of ours still waiting (a duplicate, a forgery)
            self.refused_results += 1
            return
        record.t_result = self._stamp()
        record.result_bytes = result.nbytes
        try:
            logits = self.privacy.net.decrypt(self.privacy.owner, result.ciphertext)
        except ValueError:
            self.refused_results += 1
            return
        self.results += 1
        self.env.process(self._decrypted(record, int(np.argmax(logits))))

    def _on_round(self, message: Publish) -> None:
        """The key holder's turn: ReLU on what the edge sent, encrypted afresh and sent back."""
        leg = message.payload
        record = self._pending.get(leg.frame_id) if isinstance(leg, EncryptedRound) else None
        if record is None or leg.step not in (1, 2):
            self.refused_results += 1
            return
        net = self.privacy.net
        assert isinstance(net, InteractiveCnn)
        try:
            reply = net.relu_round(self.privacy.owner, leg.ciphertext, leg.step - 1, next(self._encryption_seeds))
        except ValueError:
            self.refused_results += 1
            return
        answer = EncryptedRound(leg.frame_id, leg.step, self.name, reply)
        record.round_trips += 1
        record.round_bytes += leg.nbytes + answer.nbytes
        self.env.process(self._reply(answer, leg.party))

    def _reply(self, answer: EncryptedRound, edge: str) -> Generator[simpy.Event, object, None]:
        p = self.privacy
        with self._cpu.request() as turn:
            yield turn
            yield self.env.timeout(p.device.he_seconds(p.costs.relu_round_s, cores=1))
        self.transport.publish(replies_topic(edge), answer, p.results_qos)

    def _decrypted(self, record: FrameRecord, prediction: int) -> Generator[simpy.Event, object, None]:
        p = self.privacy
        with self._cpu.request() as turn:
            yield turn
            yield self.env.timeout(p.device.he_seconds(p.costs.decrypt_s, cores=1))
        record.prediction = prediction
        record.t_done = self._stamp()


class EncryptedService:
    """The edge's side: the cameras' public contexts, the served model compiled for CKKS (per version), and
    the real encrypted evaluation; interactively, the masks and the replies each frame waits for. Whatever
    it cannot use is counted by reason, never raised."""

    def __init__(
        self,
        env: simpy.Environment,
        compile_model: Callable[[nn.Module], EncryptedCnn | InteractiveCnn],
        costs: HeCosts,
        masks: np.random.Generator,
    ) -> None:
        self.env = env
        self._compile = compile_model
        self.costs = costs
        self._masks = masks
        self._compiled: dict[int, EncryptedCnn | InteractiveCnn] = {}
        self._context: Any = None
        self.contexts: dict[str, PublicContext] = {}
        self.refused: Counter[str] = Counter()
        self.interactive = bool(costs.stage_s)
        self._waiting: dict[tuple[int, int], tuple[str, simpy.Event]] = {}  # (frame, step) -> key holder, reply

    def on_context(self, message: Publish) -> None:
        camera = message.topic.rsplit("/", 1)[-1]
        if isinstance(message.payload, PublicContext):
            self.contexts[camera] = message.payload
        else:
            self.refused["bad_context"] += 1

    def _net(self, model: nn.Module, version: int) -> EncryptedCnn | InteractiveCnn:
        net = self._compiled.get(version)
        if net is None:
            net = self._compiled[version] = self._compile(model)
        if self._context is None:
            self._context = evaluation_context(net.params)
        return net

    def _run(self, frame: EncryptedFrame, refusal: str, compute: Callable[[PublicContext], bytes]) -> bytes | None:
        """`compute` with the frame's key owner's public context; None, counted, when there is none or the
        ciphertexts are refused."""
        public = self.contexts.get(frame.key_owner)
        if public is None:
            self.refused["no_context"] += 1
            return None
        try:
            return compute(public)
        except ValueError:
            self.refused[refusal] += 1
            return None

    def evaluate(self, frame: EncryptedFrame, model: nn.Module, version: int) -> EncryptedResult | None:
        net = self._net(model, version)
        assert isinstance(net, EncryptedCnn)
        result = self._run(
            frame, "bad_ciphertext", lambda public: net.evaluate(self._context, public, frame.ciphertexts)
        )
        if result is None:
            return None
        return EncryptedResult(frame.frame_id, version, result)

    def masks_for(self, model: nn.Module, version: int) -> tuple[np.ndarray, np.ndarray]:
        """A frame's fresh masks for an interactive evaluation by this model version."""
        net = self._net(model, version)
        assert isinstance(net, InteractiveCnn)
        return net.draw_masks(self._masks)

    def step(
        self,
        frame: EncryptedFrame,
        step: int,
        inputs: list[bytes],
        masks: tuple[np.ndarray, np.ndarray],
        model: nn.Module,
        version: int,
    ) -> bytes | None:
        """One step of an interactive evaluation, for real; None (counted) if the input is refused."""
        net = self._net(model, version)
        assert isinstance(net, InteractiveCnn)
        refusal = "bad_ciphertext" if step == 0 else "bad_reply"
        out = self._run(frame, refusal, lambda public: net.stage(self._context, public, step, inputs, masks))
        return out

    def expect(self, frame_id: int, step: int, key_holder: str) -> simpy.Event:
        """The event the key holder's reply for (frame, step) will trigger."""
        event = self.env.event()
        self._waiting[(frame_id, step)] = (key_holder, event)
        return event

    def forget(self, frame_id: int, step: int) -> None:
        self._waiting.pop((frame_id, step), None)

    def on_reply(self, message: Publish) -> None:
        leg = message.payload
        waiting = self._waiting.pop((leg.frame_id, leg.step), None) if isinstance(leg, EncryptedRound) else None
        if waiting is None or waiting[0] != leg.party:  # no frame waits for it, or not from its key holder
            self.refused["unexpected_reply"] += 1
            if waiting is not None:
                self._waiting[(leg.frame_id, leg.step)] = waiting
            return
        waiting[1].succeed(leg)
