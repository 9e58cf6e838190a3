"""An attacker on the update channel: a client on a node that, at its time, publishes one crafted message
(an old signed update again, the starting model under a new version, a forged quarantine notice), as
`iotbed.deployment.update_channel_attackers` makes them from the scenario's `security.attacks`."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import simpy

from iotbed.broker.transport import Transport
from iotbed.nodes.payloads import ModelUpdate, Quarantine
from iotbed.sim.clock import recording_clock
from iotbed.sim.trace import ModelEvent, TraceRecorder


@dataclass(frozen=True)
class CraftedMessage:
    at_s: float
    label: str  # e.g. replay@25s
    topic: str
    payload: ModelUpdate | Quarantine
    version: int  # the model version it concerns


class UpdateChannelAttacker:
    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        transport: Transport,
        message: CraftedMessage,
        qos: int,
        recorder: TraceRecorder,
    ) -> None:
        self.env = env
        self.name = name
        self.transport = transport
        self.message = message
        self.qos = qos
        self.recorder = recorder
        self._now = recording_clock(env)

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        m = self.message
        if m.at_s > self.env.now:
            yield self.env.timeout(m.at_s - self.env.now)
        self.recorder.model_events.append(
            ModelEvent(self._now(), self.name, "attack", m.version, m.payload.nbytes, m.label)
        )
        self.transport.publish(m.topic, m.payload, self.qos)
