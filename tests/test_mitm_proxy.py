"""The live man in the middle (`iotbed.emulation.mitm`): the MQTT stream rewriter on hand-made bytes, the
frame tamper function, and the TCP proxy between paho clients and a real Mosquitto (plain and TLS), fed
garbage too. A frame it changes must match what the simulated `ManInTheMiddle` makes of the same frame."""

from __future__ import annotations

import contextlib
import queue
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from mosquitto_fixtures import WAIT_S
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iotbed.attacks.network import AttackWindow, ManInTheMiddle
from iotbed.broker.messages import Publish
from iotbed.broker.mosquitto import MosquittoBroker
from iotbed.broker.packets import encode_remaining_length
from iotbed.broker.wire import decode_frame, encode_frame
from iotbed.codecs.pixel_drop import PixelDropCodec
from iotbed.emulation.mitm import FrameTamper, MqttStreamRewriter, MqttTamperProxy, ProxyStats
from iotbed.nodes.payloads import FRAME_HEADER, Frame
from iotbed.sim.network import Packet

SHAPE = (3, 8, 8)
N_IMAGES = 4
_images = np.random.default_rng(123)
CLEAN_U8 = _images.integers(0, 256, (N_IMAGES, *SHAPE), dtype=np.uint8)
CLEAN = CLEAN_U8.astype(np.float32) * np.float32(1.0 / 255.0)  # what decode_frame makes of the camera's bytes
ADVERSARIAL = np.clip(CLEAN + _images.uniform(-0.2, 0.2, CLEAN.shape).astype(np.float32), 0.0, 1.0)
CODECS: dict[str, PixelDropCodec | None] = {
    "raw": None,
    "bitmap": PixelDropCodec(4, 0.25, "bitmap"),
    "seed": PixelDropCodec(4, 0.25, "seed"),
}


def make_window(fraction: float = 1.0, seed: int = 7) -> AttackWindow:
    """An attacker active from 0 s to 10 s; twins made with the same seed draw the same frames."""
    return AttackWindow("mitm", 0.0, 10.0, fraction, np.random.default_rng(seed), ADVERSARIAL, CLEAN)


def frame_bytes(frame_id: int, codec: str = "raw", camera: int = 0) -> bytes:
    drop = CODECS[codec]
    frame = Frame(frame_id, camera, 1.0 + frame_id, frame_id % N_IMAGES, frame_id % 10, SHAPE, 0, drop=drop)
    frame.mask_seed = 1000 + frame_id if drop is not None else -1
    return encode_frame(frame, lambda f: CLEAN_U8[f.image_index])


def simulated(window: AttackWindow, payload: bytes, now: float = 1.0) -> Frame | None:
    """What the simulated man in the middle makes of this frame: the changed frame, or None."""
    message = Publish("frames/cam-0", decode_frame(payload), 1)
    ManInTheMiddle(window, lambda: now)(Packet(None, None, 0, message))  # type: ignore[arg-type]
    return message.payload if message.payload.attack else None


def to_u8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def assert_tampered_as_simulated(received: bytes, original: bytes, expected: Frame) -> None:
    assert received != original and len(received) == len(original)
    assert received[: FRAME_HEADER.size] == original[: FRAME_HEADER.size]  # ids, shape, codec untouched
    got, sent = decode_frame(received), decode_frame(original)
    kept = np.ones(SHAPE[1:], dtype=bool) if sent.mask is None else ~sent.mask
    if sent.mask is not None:
        assert np.array_equal(got.mask, sent.mask)
    assert np.array_equal(to_u8(got.pixels)[:, kept], to_u8(expected.pixels)[:, kept])
    # Independently of the shared function: the camera sent clean pixels, so the attacker's are adversarial.
    off = to_u8(got.pixels).astype(int) - to_u8(ADVERSARIAL[sent.image_index]).astype(int)
    assert np.abs(off[:, kept]).max() <= 1


