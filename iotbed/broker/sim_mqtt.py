"""The simulated MQTT broker and client, reached over the simulated network like any other node.

Semantics follow MQTT 3.1.1 / 5: topic filters with `+` and `#`, shared subscriptions (`$share/g/...`)
served round robin, QoS 0/1/2 with their handshakes, retained messages, persistent sessions that queue QoS
1/2 messages while the client is away, and will messages published when a client disappears without a
DISCONNECT. Every packet is charged its encoded size.

Two transports (`MqttSettings.transport`):

- `tcp` (the default): each client holds a TCP connection to the broker (`iotbed.sim.tcp`), opened with a
  handshake on every connect. MQTT packets are written to it as bytes (the connection adds TCP/IPv4
  headers per segment); a lost segment is repaired by TCP and the packets arrive in order, once. Neither
  side resends on a live connection, as the specification allows and Mosquitto 2 and paho 2 do: what is
  unacknowledged is resent when a session resumes on a new connection (CONNACK with the session present).
  A connection that breaks (a broker restart, a crash, a takeover) loses what it held: QoS 1/2 messages
  stay with their MQTT flows for the next connection, QoS 0 ones are reported undelivered ("tcp_reset").
  A broker that is down refuses connections (RST); clients try again with paho's back-off (from
  `RECONNECT_DELAY_S`, doubling). A client
  on the broker's own node talks to it over loopback, which neither loses nor delays (`_Loopback`).
- `udp`: one network packet per MQTT packet (MQTT-SN over UDP style): a lost packet is lost, and QoS 1/2
  messages, CONNECT and SUBSCRIBE are resent after `retry_interval`, at most `max_retries` times.

Queues, as Mosquitto keeps them: every sender (client or broker session) has at most `max_inflight` QoS 1/2
messages unacknowledged; the broker queues at most `max_queued` more per session (beyond the window, or
while a persistent client is away) and drops the rest ("broker_queue_full"). A subscriber can be made slow
(`SimMqttClient.slow_down`): it reads at most `rate` messages a second and acknowledges each as it reads
it, so the broker's window and queue fill as they do in front of a real slow reader. QoS 0 messages to a
connected client are sent at once and wait unread without limit: the simulator has no TCP buffers, whose
backpressure makes Mosquitto drop QoS 0 messages too (the TCP model takes the receive window as never
limiting). A PUBREL is read at once, not behind unread PUBLISHes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import simpy
from simpy.events import Timeout

from iotbed.broker import packets
from iotbed.broker.messages import (
    Ack,
    Connack,
    Connect,
    Disconnect,
    InboundFlow,
    OutboundFlow,
    Publish,
    Suback,
    Subscribe,
)
from iotbed.broker.packets import PacketType
from iotbed.broker.topics import matches, split_shared, validate_filter
from iotbed.broker.transport import Handler
from iotbed.sim.network import Network, Packet
from iotbed.sim.tcp import CLOSED, ESTABLISHED, TcpConnection, TcpSettings, TcpStats
from iotbed.sim.timers import FifoTimers

if TYPE_CHECKING:
    from iotbed.sim.trace import FrameRecord

# Retransmission timers fire within this share of retry_interval after their deadline (see FifoTimers).
RETRY_TICK_FRACTION = 0.05
# A client whose connection broke, or was refused, tries again after this long, doubled on every attempt
# that fails up to the maximum and reset by a CONNACK: paho's back-off, with the live transport's settings.
RECONNECT_DELAY_S = 0.1
RECONNECT_MAX_DELAY_S = 5.0
# tcp: a client that has no CONNACK this long after opening its connection opens a new one (paho's
# connect_timeout). TCP itself resends a lost SYN or CONNECT long before.
CONNECT_TIMEOUT_S = 5.0

TCP = "tcp"
UDP = "udp"
TRANSPORTS = (TCP, UDP)


@dataclass(frozen=True)
class MqttSettings:
    protocol: str = packets.MQTT311
    retry_interval_s: float = 1.0  # udp only: over TCP nothing is resent on a live connection
    max_retries: int | None = None  # udp only; None: retry until acknowledged, as MQTT requires
    keepalive_s: float = 60.0
    tcp_ip_overhead: bool = True
    max_inflight: int = 20  # Mosquitto's max_inflight_messages and paho's default; 0: no limit
    max_queued: int = 1000  # Mosquitto's max_queued_messages; 0: no limit
    transport: str = TCP  # tcp: a TCP connection per client; udp: a network packet per MQTT packet
    tcp_nodelay: bool = False  # tcp: Nagle's algorithm off (TCP_NODELAY), as iotbed's live runtime sets it
    tcp: TcpSettings | None = None  # None: Linux's defaults, headers not counted without tcp_ip_overhead

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {self.transport!r}")

    def tcp_settings(self) -> TcpSettings:
        if self.tcp is not None:
            return self.tcp
        nagle = not self.tcp_nodelay
        if self.tcp_ip_overhead:
            return TcpSettings(nagle=nagle)
        return TcpSettings(header_bytes=0, syn_bytes=0, sack_bytes=0, rst_bytes=0, nagle=nagle)


def _mqtt_size(message: Any, protocol: str) -> int:
    if isinstance(message, Publish):
        return packets.publish_size(message.topic, message.payload_len, message.qos, protocol)
    if isinstance(message, Ack):
        return packets.ack_size(protocol)
    if isinstance(message, Connect):
        will = message.will
        return packets.connect_size(
            message.client_id,
            protocol=protocol,
            will_topic=will.topic if will else None,
            will_payload_len=will.payload_len if will else 0,
        )
    if isinstance(message, Connack):
        return packets.connack_size(protocol)
    if isinstance(message, Subscribe):
        return packets.subscribe_size([f for f, _ in message.filters], protocol)
    if isinstance(message, Suback):
        return packets.suback_size(len(message.granted), protocol)
    if isinstance(message, Disconnect):
        return packets.disconnect_size()
    raise TypeError(f"not an MQTT packet: {message!r}")


class WireSizer:
    """Bytes per control packet: on the wire with `transport: udp` (TCP/IP headers counted per message when
    `tcp_ip_overhead`), the MQTT bytes alone over TCP (the connection adds headers per segment).
    Acknowledgements have one size and a camera's frames another, so sizes are remembered per (topic,
    payload length, QoS) rather than recomputed per packet."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self._headers = settings.tcp_ip_overhead and settings.transport == UDP
        self.ack_bytes = self._on_wire(packets.ack_size(settings.protocol))
        self._publish: dict[tuple[str, int, int], int] = {}

    def _on_wire(self, mqtt_bytes: int) -> int:
        return packets.tcp_ip_size(mqtt_bytes) if self._headers else mqtt_bytes

    def size(self, message: Any) -> int:
        if type(message) is Ack:
            return self.ack_bytes
        if type(message) is Publish:
            key = (message.topic, message.payload_len, message.qos)
            size = self._publish.get(key)
            if size is None:
                size = self._publish[key] = self._on_wire(_mqtt_size(message, self.settings.protocol))
            return size
        return self._on_wire(_mqtt_size(message, self.settings.protocol))


