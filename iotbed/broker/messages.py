"""MQTT control packets as the simulator passes them, and the QoS 1/2 handshakes both ends share.

The sender side (`OutboundFlow`) owns packet ids, the in-flight window and retransmission on timeout
(PUBLISH with DUP, or PUBREL); the receiver side (`InboundFlow`) acknowledges and, at QoS 2, keeps the
packet ids it has seen until PUBREL so a retransmitted PUBLISH is delivered exactly once. Clients and the
broker each hold one pair per session.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import simpy

from iotbed.broker.packets import PacketType
from iotbed.sim.timers import FifoTimers


class Payload(Protocol):
    nbytes: int


@dataclass(slots=True)
class Publish:
    topic: str
    payload: Any  # an object with `nbytes`, or bytes
    qos: int
    retain: bool = False
    packet_id: int | None = None
    dup: bool = False
    account: Any = None  # the frame's trace record, charged for every byte this message causes

    @property
    def payload_len(self) -> int:
        payload = self.payload
        return len(payload) if isinstance(payload, (bytes, bytearray)) else payload.nbytes

    def copy_for(self, qos: int, retain: bool) -> Publish:
        return Publish(self.topic, self.payload, qos, retain, account=self.account)


@dataclass(slots=True)
class Ack:
    kind: PacketType  # PUBACK, PUBREC, PUBREL or PUBCOMP
    packet_id: int


@dataclass(slots=True)
class Connect:
    client_id: str
    clean_session: bool
    will: Publish | None = None


@dataclass(slots=True)
class Connack:
    session_present: bool


@dataclass(slots=True)
class Subscribe:
    filters: list[tuple[str, int]]


@dataclass(slots=True)
class Suback:
    granted: list[int]
    filters: list[str]  # what the SUBACK answers (on the wire this is the SUBSCRIBE's packet id)


@dataclass(slots=True)
class Disconnect:
    pass


@dataclass(slots=True)
class FlowStats:
    retransmissions: int = 0
    given_up: int = 0


@dataclass(slots=True)
class _InFlight:
    message: Publish
    awaiting: PacketType  # PUBACK, PUBREC or PUBCOMP
    attempts: int = 1
    done: simpy.Event | None = None


SendFn = Callable[[Any, Publish | None], None]  # (control packet, the PUBLISH it concerns)


class OutboundFlow:
    """Sender side of QoS 1 and 2 for one session."""

    def __init__(self, timers: FifoTimers, send: SendFn, max_retries: int | None,
                 on_retry: Callable[[Publish], None] | None = None,
                 on_give_up: Callable[[Publish], None] | None = None) -> None:  # fmt: skip
        self._timers = timers
        self._send = send
        self.max_retries = max_retries
        self._on_retry = on_retry
        self._on_give_up = on_give_up
        self.inflight: dict[int, _InFlight] = {}
        self._next_id = 1
        self.stats = FlowStats()
        self.paused = False  # while the peer is unreachable (disconnected session), hold retransmissions

    def _allocate_id(self) -> int:
        for _ in range(65535):
            packet_id = self._next_id
            self._next_id = packet_id % 65535 + 1
            if packet_id not in self.inflight:
                return packet_id
        raise RuntimeError("all 65535 MQTT packet ids are in flight")

    def publish(self, message: Publish, done: simpy.Event | None = None) -> None:
        if message.qos == 0:
            self._send(message, message)
            if done is not None:
                done.succeed()
            return
        message.packet_id = self._allocate_id()
        awaiting = PacketType.PUBACK if message.qos == 1 else PacketType.PUBREC
        self.inflight[message.packet_id] = _InFlight(message, awaiting, done=done)
        if not self.paused:  # paused: held until the peer is back, then `resend_all`
            self._send(message, message)
        self._arm(message.packet_id, 1)

    def _arm(self, packet_id: int, attempt: int) -> None:
        self._timers.start(self._timeout, (packet_id, attempt))

    def _timeout(self, key: tuple[int, int]) -> None:
        packet_id, attempt = key
        entry = self.inflight.get(packet_id)
        if entry is None or entry.attempts != attempt:
            return  # acknowledged, or a newer attempt owns the timer
        if self.paused:
            self._arm(packet_id, attempt)
            return
        if self.max_retries is not None and attempt > self.max_retries:
            del self.inflight[packet_id]
            self.stats.given_up += 1
            if self._on_give_up is not None:
                self._on_give_up(entry.message)
            return
        entry.attempts += 1
        self.stats.retransmissions += 1
        if self._on_retry is not None:
            self._on_retry(entry.message)
        self._resend(entry)
        self._arm(packet_id, entry.attempts)

    def _resend(self, entry: _InFlight) -> None:
        if entry.awaiting is PacketType.PUBCOMP:
            self._send(Ack(PacketType.PUBREL, entry.message.packet_id), entry.message)  # type: ignore[arg-type]
        else:
            entry.message.dup = True
            self._send(entry.message, entry.message)

    def resend_all(self) -> None:
        """After a reconnect with a persistent session: retransmit everything unacknowledged (MQTT 4.4)."""
        for entry in list(self.inflight.values()):
            entry.attempts += 1
            self.stats.retransmissions += 1
            if self._on_retry is not None:
                self._on_retry(entry.message)
            self._resend(entry)
            self._arm(entry.message.packet_id, entry.attempts)  # type: ignore[arg-type]

    def on_ack(self, ack: Ack) -> None:
        entry = self.inflight.get(ack.packet_id)
        if entry is None:
            return  # a late duplicate acknowledgement
        if ack.kind is PacketType.PUBREC and entry.awaiting is PacketType.PUBREC:
            entry.awaiting = PacketType.PUBCOMP
            entry.attempts += 1
            self._send(Ack(PacketType.PUBREL, ack.packet_id), entry.message)
            self._arm(ack.packet_id, entry.attempts)
        elif ack.kind is PacketType.PUBREC:  # PUBREC again for a PUBLISH we resent: answer it again
            self._send(Ack(PacketType.PUBREL, ack.packet_id), entry.message)
        elif ack.kind is entry.awaiting:
            del self.inflight[ack.packet_id]
            if entry.done is not None:
                entry.done.succeed()


class InboundFlow:
    """Receiver side: acknowledge, and deliver a QoS 2 message once however often it is resent."""

    def __init__(self, send: SendFn, deliver: Callable[[Publish], None]) -> None:
        self._send = send
        self._deliver = deliver
        self._qos2_received: dict[int, Publish] = {}

    def on_publish(self, message: Publish) -> None:
        if message.qos == 0:
            self._deliver(message)
        elif message.qos == 1:
            self._deliver(message)  # at least once: a DUP is delivered again, and the receiver counts it
            self._send(Ack(PacketType.PUBACK, message.packet_id), message)  # type: ignore[arg-type]
        else:
            if message.packet_id not in self._qos2_received:
                self._qos2_received[message.packet_id] = message  # type: ignore[index]
                self._deliver(message)
            self._send(Ack(PacketType.PUBREC, message.packet_id), message)  # type: ignore[arg-type]

    def on_pubrel(self, ack: Ack) -> None:
        about = self._qos2_received.pop(ack.packet_id, None)
        self._send(Ack(PacketType.PUBCOMP, ack.packet_id), about)