# --- hand-made MQTT packets --------------------------------------------------------------------------------
def mqtt_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def connect_packet(level: int = 4, client_id: str = "hand") -> bytes:
    variable = mqtt_string("MQTT") + bytes((level, 0x02)) + (60).to_bytes(2, "big")
    if level == 5:
        variable += b"\x00"  # no properties
    body = variable + mqtt_string(client_id)
    return b"\x10" + encode_remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int = 0, level: int = 4, props: bytes = b"", pid: int = 1) -> bytes:
    body = mqtt_string(topic) + (pid.to_bytes(2, "big") if qos else b"")
    if level == 5:
        body += encode_remaining_length(len(props)) + props
    body += payload
    return bytes((0x30 | qos << 1,)) + encode_remaining_length(len(body)) + body


def reverse_under_t(topic: str, payload: bytes) -> bytes | None:
    return payload[::-1] if topic.startswith("t/") else None


# --- the rewriter alone ------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [4, 5])
def test_rewriter_replaces_payloads_whatever_the_read_sizes(level: int) -> None:
    props = b"\x26" + mqtt_string("k") + mqtt_string("v") + b"\x02\x00\x00\x00\x3c" + b"\x23\x00\x01"
    stream = (
        connect_packet(level)
        + publish_packet("t/a", b"abc" * 50, 0, level, props if level == 5 else b"")
        + publish_packet("u/b", b"left alone", 1, level)
        + publish_packet("t/c", bytes(range(200)), 2, level, pid=7)
        + b"\xc0\x00"  # PINGREQ
    )
    if level == 5:  # an empty topic that names the alias set above
        stream += publish_packet("", b"via alias", 1, level, b"\x23\x00\x01", pid=9)
    expected = (
        connect_packet(level)
        + publish_packet("t/a", (b"abc" * 50)[::-1], 0, level, props if level == 5 else b"")
        + publish_packet("u/b", b"left alone", 1, level)
        + publish_packet("t/c", bytes(range(200))[::-1], 2, level, pid=7)
        + b"\xc0\x00"
    )
    if level == 5:
        expected += publish_packet("", b"via alias"[::-1], 1, level, b"\x23\x00\x01", pid=9)
    whole = MqttStreamRewriter(reverse_under_t)
    assert whole.feed(stream) == expected
    bytewise = MqttStreamRewriter(reverse_under_t)
    assert b"".join(bytewise.feed(stream[i : i + 1]) for i in range(len(stream))) == expected
    assert bytewise.buffered == 0 and bytewise.level == level
    n = 4 if level == 5 else 3
    assert whole.stats == bytewise.stats == ProxyStats(publishes_seen=n, publishes_tampered=n - 1)


def test_rewriter_re_encodes_the_remaining_length() -> None:
    grow = MqttStreamRewriter(lambda topic, payload: payload * 100)  # 100 bytes of remaining length -> 10,000+
    packet = publish_packet("t/x", b"y" * 95)
    out = grow.feed(connect_packet() + packet)[len(connect_packet()) :]
    assert out == publish_packet("t/x", b"y" * 9500)
    assert out[1:3] == encode_remaining_length(2 + 3 + 9500)  # two bytes now, one before


def test_rewriter_streams_an_oversized_packet_without_buffering_it() -> None:
    rewriter = MqttStreamRewriter(reverse_under_t, max_remaining_length=1000)
    connect = connect_packet()
    assert rewriter.feed(connect) == connect
    big_body = mqtt_string("t/big") + bytes(200_000)
    head = b"\x30" + encode_remaining_length(len(big_body))
    out = bytearray(rewriter.feed(head))
    for i in range(0, len(big_body), 4096):
        out += rewriter.feed(big_body[i : i + 4096])
        assert rewriter.buffered <= 4096  # never more than the read at hand
    small = publish_packet("t/s", b"after")
    out += rewriter.feed(small)
    assert bytes(out) == head + big_body + publish_packet("t/s", b"retfa")  # in step again after it
    assert rewriter.stats.oversized_packets == 1 and rewriter.stats.publishes_tampered == 1


