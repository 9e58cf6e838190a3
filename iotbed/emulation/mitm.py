"""A live man in the middle for MQTT: a TCP proxy on loopback that rewrites what clients publish.

`MqttTamperProxy` listens on 127.0.0.1 (a free port, `.port`) and connects every client it accepts to the
broker. Broker->client bytes pass unchanged. Client->broker bytes are cut into MQTT packets
(`MqttStreamRewriter`): the CONNECT tells the protocol (3.1, 3.1.1 or 5; MQTT 5 adds a properties block to
PUBLISH after the packet id, and topic aliases, which are followed), and every PUBLISH payload is offered to a
`tamper(topic, payload)` function whose non-None result replaces it, the Remaining Length re-encoded. A
packet leaves as soon as its last byte is in: the proxy adds parsing time, no batching.

`FrameTamper` is the tamper function of the `mitm` attack: for a frame on `frames/...` it decides with the
attack's `AttackWindow` and perturbs with `iotbed.attacks.network.tamper_frame`, as the simulated
`ManInTheMiddle` does, re-encodes the frame (8-bit pixels) and records the frame ids it changed.

What it does not model: reading TLS (ciphertext, like any stream that does not parse as MQTT, is counted as
unreadable and forwarded unchanged for the rest of that connection; the proxy holds no key), changing what
the broker sends, dropping, delaying or reordering packets, or changing anything but a PUBLISH payload
(packet ids, flags and properties go as the client wrote them). A packet whose Remaining Length is above
`max_remaining_length` is streamed through untouched without being buffered, and parsing resumes after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from iotbed.attacks.network import AttackWindow, tamper_frame
from iotbed.broker.packets import PacketType, encode_remaining_length
from iotbed.broker.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    FRAMES_ROOT,
    MalformedPayload,
    PixelsFor,
    decode_frame,
    encode_frame,
)
from iotbed.nodes.payloads import Frame

log = logging.getLogger(__name__)

MQTT_MAX_REMAINING_LENGTH = 268_435_455  # four bytes of 7 bits
Tamper = Callable[[str, bytes], bytes | None]

# The start of a CONNECT's variable header: protocol name and level (MQTT 3.1, 3.1.1, 5).
_CONNECT_PREFIXES = (b"\x00\x06MQIsdp\x03", b"\x00\x04MQTT\x04", b"\x00\x04MQTT\x05")
_FLAGS_0010 = {PacketType.PUBREL, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE}
AUTH = 15  # MQTT 5 only
# MQTT 5 PUBLISH properties: identifier -> fixed size, or how to read a variable one.
_FIXED_PROPERTIES = {0x01: 1, 0x02: 4, 0x23: 2}  # payload format, message expiry, topic alias
_STRING_PROPERTIES = {0x03, 0x08, 0x09}  # content type, response topic, correlation data
_USER_PROPERTY = 0x26
_SUBSCRIPTION_ID = 0x0B
_TOPIC_ALIAS = 0x23

RECV_BYTES = 256 * 1024
DEFAULT_BUFFER_LIMIT = 4 * 1024 * 1024
SELECT_TIMEOUT_S = 0.25  # how often deadlines (connect, linger) are checked


class Unreadable(ValueError):
    """Client bytes that are not an MQTT stream this proxy can follow."""


@dataclass
class ProxyStats:
    connections: int = 0  # client connections accepted
    publishes_seen: int = 0
    publishes_tampered: int = 0  # PUBLISH packets whose payload `tamper` replaced
    unreadable_connections: int = 0  # streams given up on and forwarded unchanged (TLS, garbage)
    tamper_errors: int = 0  # `tamper` raised (or returned an impossible payload): the original went on
    oversized_packets: int = 0  # streamed through unparsed: Remaining Length above the bound


# --- parsing -------------------------------------------------------------------------------------------------
def read_varint(data: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """A variable byte integer at `pos`: (value, position after it), None when bytes are missing before
    `end`. Raises `Unreadable` for one longer than 4 bytes."""
    value = 0
    for k in range(4):
        if pos + k >= end:
            return None
        byte = data[pos + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return value, pos + k + 1
    raise Unreadable("a variable byte integer longer than 4 bytes")


def check_first_byte(first: int, level: int | None) -> None:
    """Raise `Unreadable` for a packet type or flags no MQTT client sends (what TLS or noise looks like)."""
    kind, flags = first >> 4, first & 0x0F
    if kind == 0 or (kind == AUTH and level != 5):
        raise Unreadable(f"packet type {kind}")
    if kind == PacketType.PUBLISH:
        if (flags >> 1) & 3 == 3:
            raise Unreadable("PUBLISH with QoS 3")
    elif flags != (2 if kind in _FLAGS_0010 else 0):
        raise Unreadable(f"packet type {kind} with flags {flags:#x}")


def connect_level(data: bytes | bytearray, start: int, remaining: int) -> int | None:
    """The protocol level of the CONNECT whose variable header starts at `start`; None while too few bytes
    are in to tell. Raises `Unreadable` as soon as the bytes in cannot start one."""
    head = bytes(data[start : start + min(remaining, 9)])
    matching = [p for p in _CONNECT_PREFIXES if p[: len(head)] == head[: len(p)]]
    if not matching:
        raise Unreadable("not an MQTT CONNECT")
    complete = [p for p in matching if len(head) >= len(p)]
    if complete:
        return complete[0][-1]
    if len(head) == min(remaining, 9):  # all of the packet's first bytes are in, and they are too few
        raise Unreadable("a CONNECT too short for its protocol name")
    return None


def topic_alias(data: bytes, pos: int, end: int) -> int | None:
    """The Topic Alias among the MQTT 5 PUBLISH properties in data[pos:end], if any."""
    alias = None
    while pos < end:
        ident = data[pos]
        pos += 1
        if ident in _FIXED_PROPERTIES:
            if ident == _TOPIC_ALIAS and pos + 2 <= end:
                alias = int.from_bytes(data[pos : pos + 2], "big")
            pos += _FIXED_PROPERTIES[ident]
        elif ident in _STRING_PROPERTIES:
            pos += 2 + int.from_bytes(data[pos : pos + 2], "big")
        elif ident == _USER_PROPERTY:
            pos += 2 + int.from_bytes(data[pos : pos + 2], "big")
            pos += 2 + int.from_bytes(data[pos : pos + 2], "big")
        elif ident == _SUBSCRIPTION_ID:
            varint = read_varint(data, pos, end)
            if varint is None:
                raise Unreadable("truncated subscription identifier")
            pos = varint[1]
        else:
            raise Unreadable(f"PUBLISH property {ident:#x}")
        if pos > end:
            raise Unreadable("PUBLISH properties overrun their length")
    return alias


class MqttStreamRewriter:
    """One connection's client->broker byte stream in, the bytes to forward out (`feed`), PUBLISH payloads
    replaced by `tamper`'s results. Pure: no sockets, so it is tested by feeding bytes.

    Buffers at most one packet of up to `max_remaining_length` bytes (plus one read); a bigger packet is
    streamed through as it comes. After bytes it cannot parse it forwards everything unchanged (`readable`
    turns False)."""

    def __init__(
        self,
        tamper: Tamper,
        stats: ProxyStats | None = None,
        max_remaining_length: int = MQTT_MAX_REMAINING_LENGTH,
    ) -> None:
        if not 0 < max_remaining_length <= MQTT_MAX_REMAINING_LENGTH:
            raise ValueError(f"max_remaining_length must be in 1..{MQTT_MAX_REMAINING_LENGTH}")
        self.tamper = tamper
        self.stats = ProxyStats() if stats is None else stats
        self.max_remaining_length = max_remaining_length
        self.level: int | None = None  # the CONNECT's protocol level: 3, 4 (3.1.1) or 5
        self.readable = True
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized packet still to stream through
        self._aliases: dict[int, str] = {}

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> bytes:
        if not self.readable:
            return bytes(data)
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        try:
            while pos < len(buf):
                if self._skip:
                    n = min(self._skip, len(buf) - pos)
                    out += buf[pos : pos + n]
                    pos += n
                    self._skip -= n
                    continue
                after = self._packet(buf, pos, out)
                if after is None:
                    break
                pos = after
        except Unreadable as exc:
            log.debug("client stream unreadable, forwarding it unchanged: %s", exc)
            self.readable = False
            self.stats.unreadable_connections += 1
            out += buf[pos:]
            pos = len(buf)
        del buf[:pos]
        return bytes(out)

    def flush(self) -> bytes:
        """What is buffered of an incomplete packet (the client went away): to forward as it came."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _packet(self, buf: bytearray, pos: int, out: bytearray) -> int | None:
        """Forward (into `out`) the packet at `pos` if it is complete; the position after it, or None."""
        first = buf[pos]
        check_first_byte(first, self.level)
        if self.level is None and first >> 4 != PacketType.CONNECT:
            raise Unreadable("the first packet is not a CONNECT")
        varint = read_varint(buf, pos + 1, len(buf))
        if varint is None:
            return None
        remaining, start = varint
        end = start + remaining
        if self.level is None:
            level = connect_level(buf, start, remaining)
            if remaining > self.max_remaining_length:
                raise Unreadable(f"a {remaining}-byte CONNECT")
            if level is None or end > len(buf):
                return None
            self.level = level
        elif remaining > self.max_remaining_length:
            self.stats.oversized_packets += 1  # refused before buffering: streamed through unparsed
            out += buf[pos:start]
            self._skip = remaining
            return start
        if end > len(buf):
            return None
        if first >> 4 == PacketType.PUBLISH:
            out += self._publish(first, bytes(buf[pos:start]), bytes(buf[start:end]))
        else:
            out += buf[pos:end]
        return end

    def _publish(self, first: int, header: bytes, body: bytes) -> bytes:
        """The PUBLISH to forward: the original, or its variable header with `tamper`'s payload."""
        if len(body) < 2:
            raise Unreadable("PUBLISH without a topic length")
        topic_end = 2 + int.from_bytes(body[:2], "big")
        pos = topic_end + (2 if (first >> 1) & 3 else 0)  # then a packet id at QoS 1 and 2
        if pos > len(body):
            raise Unreadable("PUBLISH shorter than its topic")
        try:
            topic = body[2:topic_end].decode("utf-8")
        except UnicodeDecodeError:
            raise Unreadable("PUBLISH topic is not UTF-8") from None
        if self.level == 5:
            varint = read_varint(body, pos, len(body))
            if varint is None or varint[1] + varint[0] > len(body):
                raise Unreadable("PUBLISH properties overrun the packet")
            alias = topic_alias(body, varint[1], varint[1] + varint[0])
            pos = varint[1] + varint[0]
            if alias is not None and topic:
                self._aliases[alias] = topic
            elif alias is not None:
                topic = self._aliases.get(alias, "")
        self.stats.publishes_seen += 1
        if not topic:
            return header + body  # malformed, or an alias never set: the broker will refuse it
        return self._replace(first, header, body, topic, pos)

    def _replace(self, first: int, header: bytes, body: bytes, topic: str, payload_at: int) -> bytes:
        try:
            new = self.tamper(topic, body[payload_at:])
        except Exception:  # an attacker's bug must not cut the client off: its packet goes as it was
            log.debug("tamper failed on %s", topic, exc_info=True)
            self.stats.tamper_errors += 1
            return header + body
        if new is None:
            return header + body
        remaining = payload_at + len(new)
        if remaining > MQTT_MAX_REMAINING_LENGTH:
            self.stats.tamper_errors += 1
            return header + body
        self.stats.publishes_tampered += 1
        return bytes((first,)) + encode_remaining_length(remaining) + body[:payload_at] + bytes(new)


