"""A gateway that screens the model in service with STRIP, or SentiNet, on the frames it relays (CoDefend's
device side).

The gateway sees the frames it relays from the cameras behind it and keeps the newest ones: in a
simulation through a hook on the links into it (`tap`), in a live run as an MQTT client subscribed to
those cameras' frame topics (`frame_topics`). It follows the model updates on the registry's topic. For
every model version in service it screens, again and again, the frames relayed since its last screen:
`iotbed.defenses.strip.screen_update` (or `iotbed.defenses.sentinet.screen_update`) fits the boundary for
that model on clean calibration images and tests the flagged count. A screen costs compute on the gateway's device profile (every blend is one
forward pass), and screening is paused between screens so that it takes at most `max_utilisation` of the
device. When a screen finds a backdoor, the gateway publishes a quarantine notice with the flagged frames
(the edge's D_poison) and stops screening that version.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import simpy
import torch
from torch import nn

from iotbed.broker.messages import Publish
from iotbed.broker.transport import Transport
from iotbed.broker.wire import quarantine_body
from iotbed.defenses import sentinet, strip
from iotbed.errors import ModelError
from iotbed.nodes.payloads import (
    QUARANTINE_TOPIC,
    Frame,
    ModelUpdate,
    Quarantine,
)
from iotbed.nodes.update_channel import UpdateChannel
from iotbed.sim.clock import wall_clock
from iotbed.sim.devices import DeviceProfile
from iotbed.sim.network import Packet
from iotbed.sim.offload import Offload, inline
from iotbed.sim.tcp import TcpSegment
from iotbed.sim.trace import ModelEvent, TraceRecorder
from iotbed.trust.keys import SigningKey

ScreenKind = Literal["strip", "sentinet"]


@dataclass(frozen=True)
class ScreenSettings:
    frames: int
    n_blends: int  # STRIP's blends, or SentiNet's pastes, per frame
    frr: float
    significance: float
    max_utilisation: float
    kind: ScreenKind = "strip"
    flops_per_input: float = 0.0  # one frame or calibration image screened (0: n_blends forward passes)
    setup_flops: float = 0.0  # once per screen (SentiNet labels its backgrounds)


@dataclass(frozen=True)
class ScreenOutcome:
    """What a screen found, whichever detector ran: scores are low where a frame looks trojaned (STRIP's
    entropy, SentiNet's negated excess over its envelope), and a frame is flagged at or below `boundary`."""

    backdoored: bool
    p_value: float
    n_frames: int
    n_flagged: int
    scores: torch.Tensor
    boundary: float


def run_screen(
    settings: ScreenSettings,
    model: nn.Module,
    frames: torch.Tensor,
    calibration: torch.Tensor,
    clean: torch.Tensor,
    generator: torch.Generator,
) -> ScreenOutcome:
    """One screen of `model` on `frames`: `clean` are STRIP's overlays or SentiNet's backgrounds."""
    s = settings
    if s.kind == "sentinet":
        found = sentinet.screen_update(
            model,
            frames,
            calibration,
            clean,
            frr=s.frr,
            significance=s.significance,
            n_pastes=s.n_blends,
            generator=generator,
        )
        # Flagged where excess > threshold, so -excess < -threshold; the boundary is nudged so `<=` agrees.
        boundary = float(np.nextafter(-found.boundary.threshold, -np.inf))
        return ScreenOutcome(found.backdoored, found.p_value, found.n_frames, found.n_flagged, -found.excess, boundary)
    verdict = strip.screen_update(
        model,
        frames,
        calibration,
        clean,
        frr=s.frr,
        significance=s.significance,
        n_blends=s.n_blends,
        generator=generator,
    )
    return ScreenOutcome(
        verdict.backdoored,
        verdict.p_value,
        verdict.n_frames,
        verdict.n_flagged,
        verdict.entropies,
        verdict.threshold.boundary,
    )


@dataclass
class ScreenRecord:
    """One screen: when, of what, on which frames, and what it found (for the summary and the ROC)."""

    time_s: float
    gateway: str
    version: int
    n_frames: int
    n_flagged: int
    p_value: float
    backdoored: bool
    compute_s: float
    scores: np.ndarray  # STRIP's entropies or SentiNet's negated excesses: low = trojaned
    frame_ids: np.ndarray
    boundary: float = float("nan")  # flag a frame when its score is at or below this
    kind: ScreenKind = "strip"


@dataclass
class GatewayStats:
    screens: list[ScreenRecord] = field(default_factory=list)


class ScreeningGateway:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        transport: Transport,
        models_topic: str,
        models_qos: int,
        settings: ScreenSettings,
        device: DeviceProfile,
        model_flops: float,
        images: torch.Tensor,
        calibration: torch.Tensor,
        overlays: torch.Tensor,
        initial: tuple[int, nn.Module],
        load_model: Callable[[bytes], nn.Module],
        generator: torch.Generator,
        recorder: TraceRecorder,
        offload: Offload | None = None,
        frame_topics: tuple[tuple[str, int], ...] = (),
        channel: UpdateChannel | None = None,
        notice_key: SigningKey | None = None,
        d_valid: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.env = env
        self.name = name
        self.transport = transport
        self.d_valid = d_valid  # CoDefend's own flow: clean labelled images sent with a notice
        self.models_topic = models_topic
        self.models_qos = models_qos
        self.settings = settings
        self.device = device
        self.model_flops = model_flops
        self.images = images  # what the cameras capture, for frames whose pixels are untouched
        self.calibration = calibration
        self.overlays = overlays
        self.version, self.model = initial
        self.models: dict[int, nn.Module] = {self.version: self.model}
        self._load_model = load_model
        self.generator = generator
        self.recorder = recorder
        self.relayed: deque[Frame] = deque(maxlen=settings.frames)
        self._fresh = 0  # frames relayed since the last screen
        self._screened_clean: set[int] = set()
        self._quarantined: set[int] = set()
        self._wake = env.event()
        self.stats = GatewayStats()
        self._offload = offload if offload is not None else inline(env)
        self._wall = wall_clock(env)  # live runs record wall-clock times
        self.frame_topics = frame_topics  # (topic, QoS) of the frames it relays, where it must subscribe to see them
        self.channel = channel if channel is not None else UpdateChannel(env, name, device, recorder, None)
        self.notice_key = notice_key  # signs its quarantine notices

    def tap(self, packet: Packet) -> None:
        """A link hook: keep the frames crossing into this gateway (over TCP, each message as the segment with
        its last byte crosses)."""
        message = packet.message
        if type(message) is TcpSegment:
            for carried in message.messages:
                if isinstance(carried, Publish):
                    self._on_frame(carried)
        elif isinstance(message, Publish):
            self._on_frame(message)

    def _on_frame(self, message: Publish) -> None:
        if isinstance(message.payload, Frame):
            self.relayed.append(message.payload)
            self._fresh += 1
            if self._fresh >= self.settings.frames and not self._wake.triggered:
                self._wake.succeed()

    def _stamp(self) -> float:
        return self.env.now if self._wall is None else self._wall()

    def _adopt(self, update: ModelUpdate) -> bool:
        if update.version <= self.version or update.version in self._quarantined:
            return False
        try:
            model = self._load_model(update.blob)
        except ModelError:  # not a model of this architecture: nothing to screen
            self.channel.refuse(update.version, update.nbytes, "not_a_model")
            return False
        self.version, self.model = update.version, model
        self.models[self.version] = self.model
        self._fresh = 0  # judge the new model on frames relayed from now on
        return True

    def _compute_s(self, inputs: int) -> float:
        """Device time to screen `inputs` images (the relayed frames and the calibration images)."""
        s = self.settings
        # STRIP: every blend is one forward pass.
        per_input = s.flops_per_input if s.flops_per_input > 0 else s.n_blends * self.model_flops
        return self.device.seconds_for(1, inputs * per_input + s.setup_flops)

    def model_for(self, version: int) -> nn.Module | None:
        return self.models.get(version)

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        self.channel.subscribe(self.transport, self.models_topic, self.models_qos, self._adopt)
        for topic, qos in self.frame_topics:
            self.transport.subscribe(topic, self._on_frame, qos)
        s = self.settings
        while True:
            if self._fresh < s.frames or self.version in self._quarantined:
                self._wake = self.env.event()
                yield self._wake
                continue
            frames = list(self.relayed)
            self._fresh = 0
            version, model = self.version, self.model
            compute = self._compute_s(len(frames) + len(self.calibration))
            x = torch.from_numpy(
                np.stack([f.pixels if f.pixels is not None else self.images[f.image_index].numpy() for f in frames])
            ).float()
            screened = self._offload(
                lambda model=model, x=x: run_screen(s, model, x, self.calibration, self.overlays, self.generator)
            )
            # The verdict comes when the device's modelled time has passed and the screen has really run.
            yield self.env.timeout(compute) & screened
            verdict = screened.value
            self.stats.screens.append(
                ScreenRecord(
                    self._stamp(),
                    self.name,
                    version,
                    verdict.n_frames,
                    verdict.n_flagged,
                    verdict.p_value,
                    verdict.backdoored,
                    compute,
                    verdict.scores.numpy(),
                    np.array([f.frame_id for f in frames]),
                    verdict.boundary,
                    s.kind,
                )
            )
            if verdict.backdoored and version == self.version:
                self._quarantined.add(version)
                flagged = x[verdict.scores <= verdict.boundary]
                valid, labels = self.d_valid if self.d_valid is not None else (None, None)
                notice = Quarantine(version, flagged, self.name, valid=valid, valid_labels=labels)
                if self.notice_key is not None:
                    key = self.notice_key
                    signature = key.sign(quarantine_body(notice))
                    notice = Quarantine(version, flagged, self.name, key.key_id, signature, valid, labels)
                self.recorder.model_events.append(
                    ModelEvent(self._stamp(), self.name, "quarantined", version, notice.nbytes)
                )
                self.transport.publish(QUARANTINE_TOPIC, notice, 1)
            elif version not in self._screened_clean:
                self._screened_clean.add(version)
                self.recorder.model_events.append(ModelEvent(self._stamp(), self.name, "screened_clean", version, 0))
            # Stay within the device budget: idle so that screening takes at most max_utilisation of it.
            if s.max_utilisation < 1.0:
                yield self.env.timeout(compute * (1.0 / s.max_utilisation - 1.0))