@pytest.mark.parametrize(
    "stream",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS ClientHello
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x3c\x00\x00",  # a CONNECT with the wrong protocol name
        b"\x30\x05\x00\x01t\x00\x00",  # a PUBLISH before any CONNECT
        connect_packet() + b"\x30\xff\xff\xff\xff\x01",  # a five-byte remaining length
        connect_packet() + b"\x36\x02\x00\x00",  # QoS 3
        connect_packet() + b"\x32\x04\x00\x09ab",  # a topic longer than the packet
        connect_packet(5) + publish_packet("t/a", b"x", 0, 5, b"\x7f\x00"),  # an unknown property
    ],
    ids=["tls", "http", "protocol_name", "publish_first", "long_length", "qos3", "topic_overrun", "property"],
)
def test_rewriter_gives_up_on_what_does_not_parse(stream: bytes) -> None:
    calls: list[str] = []
    rewriter = MqttStreamRewriter(lambda topic, payload: calls.append(topic) or b"changed")
    out = b"".join(rewriter.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    assert out == stream and not rewriter.readable and calls == []
    assert rewriter.stats.unreadable_connections == 1
    assert rewriter.feed(publish_packet("t/a", b"x")) == publish_packet("t/a", b"x")  # unchanged from then on


def test_rewriter_forwards_the_original_when_tamper_raises() -> None:
    def broken(topic: str, payload: bytes) -> bytes | None:
        raise RuntimeError("attacker bug")

    rewriter = MqttStreamRewriter(broken)
    stream = connect_packet() + publish_packet("t/a", b"x") + publish_packet("t/b", b"y", 1)
    assert rewriter.feed(stream) == stream
    assert rewriter.readable and rewriter.stats.tamper_errors == 2 and rewriter.stats.publishes_seen == 2


# --- the frame tamper function -----------------------------------------------------------------------------
@pytest.mark.parametrize("codec", list(CODECS))
def test_frame_tamper_changes_a_frame_once_as_simulated(codec: str) -> None:
    window = make_window(fraction=0.5, seed=3)
    tamper = FrameTamper(window, lambda: 1.0)
    twin = make_window(fraction=0.5, seed=3)
    outcomes = []
    for frame_id in range(12):
        original = frame_bytes(frame_id, codec)
        expected = simulated(twin, original)
        got = tamper("frames/cam-0", original)
        outcomes.append(got is not None)
        if expected is None:
            assert got is None
            continue
        assert got is not None
        assert_tampered_as_simulated(got, original, expected)
        state = window.rng.bit_generator.state
        assert tamper("frames/cam-0", original) == got  # a retransmission: the same bytes, no new draw
        assert tamper("frames/cam-0", got) is None  # its own output coming back is not changed twice
        assert window.rng.bit_generator.state == state
    assert 0 < sum(outcomes) < len(outcomes)  # the fraction really chose
    assert tamper.tampered_ids() == [i for i, hit in enumerate(outcomes) if hit]
    assert window.frames_attacked == twin.frames_attacked == sum(outcomes)


def test_frame_tamper_leaves_other_topics_and_non_frames_alone() -> None:
    window = make_window()
    tamper = FrameTamper(window, lambda: 1.0)
    frame = frame_bytes(1)
    assert tamper("status/cam-0", frame) is None
    assert tamper("framesX/cam-0", frame) is None
    assert tamper("frames/cam-0", b"not a frame") is None and tamper.undecodable == 1
    assert FrameTamper(make_window(), lambda: 10.0)("frames/cam-0", frame) is None  # after the window
    assert tamper.tampered_ids() == [] and window.frames_attacked == 0
    stranger = Frame(3, 0, 1.0, N_IMAGES + 5, 0, SHAPE, 0)  # an image the attacker has nothing for
    assert tamper("frames/cam-0", encode_frame(stranger, lambda f: CLEAN_U8[0])) is None and tamper.undecodable == 2


def test_frame_tamper_records_nothing_when_encoding_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    window = make_window()
    tamper = FrameTamper(window, lambda: 1.0)

    def broken(frame: Frame, window: AttackWindow) -> Frame:
        raise ValueError("cannot")

    monkeypatch.setattr("iotbed.emulation.mitm.tamper_frame", broken)
    with pytest.raises(ValueError):
        tamper("frames/cam-0", frame_bytes(4))
    assert tamper.tampered_ids() == [] and window.frames_attacked == 0
    assert tamper("frames/cam-0", frame_bytes(4)) is None  # decided: left alone from now on


# --- against Mosquitto -------------------------------------------------------------------------------------
def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    properties: Any


@contextlib.contextmanager
def paho_client(
    host: str, port: int, client_id: str, v5: bool = True, tls_ca: str | None = None
) -> Iterator[mqtt.Client]:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    )
    if tls_ca is not None:
        client.tls_set(ca_certs=tls_ca)
    connected: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda c, u, flags, rc, props: connected.put(rc)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        rc = connected.get(timeout=WAIT_S)
        assert not rc.is_failure, f"CONNACK {rc}"
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.contextmanager
def subscriber(broker: MosquittoBroker) -> Iterator[list[Received]]:
    """A client straight on the broker (not through the proxy), subscribed to everything at QoS 2."""
    inbox: list[Received] = []
    ca = str(broker.ca_file) if broker.config.tls else None
    with paho_client(broker.host, broker.port, "watcher", tls_ca=ca) as client:
        subscribed: queue.Queue[Any] = queue.Queue()
        client.on_message = lambda c, u, m: inbox.append(Received(m.topic, bytes(m.payload), m.qos, m.properties))
        client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
        client.subscribe("#", qos=2)
        subscribed.get(timeout=WAIT_S)
        yield inbox


