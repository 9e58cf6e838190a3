"""The model registry: publishes versioned model updates, retained, for nodes to hot-swap."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import simpy

from iotbed.broker.transport import Transport
from iotbed.nodes.payloads import ModelUpdate
from iotbed.sim.clock import wall_clock
from iotbed.sim.trace import ModelEvent, TraceRecorder


@dataclass(frozen=True)
class ScheduledUpdate:
    at_s: float
    update: ModelUpdate
    publisher: str | None = None  # a node other than the registry's that pushes it (a rogue publisher)


class ModelRegistry:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        transport: Transport,
        topic: str,
        qos: int,
        updates: list[ScheduledUpdate],
        recorder: TraceRecorder,
    ) -> None:
        self.env = env
        self.name = name
        self.transport = transport
        self.topic = topic
        self.qos = qos
        self.updates = sorted(updates, key=lambda u: u.at_s)
        self.recorder = recorder

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        wall = wall_clock(self.env)  # live runs record wall-clock times
        for scheduled in self.updates:
            if scheduled.at_s > self.env.now:
                yield self.env.timeout(scheduled.at_s - self.env.now)
            update = scheduled.update
            self.recorder.model_events.append(
                ModelEvent(
                    self.env.now if wall is None else wall(), self.name, "published", update.version, update.nbytes
                )
            )
            self.transport.publish(self.topic, update, self.qos, retain=True)
