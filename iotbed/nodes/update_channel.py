"""How an edge server or a gateway takes what arrives on the update channel when updates are signed:
every model update, trust list and quarantine notice is checked (`iotbed.trust.verifier`) after the
device has spent the time the check costs on its profile (a signature and a hash of what was signed);
refusals and stale metadata are written to the model events with their reason. Without signing the node
takes updates as they come (`verifier is None`) and nothing is charged."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator

import simpy

from iotbed.broker.messages import Publish
from iotbed.broker.transport import Transport
from iotbed.broker.wire import quarantine_body
from iotbed.nodes.payloads import TRUST_TOPIC, ModelUpdate, Quarantine, SignedTrustList, metadata_topic
from iotbed.sim.clock import recording_clock
from iotbed.sim.devices import DeviceProfile
from iotbed.sim.trace import ModelEvent, TraceRecorder
from iotbed.trust.documents import TrustError
from iotbed.trust.verifier import UpdateVerifier

STALE_POLL_S = 0.5  # how often a stale node looks again for renewed metadata


class UpdateChannel:
    def __init__(
        self,
        env: simpy.Environment,
        node: str,
        device: DeviceProfile,
        recorder: TraceRecorder,
        verifier: UpdateVerifier | None,
    ) -> None:
        self.env = env
        self.node = node
        self.device = device
        self.recorder = recorder
        self.verifier = verifier
        # Live, the wall clock: metadata expiry is signed in run seconds, comparable across worker processes.
        self.now = recording_clock(env)
        self._pending: deque[tuple[int, Callable[[UpdateVerifier], None]]] = deque()
        self._wake = env.event()
        self._behind: set[int] = set()
        if verifier is not None:
            env.process(self._checker())

    def _event(self, event: str, version: int, nbytes: int = 0, reason: str = "") -> None:
        self.recorder.model_events.append(ModelEvent(self.now(), self.node, event, version, nbytes, reason))

    def refuse(self, version: int, nbytes: int, reason: str) -> None:
        self._event("refused", version, nbytes, reason)

    def subscribe(
        self, transport: Transport, models_topic: str, qos: int, adopt: Callable[[ModelUpdate], bool]
    ) -> None:
        """Follow the models topic (and, when signing, the metadata renewals and the trust list), handing each
        update that passes to `adopt`, which says whether the node took it."""

        def on_model(message: Publish) -> None:
            if isinstance(message.payload, ModelUpdate):
                self.take_update(message.payload, adopt)

        transport.subscribe(models_topic, on_model, qos)
        if self.verifier is not None:
            transport.subscribe(metadata_topic(models_topic), on_model, qos)
            transport.subscribe(TRUST_TOPIC, self._on_trust, 1)
            self.env.process(self.watch_expiry())

    def _on_trust(self, message: Publish) -> None:
        if isinstance(message.payload, SignedTrustList):
            self.take_trust_list(message.payload)

    def take_update(self, update: ModelUpdate, adopt: Callable[[ModelUpdate], bool]) -> None:
        """Check `update` (when signing) and hand it to `adopt`, which says whether the node took it."""
        if self.verifier is None:
            if update.blob:
                adopt(update)
            return
        self._queue(len(update.metadata) + len(update.blob), lambda v: self._check_update(v, update, adopt))

    def take_trust_list(self, message: SignedTrustList) -> None:
        if self.verifier is not None:
            self._queue(len(message.data), lambda v: self._check_trust_list(v, message))

    def take_quarantine(self, notice: Quarantine, believe: Callable[[Quarantine], None]) -> None:
        if self.verifier is None:
            believe(notice)
            return
        body = quarantine_body(notice)
        self._queue(len(body), lambda v: self._check_quarantine(v, notice, body, believe))

    def _queue(self, nbytes: int, check: Callable[[UpdateVerifier], None]) -> None:
        # One check at a time, in arrival order: a trust list is in force before the messages after it.
        self._pending.append((nbytes, check))
        if not self._wake.triggered:
            self._wake.succeed()

    def _checker(self) -> Generator[simpy.Event, object, None]:
        assert self.verifier is not None
        while True:
            if not self._pending:
                self._wake = self.env.event()
                yield self._wake
                continue
            nbytes, check = self._pending.popleft()
            yield self.env.timeout(self.device.verify_seconds(nbytes))
            check(self.verifier)

    def _check_update(
        self, verifier: UpdateVerifier, update: ModelUpdate, adopt: Callable[[ModelUpdate], bool]
    ) -> None:
        try:
            verdict = verifier.check_update(update, self.now())
        except TrustError as refusal:
            self.refuse(update.version, update.nbytes, refusal.reason)
            return
        if verdict.action == "renew":
            if verifier.stale(self.now()):
                self._event("recovered", verdict.metadata.version)
            verifier.renewed(verdict.metadata)
        elif verdict.action == "adopt" and adopt(update):
            verifier.adopted(verdict.metadata)
        elif verdict.action == "ignore" and verdict.metadata.version > verifier.version:
            if verdict.metadata.version not in self._behind:  # a newer version exists that never arrived
                self._behind.add(verdict.metadata.version)
                self._event("behind", verdict.metadata.version, 0, f"holds {verifier.version}")

    def _check_trust_list(self, verifier: UpdateVerifier, message: SignedTrustList) -> None:
        try:
            trust = verifier.check_trust_list(message.data)
        except TrustError as refusal:
            self.refuse(0, message.nbytes, f"trust_list:{refusal.reason}")
            return
        if trust is not None:
            self._event("trust_updated", trust.version, message.nbytes)

    def _check_quarantine(
        self, verifier: UpdateVerifier, notice: Quarantine, body: bytes, believe: Callable[[Quarantine], None]
    ) -> None:
        try:
            verifier.check_quarantine(notice, body)
        except TrustError as refusal:
            self.refuse(notice.version, notice.nbytes, f"quarantine:{refusal.reason}")
            return
        believe(notice)

    def watch_expiry(self) -> Generator[simpy.Event, object, None]:
        """Report `stale` once each time the metadata of the version held runs out without a renewal."""
        verifier = self.verifier
        if verifier is None:
            return
        while True:
            wait = verifier.expires - self.now()
            if wait > 0:
                yield self.env.timeout(wait)
                continue
            self._event("stale", verifier.version, 0, "expired")
            while verifier.stale(self.now()):
                yield self.env.timeout(STALE_POLL_S)