def publish(client: mqtt.Client, topic: str, payload: bytes, qos: int, props: Properties | None = None) -> None:
    client.publish(topic, payload, qos, properties=props).wait_for_publish(WAIT_S)


def publish_properties(frame_id: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("frame", str(frame_id))]
    props.MessageExpiryInterval = 60
    props.ContentType = "application/x-iotbed-frame"
    props.CorrelationData = b"\x01\x02"
    props.ResponseTopic = "replies/cam-0"
    return props


def by_header(inbox: list[Received], topic: str, payload: bytes) -> Received:
    """The message received on `topic` whose first bytes (a frame's header) are those of `payload`."""
    found = [m for m in inbox if m.topic == topic and m.payload[: FRAME_HEADER.size] == payload[: FRAME_HEADER.size]]
    assert len(found) == 1, f"{len(found)} messages on {topic} for that header"
    return found[0]


@pytest.mark.parametrize("v5", [False, True], ids=["mqtt311", "mqtt5"])
def test_proxy_tampers_frames_as_the_simulated_attacker(plain_broker: MosquittoBroker, v5: bool) -> None:
    clock = [1.0]
    window, twin = make_window(), make_window()
    tamper = FrameTamper(window, lambda: clock[0])
    frames: list[tuple[str, bytes, Frame | None]] = []  # topic, bytes sent, the simulated attacker's frame
    with_props: set[int] = set()  # frame ids published with MQTT 5 properties
    others: list[tuple[str, bytes]] = []  # what must arrive byte-identical
    frame_id = 0
    with MqttTamperProxy((plain_broker.host, plain_broker.port), tamper) as proxy, subscriber(plain_broker) as inbox:
        with paho_client("127.0.0.1", proxy.port, "cam-0", v5=v5) as cam:
            for qos in (0, 1, 2):
                for codec in CODECS:
                    frame_id += 1
                    topic, payload = f"frames/cam-0/{codec}/q{qos}", frame_bytes(frame_id, codec)
                    props = publish_properties(frame_id) if v5 and frame_id % 2 else None
                    if props is not None:
                        with_props.add(frame_id)
                    publish(cam, topic, payload, qos, props)
                    frames.append((topic, payload, simulated(twin, payload)))
            if v5:  # a topic alias set, then used with an empty topic
                for alias_topic in ("frames/cam-0/alias", ""):
                    frame_id += 1
                    props = Properties(PacketTypes.PUBLISH)
                    props.TopicAlias = 1
                    payload = frame_bytes(frame_id)
                    publish(cam, alias_topic, payload, 1, props)
                    frames.append(("frames/cam-0/alias", payload, simulated(twin, payload)))
            in_window = len(frames)
            for qos, topic in enumerate(("status/cam-0", "framesX/cam-0", "models/edge")):
                others.append((topic, frame_bytes(100 + qos)))  # frame bytes, but not on a frame topic
                publish(cam, topic, others[-1][1], qos)
            others.append(("frames/cam-0/junk", b"no frame here"))
            publish(cam, *others[-1], 1)
            wait_until(lambda: len(inbox) == len(frames) + len(others), "the frames inside the window")
            clock[0] = 20.0  # after the window: frames pass unchanged
            for qos in (0, 1, 2):
                payload = frame_bytes(200 + qos, "bitmap")
                publish(cam, f"frames/cam-0/late/q{qos}", payload, qos)
                frames.append((f"frames/cam-0/late/q{qos}", payload, None))
            wait_until(lambda: len(inbox) == len(frames) + len(others), "all messages")
        stats = proxy.stats

    for topic, payload, expected in frames:
        got = by_header(inbox, topic, payload)
        if expected is None:
            assert got.payload == payload
        else:
            assert_tampered_as_simulated(got.payload, payload, expected)
        frame_id = decode_frame(payload).frame_id
        if frame_id in with_props:  # the properties went as the client wrote them
            assert got.properties.UserProperty == [("frame", str(frame_id))]
            assert got.properties.ContentType == "application/x-iotbed-frame"
            assert got.properties.CorrelationData == b"\x01\x02"
    for topic, payload in others:
        assert [m.payload for m in inbox if m.topic == topic] == [payload]
    assert all(expected is not None for _, _, expected in frames[:in_window]) and (len(with_props) > 0) == v5
    assert tamper.tampered_ids() == [decode_frame(p).frame_id for _, p, e in frames if e is not None]
    assert window.frames_attacked == in_window and tamper.undecodable == 1
    assert stats == ProxyStats(connections=1, publishes_seen=len(frames) + len(others), publishes_tampered=in_window)


