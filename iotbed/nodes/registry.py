"""The model registry: publishes versioned model updates, retained, for nodes to hot-swap.

With signing on (`keys`), the updates it publishes carry metadata signed when they were scheduled (they
age while held back), it renews the metadata of the version in service every `refresh_interval_s` on the
metadata topic, including a repaired version a trusted edge published, and at each key rotation publishes
the next root-signed trust list (retained) and signs with the new key from then on. A freeze attack holds
back every message it would send inside a window and lets them through at the window's end.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import simpy

from iotbed.broker.messages import Publish
from iotbed.broker.transport import Transport
from iotbed.nodes.payloads import TRUST_TOPIC, ModelUpdate, SignedTrustList, metadata_topic
from iotbed.sim.clock import recording_clock
from iotbed.sim.trace import ModelEvent, TraceRecorder
from iotbed.trust.documents import TrustError, blob_digest, parse_trust_list
from iotbed.trust.provisioning import KeyRing
from iotbed.trust.verifier import authenticate


@dataclass(frozen=True)
class ScheduledUpdate:
    at_s: float
    update: ModelUpdate
    publisher: str | None = None  # a node other than the registry's that pushes it (a rogue publisher)


@dataclass(frozen=True)
class Freeze:
    """A network attacker holds back the registry's messages from `start_s` and lets them through at `stop_s`."""

    start_s: float
    stop_s: float


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
        keys: KeyRing | None = None,
        refresh_interval_s: float | None = None,
        freezes: tuple[Freeze, ...] = (),
        current: tuple[int, str] | None = None,
    ) -> None:
        self.env = env
        self.name = name
        self.transport = transport
        self.topic = topic
        self.qos = qos
        self.updates = sorted(updates, key=lambda u: u.at_s)
        self.recorder = recorder
        self.keys = keys
        self.refresh_interval_s = refresh_interval_s
        self.freezes = freezes
        self.current = current  # (version, blob digest) in service, whose metadata it renews
        self._period = 0  # the key period it signs in: the next starts once its trust list is out
        self._stamp = recording_clock(env)  # live runs record wall-clock times

    def _send(self, topic: str, payload: object, nbytes: int, retain: bool) -> Generator[simpy.Event, object, None]:
        held = next((f for f in self.freezes if f.start_s <= self.env.now < f.stop_s), None)
        if held is not None:
            self.recorder.model_events.append(ModelEvent(self._stamp(), self.name, "held", 0, nbytes, "freeze"))
            yield self.env.timeout(held.stop_s - self.env.now)
        self.transport.publish(topic, payload, self.qos, retain=retain)

    def run(self) -> Generator[simpy.Event, object, None]:
        yield self.transport.connect()
        if self.keys is not None:
            self.transport.subscribe(self.topic, self._on_model, self.qos)
            for at in self.keys.rotations:
                self.env.process(self._rotate(at))
            if self.refresh_interval_s is not None:
                self.env.process(self._renew())
        for scheduled in self.updates:
            if scheduled.at_s > self.env.now:
                yield self.env.timeout(scheduled.at_s - self.env.now)
            self.env.process(self._publish(scheduled.update))

    def _publish(self, update: ModelUpdate) -> Generator[simpy.Event, object, None]:
        events = self.recorder.model_events
        events.append(ModelEvent(self._stamp(), self.name, "published", update.version, update.nbytes))
        if self.keys is not None and update.blob:
            self.current = (update.version, blob_digest(update.blob))
        yield from self._send(self.topic, update, update.nbytes, retain=True)

    def _on_model(self, message: Publish) -> None:
        """Follow a repaired model a trusted edge published, to renew its metadata from then on."""
        update, keys = message.payload, self.keys
        if not isinstance(update, ModelUpdate) or keys is None or not update.blob:
            return
        if self.current is not None and update.version <= self.current[0]:
            return
        try:  # repair keys stand in every trust list, so the first one says who may repair
            meta = authenticate(update, parse_trust_list(keys.trust_lists[0]), keys.target, ("repair",))
        except TrustError:
            return
        self.current = (meta.version, meta.sha256)

    def _renew(self) -> Generator[simpy.Event, object, None]:
        assert self.keys is not None and self.refresh_interval_s is not None
        while True:
            yield self.env.timeout(self.refresh_interval_s)
            if self.current is not None:
                renewal = self.keys.renewal(*self.current, self._stamp(), self._period)
                self.env.process(self._send(metadata_topic(self.topic), renewal, renewal.nbytes, retain=True))

    def _rotate(self, at: float) -> Generator[simpy.Event, object, None]:
        assert self.keys is not None
        if at > self.env.now:
            yield self.env.timeout(at - self.env.now)
        period = self.keys.rotations.index(at) + 1
        trust = SignedTrustList(self.keys.trust_lists[period])
        self.recorder.model_events.append(ModelEvent(self._stamp(), self.name, "key_rotated", period + 1, trust.nbytes))
        yield from self._send(TRUST_TOPIC, trust, trust.nbytes, retain=True)
        self._period = period