@dataclass(slots=True)
class BrokerStats:
    publishes_received: int = 0
    messages_routed: int = 0
    no_subscriber: int = 0
    queued_offline: int = 0
    dropped_offline_qos0: int = 0
    dropped_queue_full: int = 0  # QoS 1/2 messages for a subscriber whose queue held max_queued already
    max_session_queue: int = 0  # the most messages one session had queued beyond its window or while away
    wills_published: int = 0
    restarts: int = 0


@dataclass
class _Session:
    client_id: str
    endpoint: Any
    clean: bool
    connected: bool = False
    subscriptions: dict[str, int] = field(default_factory=dict)
    offline_queue: deque[Publish] = field(default_factory=deque)
    will: Publish | None = None
    outbound: OutboundFlow | None = None
    inbound: InboundFlow | None = None
    epoch: int = 0  # bumped on every (re)connect, so stale liveness timers are ignored
    connection: int = -1  # tcp: the incarnation of the client's connection the session is attached to


UndeliveredListener = Callable[[Publish, str], None]


class SimBroker:
    """An MQTT broker running on a network node."""

    def __init__(
        self,
        env: simpy.Environment,
        network: Network,
        node: str,
        settings: MqttSettings,
        on_retry: Callable[[Publish], None] | None = None,
        on_give_up: Callable[[Publish], None] | None = None,
    ) -> None:
        self.env = env
        self._on_retry = on_retry
        self._on_give_up = on_give_up
        self.sizer = WireSizer(settings)
        # One timer FIFO for every session's retransmissions; clients share it through the broker.
        self.timers = FifoTimers(env, settings.retry_interval_s, settings.retry_interval_s * RETRY_TICK_FRACTION)
        self.network = network
        self.node = node
        self.settings = settings
        self.tcp = settings.transport == TCP
        self.tcp_settings = settings.tcp_settings()
        self.clients: list[SimMqttClient] = []  # tcp: every client with a connection to this broker
        self.sessions: dict[str, _Session] = {}
        self.retained: dict[str, Publish] = {}
        self.stats = BrokerStats()
        self.down = False
        self.undelivered_listeners: list[UndeliveredListener] = []
        self._match_cache: dict[str, tuple[list[tuple[_Session, int]], list[str]]] = {}
        self._shared_members: dict[str, list[tuple[_Session, int]]] = {}
        self._shared_next: dict[str, int] = {}

    # --- packets in -------------------------------------------------------------------------------
    def receive(self, packet: Packet) -> None:
        """udp: a packet from a client."""
        if self.down:
            self.network.drop(packet, "broker_down", None)
            return
        self.receive_message(packet.sender, packet.message)

    def accepting(self) -> bool:
        """tcp: whether a connection opened now is accepted (the broker is up)."""
        return not self.down

    def attach(self, client: SimMqttClient) -> None:
        """tcp: `client` has a connection to this broker (a broker restart resets it)."""
        self.clients.append(client)

    def receive_message(self, client: Any, message: Any) -> None:
        """An MQTT packet from `client`, off its connection (tcp) or its packet (udp)."""
        if self.down:
            return
        if isinstance(message, Connect):
            self._on_connect(client, message)
            return
        session = self.sessions.get(client.client_id)
        if session is None or not session.connected or session.endpoint is not client:
            return  # a packet from a connection the broker no longer holds
        if isinstance(message, Publish):
            session.inbound.on_publish(message)  # type: ignore[union-attr]
        elif isinstance(message, Ack):
            if message.kind is PacketType.PUBREL:
                session.inbound.on_pubrel(message)  # type: ignore[union-attr]
            else:
                session.outbound.on_ack(message)  # type: ignore[union-attr]
        elif isinstance(message, Subscribe):
            self._on_subscribe(session, message)
        elif isinstance(message, Disconnect):
            session.will = None  # a clean DISCONNECT discards the will
            self._drop_connection(session)

    def _send(self, session: _Session, message: Any, about: Publish | None) -> None:
        record = about.record if about is not None else None
        if not self.tcp:
            self.network.send(self, session.endpoint, self.sizer.size(message), message, record)
            return
        connection = session.endpoint.tcp
        if connection.epoch == session.connection and connection.b.state != CLOSED:
            connection.b.send(message, self.sizer.size(message), record)
        elif type(message) is Publish and message.qos == 0:
            self.undelivered(message, "tcp_reset")  # the session's connection is gone; QoS 1/2 wait in flight

    def undelivered(self, message: Publish, reason: str) -> None:
        for listener in self.undelivered_listeners:
            listener(message, reason)

    def connection_dropped(self, dropped: tuple[list[Any], list[Any]]) -> None:
        """tcp: a connection closed with these messages unacknowledged at its ends: QoS 0 PUBLISHes are lost;
        QoS 1/2 ones and acknowledgements are held by their MQTT flows and go again on the next connection."""
        for messages in dropped:
            for message in messages:
                if type(message) is Publish and message.qos == 0:
                    self.undelivered(message, "tcp_reset")

    def _on_connect(self, client: Any, message: Connect) -> None:
        session = self.sessions.get(message.client_id)
        if session is not None and session.connected and session.endpoint is client:
            # The same client again (our CONNACK was lost, or it came back before we noticed it had gone):
            # the session carries on, and whatever it has not acknowledged is sent again.
            session.epoch += 1
            if self.tcp:
                session.connection = client.tcp.epoch
            self._send(session, Connack(not session.clean), None)
            session.outbound.resend_all()  # type: ignore[union-attr]
            return
        present = session is not None and not message.clean_session and not session.clean
        if session is not None and session.connected:
            self._drop_connection(session)  # a second connection with the same id takes over (MQTT 3.1.4)
        if not present:
            if session is not None:
                self._forget_subscriptions(session)
                self._discard(session)  # the old session is gone, and what it held for the client with it
            session = _Session(message.client_id, client, message.clean_session)
            self.sessions[message.client_id] = session
            session.outbound = OutboundFlow(
                self.timers,
                lambda m, about, s=session: self._send(s, m, about),
                self.settings.max_retries,
                self._on_retry,
                self._on_give_up,
                max_inflight=self.settings.max_inflight,
                max_queued=self.settings.max_queued,
                on_queue_full=self._queue_full,
                retry=not self.tcp,
            )
            session.inbound = InboundFlow(lambda m, about, s=session: self._send(s, m, about), self._route)
        assert session is not None and session.outbound is not None
        session.endpoint = client
        if self.tcp:
            session.connection = client.tcp.epoch
        session.connected = True
        session.clean = message.clean_session
        session.will = message.will
        session.epoch += 1
        session.outbound.paused = False
        self._send(session, Connack(present), None)
        if present:
            session.outbound.resend_all()
            while session.offline_queue:
                session.outbound.publish(session.offline_queue.popleft())
        self._watch_liveness(session, session.epoch)

    def crash(self, persistence: bool) -> None:
        """The broker process stops (SIGTERM, as `iotbed emulate` restarts Mosquitto): every connection breaks at
        once (clients see it), no will is sent. With persistence, what Mosquitto 2.0's database keeps survives:
        persistent sessions, their non-shared subscriptions, their queued and in-flight messages (in-flight ones
        go again with DUP), and retained messages; shared subscriptions ($share/...) do not, so until a member
        subscribes again its group has no subscriber. Clean sessions, and without persistence all state, are
        gone, with what they held ("broker_restart"). Over TCP every connection is reset (in-flight segments
        are dropped as "tcp_closed") and the clients still running reconnect."""
        self.down = True
        self.stats.restarts += 1
        if self.tcp:
            for client in self.clients:
                connection = client.tcp
                if connection.a.state == CLOSED and connection.b.state == CLOSED:
                    continue
                self.connection_dropped(connection.reset())
                if client.alive:
                    client.connection_lost()
        for session in list(self.sessions.values()):
            if session.connected:
                session.connected = False
                session.outbound.paused = True  # type: ignore[union-attr]
                if not self.tcp:
                    session.endpoint.connection_lost()
            if session.clean or not persistence:
                self._forget_subscriptions(session)
                del self.sessions[session.client_id]
                self._discard(session, "broker_restart")
            else:
                for topic_filter in [f for f in session.subscriptions if split_shared(f)[0] is not None]:
                    del session.subscriptions[topic_filter]
        self._invalidate()
        self._shared_next.clear()  # a new process starts its round robin afresh
        if not persistence:
            self.retained.clear()

    def start(self) -> None:
        self.down = False

    def _watch_liveness(self, session: _Session, epoch: int) -> None:
        # A client that vanishes is noticed after 1.5 keep-alive periods of silence (MQTT 3.1.2.10).
        def check(_: simpy.Event) -> None:
            if session.epoch != epoch or not session.connected:
                return
            if session.endpoint.alive:
                self._watch_liveness(session, epoch)
            else:
                self._drop_connection(session)

        Timeout(self.env, 1.5 * self.settings.keepalive_s).callbacks.append(check)

    def connection_closed(self, client: SimMqttClient) -> None:
        """tcp: `client`'s process died and its kernel closed the connection (FIN): the broker sees the
        disconnect at once, without waiting out the keep-alive, and publishes the will."""
        session = self.sessions.get(client.client_id)
        if not self.down and session is not None and session.connected and session.endpoint is client:
            self._drop_connection(session)

    def _drop_connection(self, session: _Session) -> None:
        session.connected = False
        session.outbound.paused = True  # type: ignore[union-attr]
        if self.tcp:
            connection = session.endpoint.tcp
            if connection.epoch == session.connection:  # not a newer connection the client opened meanwhile
                self.connection_dropped(connection.reset())
        if session.will is not None:
            will, session.will = session.will, None
            self.stats.wills_published += 1
            self._route(will)
        if session.clean:
            self._forget_subscriptions(session)
            del self.sessions[session.client_id]
            self._discard(session, "session_ended")

    def _on_subscribe(self, session: _Session, message: Subscribe) -> None:
        granted = []
        for topic_filter, qos in message.filters:
            session.subscriptions[topic_filter] = qos
            granted.append(qos)
        self._invalidate()
        self._send(session, Suback(granted, [f for f, _ in message.filters]), None)
        for topic_filter, qos in message.filters:
            if split_shared(topic_filter)[0] is not None:
                continue  # retained messages are not sent for shared subscriptions (MQTT 5, 4.8.2)
            for topic, retained in sorted(self.retained.items()):
                if matches(topic_filter, topic):
                    self._deliver(session, retained.copy_for(min(qos, retained.qos), retain=True))

    def _forget_subscriptions(self, session: _Session) -> None:
        session.subscriptions.clear()
        self._invalidate()

    def _invalidate(self) -> None:
        self._match_cache.clear()
        self._shared_members.clear()

    # --- routing ----------------------------------------------------------------------------------
    def _subscribers(self, topic: str) -> tuple[list[tuple[_Session, int]], list[str]]:
        cached = self._match_cache.get(topic)
        if cached is not None:
            return cached
        direct: dict[str, tuple[_Session, int]] = {}
        groups: set[str] = set()
        for session in self.sessions.values():
            if not session.subscriptions:
                continue
            for topic_filter, qos in session.subscriptions.items():
                if not matches(topic_filter, topic):
                    continue
                group, _ = split_shared(topic_filter)
                if group is None:
                    best = direct.get(session.client_id)
                    if best is None or qos > best[1]:  # overlapping filters: the highest QoS wins
                        direct[session.client_id] = (session, qos)
                else:
                    key = f"{group}\x1f{topic_filter}"
                    groups.add(key)
                    members = self._shared_members.setdefault(key, [])
                    if all(s is not session for s, _ in members):
                        members.append((session, qos))
        result = (list(direct.values()), sorted(groups))
        self._match_cache[topic] = result
        return result

    def _route(self, message: Publish) -> None:
        self.stats.publishes_received += 1
        record = message.record
        if record is not None and record.t_broker < 0:
            record.t_broker = self.env.now
        if message.retain:
            if message.payload_len == 0:
                self.retained.pop(message.topic, None)
            else:
                self.retained[message.topic] = message.copy_for(message.qos, retain=True)
        direct, groups = self._subscribers(message.topic)
        delivered = False
        for session, qos in direct:
            delivered |= self._deliver(session, message.copy_for(min(qos, message.qos), retain=False))
        for key in groups:
            members = self._shared_members[key]
            start = self._shared_next.get(key, 0)
            for offset in range(len(members)):  # round robin, skipping members that are offline
                session, qos = members[(start + offset) % len(members)]
                if session.connected:
                    self._shared_next[key] = (start + offset + 1) % len(members)
                    delivered |= self._deliver(session, message.copy_for(min(qos, message.qos), retain=False))
                    break
            else:
                # Every member is away (after a broker restart, before they are back): the next one's session
                # queues it if persistent, as Mosquitto queues for offline members; else it is reported lost.
                session, qos = members[start % len(members)]
                self._shared_next[key] = (start + 1) % len(members)
                delivered |= self._deliver(session, message.copy_for(min(qos, message.qos), retain=False))
        if not direct and not groups:
            self.stats.no_subscriber += 1
            for listener in self.undelivered_listeners:
                listener(message, "no_subscriber")

    def _deliver(self, session: _Session, message: Publish) -> bool:
        self.stats.messages_routed += 1
        stats = self.stats
        if session.connected:
            sent = session.outbound.publish(message)  # type: ignore[union-attr]
            waiting = len(session.outbound.waiting)  # type: ignore[union-attr]
            if waiting > stats.max_session_queue:
                stats.max_session_queue = waiting
            return sent
        if message.qos > 0 and not session.clean:
            held = len(session.offline_queue) + len(session.outbound.waiting)  # type: ignore[union-attr]
            if self.settings.max_queued and held >= self.settings.max_queued:
                self._queue_full(message)
                return False
            stats.queued_offline += 1
            session.offline_queue.append(message)
            stats.max_session_queue = max(stats.max_session_queue, len(session.offline_queue))
            return True
        stats.dropped_offline_qos0 += 1
        self.undelivered(message, "subscriber_offline")
        return False

    def _queue_full(self, message: Publish) -> None:
        self.stats.dropped_queue_full += 1
        self.undelivered(message, "broker_queue_full")

    def _discard(self, session: _Session, reason: str = "session_discarded") -> None:
        """The session is gone (a clean session took over, a clean session ended, the broker restarted): what
        it held for its client is dropped, and reported with `reason`."""
        outbound = session.outbound
        assert outbound is not None
        held = [entry.message for entry in outbound.inflight.values()]
        held += [message for message, _ in outbound.waiting] + list(session.offline_queue)
        outbound.inflight.clear()
        outbound.waiting.clear()
        session.offline_queue.clear()
        for message in held:
            self.undelivered(message, reason)