def test_proxy_draws_the_same_frames_as_the_simulation(plain_broker: MosquittoBroker) -> None:
    window, twin = make_window(fraction=0.5, seed=11), make_window(fraction=0.5, seed=11)
    tamper = FrameTamper(window, lambda: 1.0)
    sent = [frame_bytes(i, "seed") for i in range(24)]
    with MqttTamperProxy((plain_broker.host, plain_broker.port), tamper) as proxy, subscriber(plain_broker) as inbox:
        with paho_client("127.0.0.1", proxy.port, "cam-0", v5=False) as cam:
            for payload in sent:
                publish(cam, "frames/cam-0", payload, 1)
            wait_until(lambda: len(inbox) == len(sent), "24 frames")
    expected = [simulated(twin, payload) for payload in sent]  # in publish order, as the proxy saw them
    hits = [i for i, e in enumerate(expected) if e is not None]
    assert 0 < len(hits) < len(sent)
    for payload, wanted in zip(sent, expected):
        got = by_header(inbox, "frames/cam-0", payload).payload
        if wanted is None:
            assert got == payload
        else:
            assert_tampered_as_simulated(got, payload, wanted)
    assert tamper.tampered_ids() == hits and proxy.stats.publishes_tampered == len(hits)


def test_proxy_cannot_read_tls_and_forwards_it(tls_broker: MosquittoBroker) -> None:
    # The broker's certificate names 127.0.0.1 (an IP SAN) and localhost, and the proxy listens on
    # 127.0.0.1: the client verifies the broker's certificate through the proxy, end to end.
    window = make_window()
    tamper = FrameTamper(window, lambda: 1.0)
    ca = str(tls_broker.ca_file)
    sent = [frame_bytes(i) for i in range(3)]
    with MqttTamperProxy((tls_broker.host, tls_broker.port), tamper) as proxy, subscriber(tls_broker) as inbox:
        with paho_client("127.0.0.1", proxy.port, "cam-0", tls_ca=ca) as cam:
            for qos, payload in enumerate(sent):
                publish(cam, "frames/cam-0", payload, qos)
            wait_until(lambda: len(inbox) == len(sent), "the frames over TLS")
            stats = proxy.stats
    assert sorted(m.payload for m in inbox) == sorted(sent)
    assert stats == ProxyStats(connections=1, unreadable_connections=1)
    assert tamper.tampered_ids() == [] and window.frames_attacked == 0


