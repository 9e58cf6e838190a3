"""MQTT control packets as the simulator passes them, and the QoS 1/2 handshakes both ends share.

The sender side (`OutboundFlow`) owns packet ids, the in-flight window and retransmission (PUBLISH with DUP, or
PUBREL): on timeout where the transport may lose messages (`retry`), else only when a session resumes
(`resend_all`), as over TCP. At most `max_inflight` QoS 1/2 messages are unacknowledged at once; later ones
wait in order and, beyond `max_queued` waiting, are dropped (Mosquitto's `max_inflight_messages` and
`max_queued_messages`: a slow subscriber fills its window, then the broker's queue). The receiver side
(`InboundFlow`) acknowledges and, at QoS 2, keeps the packet ids it has seen until PUBREL so a retransmitted
PUBLISH is delivered exactly once. Clients and the broker each hold one pair per session.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import simpy

from iotbed.broker.packets import PacketType
from iotbed.sim.timers import FifoTimers

if TYPE_CHECKING:
    from iotbed.sim.trace import FrameRecord


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
    record: FrameRecord | None = None  # the frame's trace record, charged for every byte this message causes
    # Sitting in the receiver's socket buffer, not yet read: TCP delivered it, so it is not sent again on
    # timeout (only a lost packet is; a slow reader's backlog is not).
    buffered: bool = False

    @property
    def payload_len(self) -> int:
        payload = self.payload
        return len(payload) if isinstance(payload, (bytes, bytearray)) else payload.nbytes

    def copy_for(self, qos: int, retain: bool) -> Publish:
        return Publish(self.topic, self.payload, qos, retain, record=self.record)


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
    dropped_queue_full: int = 0  # QoS 1/2 messages dropped because `max_queued` were already waiting


@dataclass(slots=True)
class _InFlight:
    message: Publish
    awaiting: PacketType  # PUBACK, PUBREC or PUBCOMP
    attempts: int = 1
    done: simpy.Event | None = None


SendFn = Callable[[Any, Publish | None], None]  # (control packet, the PUBLISH it concerns)


class OutboundFlow:
    """Sender side of QoS 1 and 2 for one session."""

    def __init__(
        self,
        timers: FifoTimers,
        send: SendFn,
        max_retries: int | None,
        on_retry: Callable[[Publish], None] | None = None,
        on_give_up: Callable[[Publish], None] | None = None,
        *,
        max_inflight: int = 0,
        max_queued: int = 0,
        on_queue_full: Callable[[Publish], None] | None = None,
        on_acked: Callable[[Publish], None] | None = None,
        retry: bool = True,
    ) -> None:
        self._timers = timers
        self.retry = retry  # resend on timeout; False: the transport delivers or the connection breaks
        self._on_acked = on_acked  # the handshake completed: the peer holds the message
        self._send = send
        self.max_retries = max_retries
        self._on_retry = on_retry
        self._on_give_up = on_give_up
        self.max_inflight = max_inflight  # 0: no limit
        self.max_queued = max_queued  # 0: no limit
        self._on_queue_full = on_queue_full
        self.inflight: dict[int, _InFlight] = {}
        self.waiting: deque[tuple[Publish, simpy.Event | None]] = deque()  # QoS 1/2 beyond the window
        self._releasing = False
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

    def publish(self, message: Publish, done: simpy.Event | None = None) -> bool:
        """Send (QoS 0), put in flight, or queue behind a full window; False if the queue was full too."""
        if message.qos == 0:
            self._send(message, message)
            if done is not None:
                done.succeed()
            return True
        if self.max_inflight and (len(self.inflight) >= self.max_inflight or self.waiting):
            if self.max_queued and len(self.waiting) >= self.max_queued:
                self.stats.dropped_queue_full += 1
                if self._on_queue_full is not None:
                    self._on_queue_full(message)
                return False
            self.waiting.append((message, done))
            return True
        self._fly(message, done)
        return True

    def _fly(self, message: Publish, done: simpy.Event | None) -> None:
        message.packet_id = self._allocate_id()
        awaiting = PacketType.PUBACK if message.qos == 1 else PacketType.PUBREC
        self.inflight[message.packet_id] = _InFlight(message, awaiting, done=done)
        if not self.paused:  # paused: held until the peer is back, then `resend_all`
            self._send(message, message)
        self._arm(message.packet_id, 1)

    def _arm(self, packet_id: int, attempt: int) -> None:
        if self.retry:
            self._timers.start(self._timeout, (packet_id, attempt))

    def _timeout(self, key: tuple[int, int]) -> None:
        packet_id, attempt = key
        entry = self.inflight.get(packet_id)
        if entry is None or entry.attempts != attempt:
            return  # acknowledged, or a newer attempt owns the timer
        if self.paused or entry.message.buffered:
            self._arm(packet_id, attempt)
            return
        if self.max_retries is not None and attempt > self.max_retries:
            del self.inflight[packet_id]
            self.stats.given_up += 1
            if self._on_give_up is not None:
                self._on_give_up(entry.message)
            self._release()
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
            if self._on_acked is not None:
                self._on_acked(entry.message)
            if entry.done is not None:
                entry.done.succeed()
            self._release()

    def _release(self) -> None:
        """A slot in the window came free: the oldest waiting message takes it. A loop, not recursion: over a
        same-node hand-over the acknowledgement comes back inside `_fly`."""
        if self._releasing:
            return
        self._releasing = True
        try:
            while self.waiting and len(self.inflight) < self.max_inflight:
                self._fly(*self.waiting.popleft())
        finally:
            self._releasing = False


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