class _LoopbackEnd:
    __slots__ = ("connection", "node", "on_message", "peer", "state", "stats")

    def __init__(self, connection: _Loopback, node: str, on_message: Callable[[Any], None]) -> None:
        self.connection = connection
        self.node = node
        self.on_message = on_message
        self.peer: _LoopbackEnd = self
        self.state = CLOSED
        self.stats = TcpStats()

    def send(self, message: Any, size: int, frame: Any = None) -> None:
        if self.state == CLOSED:
            raise ConnectionError(f"loopback connection at {self.node} is closed")
        if self.peer.state == CLOSED:  # the other end is gone (a crash): nothing reads it
            network = self.connection.network
            network.drop(Packet(self, self.peer, size, message, frame), "tcp_closed", None)
            return
        self.peer.on_message(message)

    def abort(self) -> list[Any]:
        self.state = CLOSED
        return []


class _Loopback:
    """A client's connection to a broker on its own node: a loopback socket, which neither loses nor delays,
    so messages are handed over at once, in order (as `transport: udp` does on one node), with no TCP cost.
    Refused at once while the broker is down."""

    def __init__(
        self, network: Network, node: str, on_message_a: Callable[[Any], None], on_message_b: Callable[[Any], None]
    ) -> None:
        self.network = network
        self.epoch = 0
        self.a = _LoopbackEnd(self, node, on_message_a)
        self.b = _LoopbackEnd(self, node, on_message_b)
        self.a.peer, self.b.peer = self.b, self.a
        self.accepting: Callable[[], bool] | None = None
        self.on_refused: Callable[[], None] | None = None

    def open(self) -> tuple[list[Any], list[Any]]:
        dropped = self.reset()
        if self.accepting is not None and not self.accepting():
            if self.on_refused is not None:
                self.on_refused()
        else:
            self.a.state = self.b.state = ESTABLISHED
        return dropped

    def reset(self) -> tuple[list[Any], list[Any]]:
        self.epoch += 1
        return self.a.abort(), self.b.abort()


