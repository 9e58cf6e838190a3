"""A review desk: people who resolve the frames edge servers escalate to a `reviewers:` group.

The desk's `reviewers` people take escalated frames first come, first served (an M/G/c queue when frames
arrive at random). Each review takes a draw from the service-time distribution; the reviewer names the
frame's true label with probability `accuracy`, and otherwise one of the other labels, each as likely.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import simpy

from iotbed.broker.transport import Transport
from iotbed.nodes.cloud import EscalationResolver
from iotbed.nodes.payloads import Frame
from iotbed.sim.trace import FrameRecord, TraceRecorder


@dataclass(frozen=True)
class ServiceTime:
    distribution: Literal["fixed", "exponential", "lognormal"]
    mean_s: float
    cv: float  # lognormal: standard deviation over mean

    def draw(self, rng: np.random.Generator) -> float:
        if self.distribution == "fixed":
            return self.mean_s
        if self.distribution == "exponential":
            return float(rng.exponential(self.mean_s))
        sigma2 = math.log1p(self.cv**2)  # the lognormal whose mean is mean_s and sd cv * mean_s
        return float(rng.lognormal(math.log(self.mean_s) - sigma2 / 2, math.sqrt(sigma2)))


@dataclass(frozen=True)
class ReviewConfig:
    subscribe: str
    qos: int
    reviewers: int
    service: ServiceTime
    accuracy: float
    num_classes: int


class ReviewDesk(EscalationResolver):
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        transport: Transport,
        config: ReviewConfig,
        recorder: TraceRecorder,
        rng: np.random.Generator,
        from_edges: frozenset[str],
    ) -> None:
        super().__init__(env, name, recorder, from_edges)
        self.transport = transport
        self.config = config
        self.rng = rng
        self.waiting: simpy.Store = simpy.Store(env)
        self.reviewed = 0
        self.busy_s = 0.0
        self.waited_s = 0.0  # summed time the reviewed frames queued before a reviewer took them
        self.max_queue = 0  # the most frames waiting with every reviewer busy
        self._reviewing = 0

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        self.transport.subscribe(self.config.subscribe, self._on_frame, self.config.qos)
        for _ in range(self.config.reviewers - 1):
            self.env.process(self._review())
        yield from self._review()

    def _take(self, frame: Frame, record: FrameRecord) -> None:
        self.waiting.put(record)
        # An idle reviewer takes the frame within this instant: only frames beyond the idle ones wait.
        idle = self.config.reviewers - self._reviewing
        self.max_queue = max(self.max_queue, len(self.waiting.items) - idle)

    def _review(self) -> Generator[simpy.Event, object, None]:
        while True:
            record = yield self.waiting.get()
            assert isinstance(record, FrameRecord)
            self._reviewing += 1
            waited = max(0.0, self._now() - record.t_escalated)
            service = self.config.service.draw(self.rng)
            yield self.env.timeout(service)
            self._reviewing -= 1
            self.busy_s += service
            self.waited_s += waited
            self.reviewed += 1
            self._resolve(record, self._verdict(record.label), self._now())

    def _verdict(self, label: int) -> int:
        if self.rng.random() < self.config.accuracy:
            return label
        other = int(self.rng.integers(self.config.num_classes - 1))  # uniform over the other labels
        return other + (other >= label)
