"""A camera: captures real dataset images at its frame rate and publishes them as frames.

With a pixel-drop codec every frame gets a fresh mask seed (from the camera's codec stream) and its
payload shrinks to the kept pixels plus the mask. A compromised camera (`attacks`) captures the crafted
adversarial version of the image instead, inside the attack's window. Under a camera condition (fog, noise:
`conditions`) it captures the image as corrupted by it, unless an attack replaces the image.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
import simpy

from iotbed.attacks.network import AttackWindow
from iotbed.broker.packets import publish_size, tcp_ip_size
from iotbed.broker.transport import Transport
from iotbed.codecs.pixel_drop import PixelDropCodec
from iotbed.nodes.payloads import FRAME_HEADER, Frame, raw_frame_bytes
from iotbed.sim.clock import wall_clock
from iotbed.sim.trace import FrameRecord, TraceRecorder


@dataclass(frozen=True)
class CameraConfig:
    fps: float
    arrivals: str  # periodic | poisson
    start_s: float
    stop_s: float
    topic: str
    qos: int
    protocol: str
    tcp_ip_overhead: bool
    drop: PixelDropCodec | None = None  # None: raw frames


def publish_wire_bytes(transport: Transport, mqtt_bytes: int, tcp_ip_overhead: bool) -> int:
    """A PUBLISH of `mqtt_bytes` on the camera's first link: as its transport counts headers where it says
    (the simulated one: per segment of its TCP model, or per message with `transport: udp`), else with 40 B
    of TCP/IPv4 headers per 1460-B segment (the live runtime's figure)."""
    wire_bytes = getattr(transport, "wire_bytes", None)
    if wire_bytes is not None:
        return int(wire_bytes(mqtt_bytes))
    return tcp_ip_size(mqtt_bytes) if tcp_ip_overhead else mqtt_bytes


def frame_payload_bytes(image_shape: tuple[int, int, int], drop: PixelDropCodec | None) -> int:
    """The bytes of one frame's payload: raw, or the pixels a pixel-drop codec keeps plus its mask."""
    return raw_frame_bytes(image_shape) if drop is None else FRAME_HEADER.size + drop.encoded_size(image_shape)


@dataclass(frozen=True)
class ConditionWindow:
    label: str  # e.g. fog-3
    start_s: float
    stop_s: float
    images: np.ndarray  # every dataset image as seen under the condition, (N, C, H, W) float32 in [0, 1]


class Camera:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        index: int,
        transport: Transport,
        config: CameraConfig,
        labels: np.ndarray,
        image_shape: tuple[int, int, int],
        rng: np.random.Generator,
        recorder: TraceRecorder,
        codec_rng: np.random.Generator | None = None,
        attacks: list[AttackWindow] | None = None,
        conditions: list[ConditionWindow] | None = None,
    ) -> None:
        self.env = env
        self.name = name
        self.index = index
        self.transport = transport
        self.config = config
        self.labels = labels
        self.image_shape = image_shape
        self.rng = rng
        self.recorder = recorder
        self.codec_rng = codec_rng
        self.attacks = attacks or []
        self.conditions = conditions or []
        if config.drop is not None and codec_rng is None:
            raise ValueError("a pixel-drop camera needs a codec random stream for its mask seeds")
        self.payload_bytes = frame_payload_bytes(image_shape, config.drop)
        self._wall = wall_clock(env)  # live runs record wall-clock times
        mqtt = publish_size(config.topic, self.payload_bytes, config.qos, config.protocol)
        self.publish_bytes = publish_wire_bytes(transport, mqtt, config.tcp_ip_overhead)
        self.frames_sent = 0

    def _draws(self, n_images: int) -> Iterator[tuple[int, float]]:
        """(image index, gap to the next frame) pairs, drawn from the camera's stream in blocks:
        one numpy call per 1024 frames instead of two per frame."""
        period = 1.0 / self.config.fps
        poisson = self.config.arrivals == "poisson"
        while True:
            images = self.rng.integers(n_images, size=1024).tolist()
            gaps = self.rng.exponential(period, size=1024).tolist() if poisson else [period] * 1024
            yield from zip(images, gaps)

    def _seeds(self) -> Iterator[int]:
        """Mask seeds (63 bits) in blocks of 1024, or -1 forever for raw frames."""
        if self.config.drop is None or self.codec_rng is None:
            while True:
                yield -1
        while True:
            yield from self.codec_rng.integers(0, 2**63 - 1, size=1024, dtype=np.int64).tolist()

    def run(self) -> Generator[simpy.Event, object, None]:
        env, config = self.env, self.config
        yield self.transport.connect()
        yield from self._ready()
        # A random phase, so that periodic cameras do not all fire at the same instant.
        first = config.start_s + float(self.rng.uniform(0.0, 1.0 / config.fps))
        if first > env.now:
            yield env.timeout(first - env.now)
        labels = self.labels.tolist()
        draws = self._draws(len(labels))
        seeds = self._seeds()
        while env.now < config.stop_s:
            image_index, gap = next(draws)
            label = labels[image_index]
            captured = env.now if self._wall is None else self._wall()
            record = self.recorder.new_frame(
                self.name,
                config.topic,
                image_index,
                label,
                self.payload_bytes,
                self.publish_bytes,
                config.qos,
                captured,
            )
            frame = Frame(
                record.frame_id,
                self.index,
                captured,
                image_index,
                label,
                self.image_shape,
                self.payload_bytes,
                drop=config.drop,
                mask_seed=next(seeds),
            )
            for attack in self.attacks:
                if attack.strikes(env.now):
                    frame.pixels = attack.adversarial[image_index]
                    frame.attack = record.attack = attack.label
                    attack.frames_attacked += 1
                    break
            else:
                for condition in self.conditions:
                    if condition.start_s <= env.now < condition.stop_s:
                        frame.pixels = condition.images[image_index]
                        record.condition = condition.label
                        break
            self._send(frame, record)
            self.frames_sent += 1
            yield env.timeout(gap)

    def _ready(self) -> Generator[simpy.Event, object, None]:
        """What must happen between connecting and the first frame (nothing for a plain camera)."""
        yield from ()

    def _send(self, frame: Frame, record: FrameRecord) -> None:
        self.transport.publish(self.config.topic, frame, self.config.qos, record=record)