def test_proxy_streams_packets_above_its_bound(plain_broker: MosquittoBroker) -> None:
    tamper = FrameTamper(make_window(), lambda: 1.0)
    big = bytes(range(256)) * 40  # 10,240 bytes, over the 4,096-byte bound
    upstream = (plain_broker.host, plain_broker.port)
    with MqttTamperProxy(upstream, tamper, max_remaining_length=4096) as proxy, subscriber(plain_broker) as inbox:
        with paho_client("127.0.0.1", proxy.port, "cam-0") as cam:
            publish(cam, "frames/cam-0", big, 1)
            publish(cam, "frames/cam-0", frame_bytes(5), 1)
            wait_until(lambda: len(inbox) == 2, "both messages")
        stats = proxy.stats
    assert inbox[0].payload == big
    assert inbox[1].payload != frame_bytes(5)  # parsing went on after the big one
    assert stats == ProxyStats(connections=1, publishes_seen=1, publishes_tampered=1, oversized_packets=1)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_client_leaving_mid_packet_closes_its_upstream(plain_broker: MosquittoBroker) -> None:
    with MqttTamperProxy((plain_broker.host, plain_broker.port)) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=WAIT_S) as sock:
            sock.sendall(connect_packet(4, "half"))
            assert read_exactly(sock, 4) == b"\x20\x02\x00\x00"  # the broker's CONNACK, passed through
            assert proxy.active_connections == 1
            sock.sendall(publish_packet("frames/cam-0", frame_bytes(1), 1)[:100])
        wait_until(lambda: proxy.active_connections == 0, "the proxy to close the broker side")
        assert proxy.running


def fuzz_case(rng: np.random.Generator, kind: int) -> bytes:
    """0: noise (never a CONNECT's first byte); 1: a CONNECT, then noise; 2: a five-byte remaining length;
    3: a PUBLISH announcing more than the bound, cut short; 4: a packet cut short."""
    noise = rng.integers(0, 256, int(rng.integers(1, 400)), dtype=np.uint8).tobytes()
    if kind == 0:
        return bytes((int(rng.choice([0x00, 0x16, 0x47, 0xFF, 0x30])),)) + noise
    if kind == 1:
        return connect_packet() + noise
    if kind == 2:
        return connect_packet(5) + b"\x30\x80\x80\x80\x80\x01" + noise
    if kind == 3:
        return connect_packet() + b"\x30" + encode_remaining_length(10_000_000) + noise
    packet = publish_packet("frames/cam-0", frame_bytes(1), 2)
    return connect_packet() + packet[: int(rng.integers(1, len(packet)))]


def test_garbage_does_not_stop_the_proxy(plain_broker: MosquittoBroker) -> None:
    rng = np.random.default_rng(2024)
    kinds = [i % 5 for i in range(40)]
    tamper = FrameTamper(make_window(), lambda: 1.0)
    upstream = (plain_broker.host, plain_broker.port)
    with MqttTamperProxy(upstream, tamper, max_remaining_length=65_536) as proxy, subscriber(plain_broker) as inbox:
        for kind in kinds:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", proxy.port), WAIT_S) as sock:
                sock.sendall(fuzz_case(rng, kind))
        with socket.create_connection(("127.0.0.1", proxy.port), WAIT_S) as held:  # garbage left open meanwhile
            held.sendall(b"\x16\x03\x01" + bytes(100))
            with paho_client("127.0.0.1", proxy.port, "cam-0", v5=False) as cam:
                publish(cam, "frames/cam-0", frame_bytes(9), 1)
                wait_until(lambda: len(inbox) == 1, "a frame after the garbage")
        wait_until(lambda: proxy.active_connections == 0, "every connection closed")
        assert proxy.running
        stats = proxy.stats
    assert inbox[0].payload != frame_bytes(9) and tamper.tampered_ids() == [9]
    assert stats.connections == len(kinds) + 2
    assert stats.unreadable_connections >= kinds.count(0) + kinds.count(2) + 1
    assert stats.oversized_packets == kinds.count(3)
    assert stats.publishes_tampered == 1 and stats.tamper_errors == 0