# --- the proxy -----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection to the broker."""

    client: socket.socket
    upstream: socket.socket
    rewriter: MqttStreamRewriter
    deadline: float  # for the upstream connect, then (closing) for flushing what is left
    key: int = -1  # the client's descriptor, its key in the proxy's table
    to_upstream: bytearray = dataclasses.field(default_factory=bytearray)
    to_client: bytearray = dataclasses.field(default_factory=bytearray)
    connected: bool = False
    closing: bool = False


class MqttTamperProxy:
    """A threaded TCP proxy between MQTT clients and a broker that rewrites PUBLISH payloads with `tamper`
    (None: forward everything, still parsed and counted). `start()` binds 127.0.0.1 (`port=0`: a free port,
    read `.port`) and runs one selector thread; `stop()` closes every connection and joins the thread."""

    def __init__(
        self,
        upstream: tuple[str, int],
        tamper: Tamper | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_remaining_length: int = MQTT_MAX_REMAINING_LENGTH,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        connect_timeout_s: float = 5.0,
        linger_s: float = 2.0,
    ) -> None:
        if not 0 < max_remaining_length <= MQTT_MAX_REMAINING_LENGTH:
            raise ValueError(f"max_remaining_length must be in 1..{MQTT_MAX_REMAINING_LENGTH}")
        self.upstream = upstream
        self.tamper: Tamper = tamper if tamper is not None else (lambda topic, payload: None)
        self.host = host
        self._port = port
        self.max_remaining_length = max_remaining_length
        self.buffer_limit = buffer_limit
        self.connect_timeout_s = connect_timeout_s
        self.linger_s = linger_s
        self._stats = ProxyStats()
        self._links: dict[int, _Link] = {}
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._upstream_family = socket.AF_INET
        self._upstream_address: tuple[object, ...] = upstream

    # -- public surface
    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def stats(self) -> ProxyStats:
        """A copy of the counters (the proxy thread alone updates them)."""
        return dataclasses.replace(self._stats)

    @property
    def active_connections(self) -> int:
        return len(self._links)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MqttTamperProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy was already started")
        family, _, _, _, address = socket.getaddrinfo(*self.upstream, type=socket.SOCK_STREAM)[0]
        self._upstream_family, self._upstream_address = family, address  # resolved once, not per client
        listener = socket.create_server((self.host, self._port), backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"mqtt-mitm-{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close every connection and the listener; idempotent."""
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            assert self._wake_w is not None
            self._wake_w.send(b"x")
        self._thread.join(timeout_s)

    def __enter__(self) -> MqttTamperProxy:
        return self.start() if self._thread is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the selector thread
    def _run(self) -> None:
        assert self._sel is not None
        try:
            while not self._stopping.is_set():
                for key, mask in self._sel.select(SELECT_TIMEOUT_S):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            key.fileobj.recv(64)  # type: ignore[union-attr]
                    else:
                        link, is_client = key.data
                        if link.client.fileno() >= 0:  # not closed by an earlier event of this round
                            self._guarded_event(link, is_client, mask)
                now = time.monotonic()
                for link in [lk for lk in self._links.values() if lk.deadline <= now]:
                    if link.closing or not link.connected:
                        self._close(link)  # the broker did not answer, or a peer stopped reading
        except Exception:  # pragma: no cover - a bug here must not leave sockets open
            log.exception("MITM proxy thread failed")
        finally:
            for link in list(self._links.values()):
                self._close(link)
            for sock in (self._listener, self._wake_r, self._wake_w):
                if sock is not None:
                    with contextlib.suppress(OSError, KeyError, ValueError):
                        self._sel.unregister(sock)
                    sock.close()
            self._sel.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: leave the rest in the backlog for now
                log.warning("MITM proxy accept failed: %s", exc)
                return
            self._stats.connections += 1
            try:
                upstream = socket.socket(self._upstream_family, socket.SOCK_STREAM)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setblocking(False)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames go at once
            rewriter = MqttStreamRewriter(self.tamper, self._stats, self.max_remaining_length)
            link = _Link(client, upstream, rewriter, time.monotonic() + self.connect_timeout_s, client.fileno())
            self._links[link.key] = link
            err = upstream.connect_ex(self._upstream_address)
            if err not in (0, errno.EINPROGRESS):
                self._close(link)
                continue
            link.connected = err == 0
            self._update(link)

    def _guarded_event(self, link: _Link, is_client: bool, mask: int) -> None:
        try:
            self._event(link, is_client, mask)
        except Exception:  # a bug met on one connection ends that connection, not the proxy
            log.exception("MITM proxy: closing a connection after an unexpected error")
            self._close(link)

    def _event(self, link: _Link, is_client: bool, mask: int) -> None:
        try:
            if not is_client and not link.connected:
                err = link.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, "connect to the broker failed")
                link.connected = True
            if mask & selectors.EVENT_READ:
                self._read(link, is_client)
            self._send(link)
        except OSError as exc:
            log.debug("MITM proxy connection ended: %s", exc)
            self._close(link)
            return
        self._update(link)

    def _read(self, link: _Link, is_client: bool) -> None:
        sock = link.client if is_client else link.upstream
        try:
            data = sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        if not data:  # end of stream: flush what is pending, then close both sides
            if is_client:
                link.to_upstream += link.rewriter.flush()
            link.closing = True
            link.deadline = time.monotonic() + self.linger_s
        elif is_client:
            link.to_upstream += link.rewriter.feed(data)
        else:
            link.to_client += data

    def _send(self, link: _Link) -> None:
        for sock, buf, ready in (
            (link.upstream, link.to_upstream, link.connected),
            (link.client, link.to_client, True),
        ):
            if buf and ready:
                try:
                    sent = sock.send(buf)
                except (BlockingIOError, InterruptedError):
                    continue
                del buf[:sent]

    def _update(self, link: _Link) -> None:
        """Watch each socket for what it can do now; close the pair once a closing one is flushed."""
        if link.closing and not link.to_upstream and not link.to_client:
            self._close(link)
            return
        reading = not link.closing
        client_events = (selectors.EVENT_READ if reading and len(link.to_upstream) < self.buffer_limit else 0) | (
            selectors.EVENT_WRITE if link.to_client else 0
        )
        if link.connected:
            upstream_events = (selectors.EVENT_READ if reading and len(link.to_client) < self.buffer_limit else 0) | (
                selectors.EVENT_WRITE if link.to_upstream else 0
            )
        else:
            upstream_events = selectors.EVENT_WRITE  # writable once connected
        self._watch(link.client, client_events, (link, True))
        self._watch(link.upstream, upstream_events, (link, False))

    def _watch(self, sock: socket.socket, events: int, data: tuple[_Link, bool]) -> None:
        assert self._sel is not None
        key = self._sel.get_map().get(sock)
        if not events:
            if key is not None:
                self._sel.unregister(sock)
        elif key is None:
            self._sel.register(sock, events, data)
        elif key.events != events:
            self._sel.modify(sock, events, data)

    def _close(self, link: _Link) -> None:
        assert self._sel is not None
        for sock in (link.client, link.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
        self._links.pop(link.key, None)
        for sock in (link.client, link.upstream):
            with contextlib.suppress(OSError):
                sock.close()


# --- frames --------------------------------------------------------------------------------------------------
class FrameTamper:
    """The `mitm` attack as a `tamper` function for `MqttTamperProxy`: frames published under `frames/`
    are decided with `window.strikes(now())` and changed with `tamper_frame`, as `ManInTheMiddle` changes
    them in simulation, then re-encoded (pixels rounded to 8 bits, as a camera sends them).

    A frame is decided once, by (camera index, frame id): a retransmission of the same bytes gets the same
    tampered bytes without a new draw, and any other copy (this attacker's own output coming back through a
    gateway, say) is left alone, as the simulated attacker never changes a frame twice. The ids of the frames
    changed are in `tampered_ids()`; `window.frames_attacked` counts them. Thread-safe."""

    def __init__(
        self,
        window: AttackWindow,
        now: Callable[[], float],
        pixels_for: PixelsFor | None = None,
        *,
        root: str = FRAMES_ROOT,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        remember: int = 65_536,
    ) -> None:
        self.window = window
        self.label = window.label
        self._now = now
        self.pixels_for = pixels_for  # for encode_frame; frames off the wire carry their pixels, so a fallback
        self.root = root
        self.max_frame_bytes = max_frame_bytes
        self.remember = remember
        self.frames_seen = 0
        self.undecodable = 0  # under frames/ but no frame, or not one of the window's images: left alone
        self._lock = threading.Lock()
        self._decided: OrderedDict[tuple[int, int], tuple[bool, int]] = OrderedDict()  # -> (tampered, hash)
        self._tampered: list[int] = []

    def tampered_ids(self) -> list[int]:
        """The frame ids changed so far, in the order they were changed (a copy)."""
        with self._lock:
            return list(self._tampered)

    def __call__(self, topic: str, payload: bytes) -> bytes | None:
        if topic != self.root and not topic.startswith(self.root + "/"):
            return None
        try:
            frame = decode_frame(payload, self.max_frame_bytes)
        except MalformedPayload:
            frame = None
        if frame is None or not self._fits(frame):
            with self._lock:
                self.undecodable += 1
            return None
        key, digest = (frame.camera_index, frame.frame_id), hash(payload)
        if not self._strikes(key, digest):
            return None
        try:
            return encode_frame(tamper_frame(frame, self.window), self.pixels_for)
        except Exception:
            self._unrecord(key, digest)  # the proxy forwards the original: the record must say so
            raise

    def _fits(self, frame: Frame) -> bool:
        """Whether the window has an image for this frame, of its shape (an attacker may publish anything)."""
        clean = self.window.clean
        return 0 <= frame.image_index < len(clean) and tuple(clean.shape[1:]) == tuple(frame.shape)

    def _strikes(self, key: tuple[int, int], digest: int) -> bool:
        with self._lock:
            self.frames_seen += 1
            seen = self._decided.get(key)
            if seen is not None:
                return seen[0] and seen[1] == digest  # the same bytes again: a retransmission
            strikes = self.window.strikes(self._now())
            self._decided[key] = (strikes, digest)
            if len(self._decided) > self.remember:
                self._decided.popitem(last=False)
            if strikes:
                self._tampered.append(key[1])
                self.window.frames_attacked += 1
            return strikes

    def _unrecord(self, key: tuple[int, int], digest: int) -> None:
        with self._lock:
            self._decided[key] = (False, digest)
            if key[1] in self._tampered:
                del self._tampered[len(self._tampered) - 1 - self._tampered[::-1].index(key[1])]
                self.window.frames_attacked -= 1
