"""A camera: captures real dataset images at its frame rate and publishes them as frames."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
import simpy

from iotbed.broker.packets import publish_size, tcp_ip_size
from iotbed.broker.transport import Transport
from iotbed.nodes.payloads import Frame, raw_frame_bytes
from iotbed.sim.trace import TraceRecorder


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


class Camera:
    def __init__(self, env: simpy.Environment, name: str, index: int, transport: Transport, config: CameraConfig,
                 labels: np.ndarray, image_shape: tuple[int, int, int], rng: np.random.Generator,
                 recorder: TraceRecorder) -> None:  # fmt: skip
        self.env = env
        self.name = name
        self.index = index
        self.transport = transport
        self.config = config
        self.labels = labels
        self.image_shape = image_shape
        self.rng = rng
        self.recorder = recorder
        self.payload_bytes = raw_frame_bytes(image_shape)
        mqtt = publish_size(config.topic, self.payload_bytes, config.qos, config.protocol)
        self.publish_bytes = tcp_ip_size(mqtt) if config.tcp_ip_overhead else mqtt
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

    def run(self) -> Generator[simpy.Event, object, None]:
        env, config = self.env, self.config
        yield self.transport.connect()
        # A random phase, so that periodic cameras do not all fire at the same instant.
        first = config.start_s + float(self.rng.uniform(0.0, 1.0 / config.fps))
        if first > env.now:
            yield env.timeout(first - env.now)
        labels = self.labels.tolist()
        draws = self._draws(len(labels))
        while env.now < config.stop_s:
            image_index, gap = next(draws)
            label = labels[image_index]
            record = self.recorder.new_frame(self.name, config.topic, image_index, label, self.payload_bytes,
                                             self.publish_bytes, config.qos, env.now)  # fmt: skip
            frame = Frame(record.frame_id, self.index, env.now, image_index, label, self.image_shape,
                          self.payload_bytes)  # fmt: skip
            self.transport.publish(config.topic, frame, config.qos, account=record)
            self.frames_sent += 1
            yield env.timeout(gap)
