"""`MqttTransport`: the `Transport` node logic uses, over a real MQTT broker with paho-mqtt; its stats and errors.

The bridge to the SimPy thread (`RealtimeBridge`, `LagMeter`, `wait_for`) is in `iotbed.broker.realtime`;
connecting and closing many transports at once (`connect_ahead`, `close_all`) in `iotbed.broker.client_pool`.

Threads. paho runs its network loop in its own thread (`loop_start`). Its callbacks do nothing but put a
small work item on a thread-safe queue (`RealtimeBridge.post`); a SimPy process on the environment drains
that queue every `poll_s` (0.5 ms by default: a message waits 0.25 ms for it on average) and runs the work on the SimPy thread: counting, decoding,
calling subscription handlers, triggering the `connect()` and publish-confirm events. So node logic only
ever runs on the SimPy thread, exactly as in simulation, and the environment must be a
`simpy.rt.RealtimeEnvironment` (use `strict=False` on a busy machine). Calls from the SimPy thread into
paho (`publish`, `subscribe`) are thread-safe in paho.

Sessions and faults. MQTT 5 (default) or 3.1.1; clean sessions, or persistent ones (`clean_session=False`:
clean_start off and a session expiry for MQTT 5, clean_session off for 3.1.1). paho reconnects on its own
with exponential backoff between `reconnect_min_s` and `reconnect_max_s`; on every CONNACK the transport
subscribes again to all its filters (Mosquitto 2.0 restores a persistent session's subscriptions after a
restart, but not its shared ones). QoS 1/2 messages published while the connection is down wait in paho and
go out after the reconnect; a QoS 0 message published while it is down is dropped and counted
(`dropped_not_connected`). Messages lost inside a dying connection cannot be seen by the sender: count them
end to end (frame ids in the trace).

Nagle's algorithm stays on, as paho leaves it, unless `tcp_nodelay` (the scenario's `broker.tcp_nodelay`):
then every socket the client opens gets TCP_NODELAY before its CONNECT. `handshake_delays_s` (up, down)
emulates a path on loopback for connecting, as the simulated TCP crosses it: every attempt waits `up`
before its socket opens (the SYN), a refused one `down` before the back-off (the RST), an accepted one
`down + up` before CONNECT (the SYN-ACK, then the CONNECT) and again at the CONNACK before sending anything
(the CONNACK, then SUBSCRIBE and held PUBLISHes), so the broker sees each as late as over the path.

Refusals are counted, with their reason, in `stats` and `stats.refusal_log`: a refused CONNACK (bad
credentials, not authorised; paho would retry forever, so by default the transport stops retrying), an
MQTT 5 PUBACK with a failure reason (Mosquitto 2 answers an ACL-denied QoS 1 publish with 0x87 Not
authorized) and SUBACK failures. With MQTT 3.1.1, or QoS 0, a denied publish is silently dropped by the
broker and only non-delivery shows it. paho 2.2 ignores PUBREC reason codes, so a denied QoS 2 publish
also looks successful to the sender.

Slow readers: `slow_down(rate, duration_s)` makes the client read at most `rate` messages a second: paho's
network thread waits before handing each message over, so it neither reads its socket nor sends the
PUBACK sooner, and the broker's in-flight window and queue for this client fill as in front of any slow
device. Broker acknowledgements: a QoS 1/2 PUBLISH's frame gets `t_broker_ack` when the broker's PUBACK (QoS
2: PUBCOMP) arrives.

Duplicates: `stats.duplicates` counts deliveries that carry the DUP flag (the broker re-sent them after a
reconnect); a DUP message may still be the first copy this client saw, so exact duplicate counts come from
ids in the payload (the edge server counts repeated frame ids).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import simpy
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from iotbed.broker import packets
from iotbed.broker.client_pool import close_all
from iotbed.broker.messages import Publish
from iotbed.broker.realtime import RealtimeBridge
from iotbed.broker.topics import matches, validate_filter
from iotbed.broker.transport import Handler
from iotbed.broker.wire import MalformedPayload, RawCodec
from iotbed.errors import IotbedError
from iotbed.sim.clock import wall_clock

if TYPE_CHECKING:
    from iotbed.sim.trace import FrameRecord

SESSION_EXPIRY_NEVER = 0xFFFFFFFF
# CONNACK reasons that retrying cannot fix (MQTT 5 codes; paho maps MQTT 3.1.1 return codes onto them).
PERMANENT_CONNACK_REFUSALS = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x90, 0x95, 0x9A})


class TransportError(IotbedError):
    """The transport cannot reach or use the broker (TLS failure, no CONNACK in time)."""


class ConnectionRefused(TransportError):
    """The broker answered CONNECT with a failure reason (bad credentials, not authorised, ...)."""

    def __init__(self, client_id: str, reason: str, code: int) -> None:
        super().__init__(f"broker refused the connection of {client_id!r}: {reason} (0x{code:02x})")
        self.reason = reason
        self.code = code


@dataclass(slots=True)
class Refusal:
    time: float
    kind: str  # connect | publish | subscribe
    code: int
    reason: str
    topic: str = ""


@dataclass(slots=True)
class TransportStats:
    published: int = 0  # handed to paho (after the shaper, if any)
    publish_confirmed: int = 0  # paho reported completion with success (QoS 0: written to the socket)
    bytes_published: int = 0  # payload bytes
    no_matching_subscribers: int = 0  # MQTT 5 PUBACK 0x10: accepted, but nobody subscribed
    delivered: int = 0  # messages received and decoded (handed to every matching handler)
    bytes_delivered: int = 0
    duplicates: int = 0  # deliveries with the DUP flag
    malformed: int = 0  # payloads that did not decode: counted and skipped
    malformed_reasons: dict[str, int] = field(default_factory=dict)
    unmatched: int = 0  # decoded messages no handler's filter matched
    dropped_not_connected: int = 0  # QoS 0 publishes while the connection was down: dropped by paho
    queued_offline: int = 0  # QoS 1/2 publishes while down: paho sends them after the reconnect
    connects: int = 0  # successful CONNACKs
    reconnects: int = 0  # successful CONNACKs after the first
    connection_losses: int = 0  # an established connection that ended without our disconnect
    connect_failures: int = 0  # TCP/TLS connection attempts that failed (broker down, TLS error)
    refusals: int = 0  # connect + publish + subscribe refusals
    connect_refusals: int = 0
    publish_refusals: int = 0
    subscribe_refusals: int = 0
    refusal_log: list[Refusal] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__ if name not in ("refusal_log",)}  # type: ignore[attr-defined]
        out["malformed_reasons"] = dict(self.malformed_reasons)
        out["refusal_reasons"] = self.refusal_reasons()
        return out

    def refusal_reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.refusal_log:
            key = f"{r.kind}:{r.reason}"
            counts[key] = counts.get(key, 0) + 1
        return counts


def no_delay(client: Any) -> None:
    """Turn off Nagle's algorithm on a connected paho client's socket (paho leaves it on): small frames are
    sent at once instead of waiting for the ACK of the previous segment, which the peer delays. A new
    connection needs it again."""
    sock = client.socket()
    if sock is not None:
        _socket_no_delay(sock)


def _socket_no_delay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttTransport:
    """A paho-mqtt client with the surface of `SimMqttClient`: `connect`, `publish`, `subscribe`."""

    def __init__(
        self,
        env: simpy.Environment,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        protocol: str = packets.MQTT5,
        clean_session: bool = True,
        session_expiry_s: int | None = None,
        keepalive_s: int = 60,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls: bool | None = None,
        will: Publish | None = None,
        reconnect_min_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        max_inflight: int = 20,
        message_expiry_s: int | None = None,
        codec: Any = None,
        shaper: Any = None,
        bridge: RealtimeBridge | None = None,
        retry_on_refusal: bool = False,
        raise_on_refusal: bool = False,
        connect_timeout_s: float | None = None,
        tcp_ip_overhead: bool = False,
        bind_address: str = "",
        tcp_nodelay: bool = False,
        handshake_delays_s: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        if protocol not in (packets.MQTT5, packets.MQTT311):
            raise ValueError(f"protocol must be {packets.MQTT5!r} or {packets.MQTT311!r}, not {protocol!r}")
        self.env = env
        self.client_id = client_id
        self.host, self.port = host, port
        self.protocol = protocol
        self.mqtt5 = protocol == packets.MQTT5
        self.clean_session = clean_session
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.message_expiry_s = message_expiry_s
        self.codec = codec if codec is not None else RawCodec()
        self.shaper = shaper
        self.bridge = bridge if bridge is not None else RealtimeBridge(env)
        if self.bridge.env is not env:
            raise ValueError("the bridge belongs to another environment")
        self.retry_on_refusal = retry_on_refusal
        self.raise_on_refusal = raise_on_refusal
        self.connect_timeout_s = connect_timeout_s
        self.tcp_ip_overhead = tcp_ip_overhead
        self.bind_address = bind_address  # the local address to connect from ("": any)
        self.tcp_nodelay = tcp_nodelay  # Nagle off on every connection; False: on, as paho leaves it
        # An emulated path's one-way delays (up, down) that every connection's handshake crosses: the SYN up
        # before the broker accepts or refuses it, the answer back, then the CONNECT up.
        self.handshake_delays_s = handshake_delays_s
        self._wall = wall_clock(env)
        self.stats = TransportStats()
        self.connected: simpy.Event = env.event()
        self.session_present: bool | None = None
        self.is_connected = False  # SimPy-thread view: between a CONNACK and the next disconnect
        self.last_error: BaseException | None = None
        self._tls = bool(tls_ca) if tls is None else tls
        self._started = False
        self._closing = False
        self._closed = False  # close() or crash() ran
        self._handlers: list[tuple[str, Handler]] = []
        self._handlers_for: dict[str, list[Handler]] = {}
        self._confirm: dict[int, simpy.Event] = {}
        self._publish_topic: dict[int, str] = {}
        self._publish_record: dict[int, FrameRecord] = {}
        # Slow reading (paho's thread): seconds per message and the monotonic instant it ends.
        self._read_pace: tuple[float, float] | None = None
        self._next_read = 0.0
        # Subscriptions, shared with paho's thread (on_connect resubscribes) under a lock.
        self._sub_lock = threading.Lock()
        self._wanted: dict[str, int] = {}
        self._in_session: set[str] = set()
        self._sub_mids: dict[int, list[str]] = {}
        self._link_up_paho = False
        self._acked: set[str] = set()  # SimPy thread: filters the broker acknowledged in the current session
        self._answered = threading.Event()  # paho's thread: the broker answered a CONNECT, or an attempt failed

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self.mqtt5 else paho.MQTTv311,
            clean_session=None if self.mqtt5 else clean_session,
            reconnect_on_failure=True,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if self._tls:
            client.tls_set(ca_certs=tls_ca)  # None: the system CAs, which do not know a test CA
        if will is not None:
            client.will_set(will.topic, self.codec.encode(will.payload), will.qos, will.retain)
        client.reconnect_delay_set(reconnect_min_s, reconnect_max_s)  # type: ignore[arg-type]  # floats work
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)  # unbounded: QoS 1/2 messages wait for the reconnect
        client.on_connect = self._paho_connect
        client.on_connect_fail = self._paho_connect_fail
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        client.on_subscribe = self._paho_subscribe
        up, down = handshake_delays_s
        if up > 0:  # paho's thread waits, so only this client's (re)connection is held back
            client.on_pre_connect = lambda client, userdata: time.sleep(up)

        def socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:  # before CONNECT is written
            if tcp_nodelay:
                _socket_no_delay(sock)
            if up + down > 0:
                time.sleep(down + up)

        if tcp_nodelay or up + down > 0:
            client.on_socket_open = socket_open
        self._client = client

    # --- the Transport surface (SimPy thread) ----------------------------------------------------------
    def connect(self) -> simpy.Event:
        """Start connecting (once); the event fires with `session_present` at the first CONNACK."""
        if not self._started:
            self._started = True
            self.bridge.attach()
            kwargs: dict[str, Any] = {}
            if self.mqtt5:
                kwargs["clean_start"] = self.clean_session
                if not self.clean_session:
                    props = Properties(PacketTypes.CONNECT)
                    expiry = self.session_expiry_s
                    props.SessionExpiryInterval = SESSION_EXPIRY_NEVER if expiry is None else int(expiry)
                    kwargs["properties"] = props
            self._client.connect_async(self.host, self.port, self.keepalive_s, bind_address=self.bind_address, **kwargs)
            self._client.loop_start()
            if self.connect_timeout_s is not None:
                self.env.timeout(self.connect_timeout_s).callbacks.append(self._connect_timed_out)
        return self.connected

    def publish(
        self,
        topic: str,
        payload: Any,
        qos: int,
        retain: bool = False,
        record: FrameRecord | None = None,
        confirm: bool = False,
        *,
        expiry_s: int | None = None,
    ) -> simpy.Event | None:
        """Encode and send (through the shaper, if any). With `confirm`, the event fires when paho reports
        the QoS handshake complete (at once for QoS 0, as in simulation), with the MQTT reason code as value:
        below 0x80 accepted (0 success, 0x10 no matching subscribers; always 0 with MQTT 3.1.1), 0x80 and above
        refused (0x87 not authorized), also counted in `stats`."""
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, not {qos}")
        data = self.codec.encode(payload)
        done = self.env.event() if confirm else None
        expiry = expiry_s if expiry_s is not None else self.message_expiry_s
        if self.shaper is not None:
            size = packets.publish_size(topic, len(data), qos, self.protocol, message_expiry=bool(expiry))
            if self.tcp_ip_overhead:
                size = packets.tcp_ip_size(size)
            self.shaper.submit(
                size, qos, lambda: self._send(topic, data, qos, retain, record, done, expiry, False), record
            )
        else:
            self._send(topic, data, qos, retain, record, done, expiry, True)
        if done is not None and qos == 0:
            done.succeed(0)
        return done

    def subscribe(self, topic_filter: str, handler: Handler, qos: int) -> None:
        """Deliver messages matching `topic_filter` to `handler(Publish)`, on the SimPy thread. Subscribing
        again after a reconnect that lost the session is automatic."""
        validate_filter(topic_filter)
        self._handlers.append((topic_filter, handler))
        self._handlers_for.clear()
        with self._sub_lock:
            self._wanted[topic_filter] = max(qos, self._wanted.get(topic_filter, 0))
            self._in_session.discard(topic_filter)
            if self._link_up_paho:
                self._subscribe_locked([topic_filter])

    def subscribed(self, topic_filter: str | None = None) -> bool:
        """Whether the broker has acknowledged `topic_filter` (default: every subscription) in this session."""
        if topic_filter is not None:
            return topic_filter in self._acked
        return all(f in self._acked for f, _ in self._handlers)

    def slow_down(self, rate: float, duration_s: float) -> None:
        """For `duration_s` from now, read at most `rate` messages a second (see the module notes)."""
        if rate <= 0 or duration_s < 0:
            raise ValueError("a slow reader needs a rate above zero and a duration not below zero")
        self._read_pace = (1.0 / rate, time.monotonic() + duration_s)

    def disconnect(self) -> None:
        """A clean DISCONNECT (the broker discards the will); stops the network thread."""
        self.close()

    def close(self) -> None:
        """Disconnect cleanly and stop paho's thread; what paho reported before is processed at once."""
        close_all([self])

    # --- closing in steps, so that `client_pool.close_all` winds many transports down together -------------
    def wait_answered(self, timeout_s: float) -> bool:
        """Block until the broker answered a CONNECT (or an attempt failed), at most `timeout_s`."""
        return self._answered.wait(timeout_s)

    def begin_close(self) -> bool:
        """Stop reconnecting and reading slowly; send DISCONNECT. Whether a network thread is left to stop."""
        running = self._started and not self._closed
        self._closing = True
        self._read_pace = None  # a slow reader stops holding its thread back
        if running:
            self._closed = True
            self._client.disconnect()
        return running

    def stop_network(self) -> None:
        """Wait for paho's thread (at once if a permanent refusal already ended it) and leave the bridge."""
        self._client.loop_stop()
        self.bridge.detach()

    def crash(self) -> None:
        """Vanish without a DISCONNECT (the TCP connection is torn down): the broker publishes the will."""
        self._closing = True
        if not self._started or self._closed:
            return
        self._closed = True
        self._read_pace = None
        client = self._client
        if hasattr(client, "_reconnect_on_failure"):
            client._reconnect_on_failure = False  # paho has no public switch; stop it reconnecting
        sock = client.socket()
        if sock is not None:
            try:
                sock.shutdown(2)  # SHUT_RDWR: FIN to the broker, no DISCONNECT packet
            except OSError:
                pass
        client.loop_stop()
        self.bridge.detach()
        self.bridge.drain()
        self.is_connected = False

    def rejoin(self) -> simpy.Event:
        """After `crash`: the node comes back and connects again with the same client id, so a persistent
        session resumes (and the broker delivers what it queued meanwhile). The event fires at the CONNACK."""
        if not self._closed:
            return self.connected
        client = self._client
        if hasattr(client, "_reconnect_on_failure"):
            client._reconnect_on_failure = True
        with self._sub_lock:
            self._link_up_paho = False
        self._closed = self._closing = self._started = False
        if self.connected.triggered:
            self.connected = self.env.event()
        return self.connect()

    def _stamp(self) -> float:
        """The time to record: the wall clock where the environment keeps one (live runs)."""
        return self.env.now if self._wall is None else self._wall()

    # --- sending -----------------------------------------------------------------------------------------
    def _send(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        record: FrameRecord | None,
        done: simpy.Event | None,
        expiry: int | None,
        charge: bool,
    ) -> None:
        stats = self.stats
        if self._closed:
            stats.dropped_not_connected += 1
            return
        props = None
        if expiry is not None and self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = int(expiry)
        info = self._client.publish(topic, data, qos, retain, properties=props)
        stats.published += 1
        stats.bytes_published += len(data)
        if record is not None:
            if charge:
                size = packets.publish_size(topic, len(data), qos, self.protocol, message_expiry=bool(expiry))
                record.wire_bytes += packets.tcp_ip_size(size) if self.tcp_ip_overhead else size
            if record.t_first_hop < 0:
                record.t_first_hop = self._stamp()
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                stats.dropped_not_connected += 1
                if record is not None:
                    record.drop_reason = "not_connected"
                return
            stats.queued_offline += 1
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            stats.dropped_not_connected += 1
            return
        if qos > 0:
            self._publish_topic[info.mid] = topic
            if record is not None:
                self._publish_record[info.mid] = record
            if done is not None:
                self._confirm[info.mid] = done

    # --- paho's thread: post, never touch SimPy state --------------------------------------------------
    def _paho_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self._answered.set()
        if reason.is_failure:
            if not self.retry_on_refusal and reason.value in PERMANENT_CONNACK_REFUSALS:
                client.disconnect()  # ends loop_forever: retrying cannot fix credentials
            self.bridge.post(self._on_refused, reason.value, str(reason))
            return
        present = bool(flags.session_present)
        # An emulated path: the CONNACK crosses it down, then what the client sends first (SUBSCRIBE, the
        # PUBLISHes it held, which paho sends when this returns) crosses it up.
        time.sleep(sum(self.handshake_delays_s))
        with self._sub_lock:
            self._link_up_paho = True
            if not present:
                self._in_session.clear()
            # Subscribe again to everything, even when the broker says the session is present: Mosquitto
            # 2.0 does not restore shared subscriptions ($share/...) from its database after a restart.
            # Retain handling 1 (MQTT 5) keeps retained messages from being sent twice.
            missing = list(self._wanted)
            if missing:
                self._subscribe_locked(missing)
        self.bridge.post(self._on_connected, present)

    def _subscribe_locked(self, filters: list[str]) -> None:
        if self.mqtt5:
            # Retain handling 1: retained messages only for a subscription the session does not hold yet.
            topics: list[tuple[str, Any]] = [
                (f, SubscribeOptions(qos=self._wanted[f], retainHandling=1)) for f in filters
            ]
        else:
            topics = [(f, self._wanted[f]) for f in filters]
        rc, mid = self._client.subscribe(topics)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._in_session.update(filters)
            self._sub_mids[mid] = filters

    def _paho_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        exc = sys.exc_info()[1]  # paho calls this inside its `except OSError` block
        time.sleep(self.handshake_delays_s[1])  # the refusal (RST) crosses the path back before the back-off
        self._answered.set()
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            client.disconnect()  # a certificate does not get better by retrying
        self.bridge.post(self._on_connect_failed, exc)

    def _paho_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        with self._sub_lock:
            self._link_up_paho = False
        self.bridge.post(self._on_disconnected, str(reason))

    def _paho_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        pace = self._read_pace
        if pace is not None:
            interval, until = pace
            now = time.monotonic()
            if now < until:
                # Hold paho's thread: the socket is not read, and the PUBACK (sent when this returns) waits.
                due = max(self._next_read, now)
                time.sleep(due - now)
                self._next_read = due + interval
            elif self._read_pace is pace:  # a newer slow_down() from the SimPy thread stays
                self._read_pace = None
        self.bridge.post(self._on_message, message)

    def _paho_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        self.bridge.post(self._on_published, mid, reason.value, str(reason))

    def _paho_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        with self._sub_lock:
            filters = self._sub_mids.pop(mid, [])
        self.bridge.post(self._on_subscribed, filters, [(r.value, str(r)) for r in reasons])

    # --- the SimPy thread: state, counters, handlers ----------------------------------------------------
    def _refuse(self, kind: str, code: int, reason: str, topic: str = "") -> None:
        stats = self.stats
        stats.refusals += 1
        setattr(stats, f"{kind}_refusals", getattr(stats, f"{kind}_refusals") + 1)
        stats.refusal_log.append(Refusal(self._stamp(), kind, code, reason, topic))

    def _on_connected(self, session_present: bool) -> None:
        stats = self.stats
        stats.connects += 1
        if stats.connects > 1:
            stats.reconnects += 1
        self.is_connected = True
        self.session_present = session_present
        if not session_present:
            self._acked.clear()
        if not self.connected.triggered:
            self.connected.succeed(session_present)

    def _on_refused(self, code: int, reason: str) -> None:
        self._refuse("connect", code, reason)
        self.last_error = ConnectionRefused(self.client_id, reason, code)
        if self.raise_on_refusal and not self.connected.triggered:
            self.connected.fail(self.last_error)

    def _on_connect_failed(self, exc: BaseException | None) -> None:
        self.stats.connect_failures += 1
        self.last_error = exc
        if isinstance(exc, ssl.SSLError | ssl.CertificateError) and not self.connected.triggered:
            if isinstance(exc, ssl.SSLCertVerificationError):
                hint = "pass tls_ca=<the broker's CA file> (MosquittoBroker.ca_file)"
            else:
                hint = "check the broker's TLS settings"
            self.connected.fail(
                TransportError(f"TLS connection of {self.client_id!r} to {self.host}:{self.port} failed: {exc}; {hint}")
            )

    def _connect_timed_out(self, _: simpy.Event) -> None:
        if not self.connected.triggered:
            self.connected.fail(
                TransportError(
                    f"{self.client_id!r} got no CONNACK from {self.host}:{self.port} within {self.connect_timeout_s} s "
                    f"(last error: {self.last_error})"
                )
            )

    def _on_disconnected(self, reason: str) -> None:
        if self.is_connected and not self._closing:
            self.stats.connection_losses += 1
        self.is_connected = False

    def _on_published(self, mid: int, code: int, reason: str) -> None:
        topic = self._publish_topic.pop(mid, "")
        record = self._publish_record.pop(mid, None)
        if code >= 0x80:
            self._refuse("publish", code, reason, topic)
        else:
            self.stats.publish_confirmed += 1
            if code == 0x10:
                self.stats.no_matching_subscribers += 1
            if record is not None and record.t_broker_ack < 0:
                record.t_broker_ack = self._stamp()  # the broker holds the message: its PUBACK (QoS 2: PUBCOMP) is here
        done = self._confirm.pop(mid, None)
        if done is not None and not done.triggered:
            done.succeed(code)

    def _on_subscribed(self, filters: list[str], reasons: list[tuple[int, str]]) -> None:
        for i, (code, reason) in enumerate(reasons):
            topic = filters[i] if i < len(filters) else ""
            if code >= 0x80:
                self._refuse("subscribe", code, reason, topic)
                self._acked.discard(topic)
                with self._sub_lock:
                    self._in_session.discard(topic)
            else:
                self._acked.add(topic)

    def _on_message(self, message: paho.MQTTMessage) -> None:
        stats = self.stats
        topic = message.topic
        data = message.payload
        try:
            payload = self.codec.decode(topic, data)
        except MalformedPayload as exc:
            stats.malformed += 1
            stats.malformed_reasons[exc.reason] = stats.malformed_reasons.get(exc.reason, 0) + 1
            return
        stats.delivered += 1
        stats.bytes_delivered += len(data)
        dup = bool(message.dup)
        if dup:
            stats.duplicates += 1
        handlers = self._handlers_for.get(topic)
        if handlers is None:
            handlers = [h for f, h in self._handlers if matches(f, topic)]
            self._handlers_for[topic] = handlers
        if not handlers:
            stats.unmatched += 1
            return
        publish = Publish(topic, payload, message.qos, bool(message.retain), packet_id=message.mid, dup=dup)
        for handler in handlers:
            handler(publish)