class SimMqttClient:
    """An MQTT client on a network node; the `Transport` node logic uses in simulation."""

    def __init__(
        self,
        env: simpy.Environment,
        network: Network,
        node: str,
        client_id: str,
        broker: SimBroker,
        *,
        clean_session: bool = True,
        will: Publish | None = None,
        on_retry: Callable[[Publish], None] | None = None,
        on_give_up: Callable[[Publish], None] | None = None,
        on_not_connected: Callable[[Publish], None] | None = None,
        on_acked: Callable[[Publish], None] | None = None,
    ) -> None:
        self.env = env
        self.network = network
        self.node = node
        self.client_id = client_id
        self.broker = broker
        self.settings = broker.settings
        self.clean_session = clean_session
        self.will = will
        self.alive = True
        self.session_up = False  # between a CONNACK and the loss of the connection
        self.connected = env.event()
        self.reconnects = 0
        self._subscriptions: dict[str, int] = {}
        self._on_not_connected = on_not_connected
        self._handlers: list[tuple[str, Handler]] = []
        self._handlers_for: dict[str, list[Handler]] = {}
        self._unacked_subscriptions: set[tuple[str, int]] = set()
        self._connect_attempt = 0
        self._reconnect_delay: float | None = None  # the back-off's last wait; None: since the last CONNACK
        self.received_duplicates = 0
        # paho's window (max_inflight_messages) and queue (unbounded: QoS 1/2 messages wait for a free slot)
        self.outbound = OutboundFlow(
            broker.timers,
            self._send,
            self.settings.max_retries,
            on_retry=on_retry,
            on_give_up=on_give_up,
            max_inflight=self.settings.max_inflight,
            on_acked=on_acked,
            retry=not broker.tcp,
        )
        self.inbound = InboundFlow(self._send, self._dispatch)
        self._read_interval = 0.0  # while slow: seconds per message read
        self._slow_until = -1.0
        self._unread: deque[Publish] = deque()  # received, not yet read (the socket's receive buffer)
        self._reading = False
        self._next_read = 0.0
        # tcp: the connection to the broker (end a here, end b at the broker), closed until `connect` opens it
        self.tcp: TcpConnection | _Loopback | None = None
        self._subscribe_sent: dict[tuple[str, int], int] = {}  # tcp: on which connection each SUBSCRIBE went
        if broker.tcp:
            receive_b = partial(broker.receive_message, self)
            if node == broker.node:
                self.tcp = _Loopback(network, node, self._on_mqtt, receive_b)
            else:
                self.tcp = TcpConnection(network, node, broker.node, self._on_mqtt, receive_b, broker.tcp_settings)
            self.tcp.reset()
            self.tcp.accepting = broker.accepting
            self.tcp.on_refused = self._refused
            self.outbound.paused = True  # QoS 1/2 messages published before the first CONNACK wait for it
            broker.attach(self)

    def _send(self, message: Any, about: Publish | None) -> None:
        if not self.alive:
            return
        record = about.record if about is not None else None
        connection = self.tcp
        if connection is None:
            self.network.send(self, self.broker, self.broker.sizer.size(message), message, record)
        elif connection.a.state != CLOSED:
            connection.a.send(message, self.broker.sizer.size(message), record)
        elif type(message) is Publish and message.qos == 0:
            self.broker.undelivered(message, "tcp_reset")  # no connection; QoS 1/2 wait for the next one

    def wire_bytes(self, mqtt_bytes: int) -> int:
        """What an MQTT packet of `mqtt_bytes` costs on its first link, sent alone: with TCP/IPv4 headers per
        segment where they are counted (`tcp_ip_overhead`), as this transport cuts and counts them."""
        if not self.settings.tcp_ip_overhead:
            return mqtt_bytes
        if self.tcp is None:
            return packets.tcp_ip_size(mqtt_bytes)
        s = self.broker.tcp_settings
        return packets.tcp_ip_size(mqtt_bytes, s.header_bytes, s.mss)

    def connect(self) -> simpy.Event:
        if self.connected.triggered:
            self.connected = self.env.event()
        self.alive = True
        self._connect_attempt += 1
        if self.tcp is None:
            self._send_connect(self._connect_attempt)
            return self.connected
        # A new connection: its handshake, then CONNECT (TCP resends either if lost). What the old one held
        # is gone; QoS 1/2 messages go again after the CONNACK.
        self.session_up = False
        self.outbound.paused = True
        self.broker.connection_dropped(self.tcp.open())
        self._send(Connect(self.client_id, self.clean_session, self.will), None)
        attempt = self._connect_attempt
        Timeout(self.env, CONNECT_TIMEOUT_S).callbacks.append(lambda _: self._connect_timed_out(attempt))
        return self.connected

    def _connect_timed_out(self, attempt: int) -> None:
        if attempt == self._connect_attempt and self.alive and not self.session_up:
            self.connect()

    def _backoff(self) -> float:
        """How long to wait before the next attempt to connect: paho's back-off."""
        delay = self._reconnect_delay
        delay = RECONNECT_DELAY_S if delay is None else min(2 * delay, RECONNECT_MAX_DELAY_S)
        self._reconnect_delay = delay
        return delay

    def _refused(self) -> None:
        """tcp: the broker refused the connection (it is down): try again after the back-off."""
        attempt = self._connect_attempt
        Timeout(self.env, self._backoff()).callbacks.append(
            lambda _: self.connect() if self.alive and attempt == self._connect_attempt else None
        )

    def _send_connect(self, attempt: int) -> None:
        # CONNECT and SUBSCRIBE can be lost like any packet; resend them until the broker answers.
        if attempt != self._connect_attempt or self.connected.triggered or not self.alive:
            return
        self._send(Connect(self.client_id, self.clean_session, self.will), None)
        self.broker.timers.start(self._send_connect, attempt)

    def _send_subscribe(self, entry: tuple[str, int]) -> None:
        if entry not in self._unacked_subscriptions or not self.alive:
            return
        connection = self.tcp
        if connection is not None:  # once per connection: TCP delivers it or the connection breaks
            if connection.a.state != CLOSED and self._subscribe_sent.get(entry) != connection.epoch:
                self._subscribe_sent[entry] = connection.epoch
                self._send(Subscribe([entry]), None)
            return
        self._send(Subscribe([entry]), None)
        self.broker.timers.start(self._send_subscribe, entry)

    def publish(
        self,
        topic: str,
        payload: Any,
        qos: int,
        retain: bool = False,
        record: FrameRecord | None = None,
        confirm: bool = False,
    ) -> simpy.Event | None:
        done = self.env.event() if confirm else None  # an event per frame nobody waits for would cost time
        message = Publish(topic, payload, qos, retain, record=record)
        if not self.session_up and qos == 0:
            if self._on_not_connected is not None:  # no connection: a QoS 0 message has nowhere to wait
                self._on_not_connected(message)
            return done
        self.outbound.publish(message, done)  # QoS 1/2 wait in flight while the connection is down
        return done

    def subscribe(self, topic_filter: str, handler: Handler, qos: int) -> None:
        validate_filter(topic_filter)
        self._handlers.append((topic_filter, handler))
        self._handlers_for.clear()
        self._subscriptions[topic_filter] = qos
        entry = (topic_filter, qos)
        self._unacked_subscriptions.add(entry)
        self._send_subscribe(entry)

    def disconnect(self) -> None:
        self._send(Disconnect(), None)
        self.alive = False
        self.session_up = False
        self.outbound.paused = True

    def crash(self, power_off: bool = False) -> None:
        """The process dies without a DISCONNECT. Over TCP its kernel closes the connection: what it had not
        sent is lost, and the broker sees the connection closed at once and publishes the will, as Mosquitto
        does when a client is killed. With `power_off` (the host is gone, no kernel answers), and over udp
        where there is no connection to close, the broker notices after 1.5 keep-alives of silence; until then
        what its end sends is dropped."""
        self.alive = False
        self.session_up = False
        self.outbound.paused = True
        if self.tcp is not None:
            self.broker.connection_dropped((self.tcp.a.abort(), []))
            if not power_off:
                self.broker.connection_closed(self)

    def rejoin(self) -> simpy.Event:
        """After `crash`: the node connects again with the same client id."""
        return self.connect()

    def connection_lost(self) -> None:
        """The broker went away: try again after the back-off, until it answers (as paho does)."""
        self.session_up = False
        self.outbound.paused = True
        self.reconnects += 1
        Timeout(self.env, self._backoff()).callbacks.append(lambda _: self.connect() if self.alive else None)

    def slow_down(self, rate: float, duration_s: float) -> None:
        """For `duration_s` from now, read (deliver and acknowledge) at most `rate` messages a second, as the
        live transport does: a message is read when it arrives or one interval after the previous read,
        whichever is later; what arrives faster waits unread, as in a socket buffer, and is read at full
        speed afterwards."""
        self._read_interval = 1.0 / rate
        self._slow_until = self.env.now + duration_s

    def _read_unread(self):  # type: ignore[no-untyped-def]
        env = self.env
        connection = self._connect_attempt
        while self._unread:
            now = env.now
            if now < self._slow_until:
                due = max(self._next_read, now)
                if due > now:
                    yield env.timeout(due - now)
                self._next_read = due + self._read_interval
            if not self.alive or self._connect_attempt != connection:
                break  # the connection, and the socket buffer with it, is gone
            message = self._unread.popleft()
            message.buffered = False
            self.inbound.on_publish(message)
        for message in self._unread:  # never read: the broker sends them again after a reconnect
            message.buffered = False
        self._unread.clear()
        self._reading = False

    def receive(self, packet: Packet) -> None:
        """udp: a packet from the broker."""
        if not self.alive:
            return
        self._on_mqtt(packet.message)

    def _on_mqtt(self, message: Any) -> None:
        if not self.alive:
            return
        if isinstance(message, Publish):
            if self._slow_until >= 0.0 and (self._reading or self.env.now < self._slow_until):
                if message.buffered:
                    return  # already waiting unread
                message.buffered = True
                self._unread.append(message)
                if not self._reading:
                    self._reading = True  # before the reader starts: a second arrival this instant joins it
                    self.env.process(self._read_unread())
                return
            self.inbound.on_publish(message)
        elif isinstance(message, Ack):
            if message.kind is PacketType.PUBREL:
                self.inbound.on_pubrel(message)
            else:
                self.outbound.on_ack(message)
        elif isinstance(message, Suback):
            self._unacked_subscriptions = {e for e in self._unacked_subscriptions if e[0] not in message.filters}
        elif isinstance(message, Connack):
            first = not self.session_up
            self.session_up = True
            self._reconnect_delay = None
            self.outbound.paused = False
            if first:
                # A new connection: what was never acknowledged goes again (paho does the same), and every
                # subscription is made again, also when the session is present, as the live transport does:
                # after a restart Mosquitto's session has lost its shared subscriptions.
                self.outbound.resend_all()
                for entry in list(self._subscriptions.items()):
                    if self.tcp is not None or entry not in self._unacked_subscriptions:
                        self._unacked_subscriptions.add(entry)
                        self._send_subscribe(entry)
            if not self.connected.triggered:
                self.connected.succeed(message.session_present)

    def _dispatch(self, message: Publish) -> None:
        handlers = self._handlers_for.get(message.topic)
        if handlers is None:
            handlers = [h for f, h in self._handlers if matches(f, message.topic)]
            self._handlers_for[message.topic] = handlers
        for handler in handlers:
            handler(message)
