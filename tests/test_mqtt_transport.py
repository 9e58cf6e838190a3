"""MqttTransport against a real Mosquitto (each test its own broker), and the wire format it carries.

Waits are conditions with deadlines (`wait_for`), never bare sleeps; where a test asserts that something
did NOT arrive it first waits for a later message on an ordered path (a sentinel), so the absence is settled.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import numpy as np
import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st
from mosquitto_fixtures import WAIT_S
from safetensors.numpy import save as save_safetensors

from iotbed.broker import packets, wire
from iotbed.broker.messages import Publish
from iotbed.broker.mosquitto import MosquittoBroker
from iotbed.broker.mqtt_transport import ConnectionRefused, MqttTransport, TransportError
from iotbed.broker.realtime import RealtimeBridge, wait_for
from iotbed.nodes.payloads import Frame, ModelUpdate, raw_frame_bytes

PROTOCOLS = [packets.MQTT5, packets.MQTT311]
Make = Callable[..., MqttTransport]


def run_until(env: simpy.Environment, predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    env.run(until=wait_for(env, predicate, timeout_s, what=what))


def connect_all(env: simpy.Environment, *clients: MqttTransport) -> None:
    for client in clients:
        env.run(until=client.connect())
    run_until(env, lambda: all(c.subscribed() for c in clients), "SUBACKs")


# --- wire format (no broker) ------------------------------------------------------------------------------
def _frame(shape: tuple[int, int, int] = (1, 8, 8), frame_id: int = 7) -> Frame:
    return Frame(frame_id, 2, 1.25, 41, 3, shape, raw_frame_bytes(shape))


def _pixels(frame: Frame) -> np.ndarray:
    return (np.arange(np.prod(frame.shape)) % 256).astype(np.uint8).reshape(frame.shape)


def test_wire_frame_round_trip() -> None:
    frame = _frame((3, 5, 4))
    data = wire.encode(frame, _pixels)
    assert len(data) == frame.nbytes  # the size the simulator charges is the size that travels
    decoded = wire.decode("frames/cam-0", data)
    assert (decoded.frame_id, decoded.camera_index, decoded.captured_at, decoded.image_index, decoded.label) == (
        7,
        2,
        1.25,
        41,
        3,
    )
    assert decoded.shape == (3, 5, 4) and decoded.nbytes == len(data)
    assert decoded.pixels.dtype == np.float32 and decoded.pixels.shape == (3, 5, 4)
    np.testing.assert_allclose(decoded.pixels, _pixels(frame) / 255.0, atol=1e-7)
    # A frame whose pixels a node changed travels as those pixels, quantised to 8 bits.
    decoded.frame_id = 8
    again = wire.decode("frames/cam-0", wire.encode(decoded))
    np.testing.assert_allclose(again.pixels, decoded.pixels, atol=0.5 / 255)


def test_wire_model_update_round_trip_and_other_topics() -> None:
    blob = save_safetensors({"w": np.ones((2, 3), np.float32)})
    update = wire.decode("models/classifier", wire.encode(ModelUpdate(5, blob)))
    assert update == ModelUpdate(5, blob) and update.nbytes == 6 + len(blob) == len(wire.encode(update))
    assert wire.decode("status/cam-0", b"offline") == b"offline"
    with pytest.raises(TypeError):
        wire.encode(object())
    with pytest.raises(ValueError, match="pixels_for"):
        wire.encode(_frame())


def _malformed_frames() -> dict[str, bytes]:
    good = wire.encode(_frame(), _pixels)
    header = bytearray(good[: wire.FRAME_HEADER.size])
    return {
        "truncated": b"IB",
        "bad_magic": b"XX" + good[2:],
        "bad_version": good[:2] + b"\x09" + good[3:],
        "bad_codec": good[:3] + b"\x07" + good[4:],
        "bad_length": good[:-1],
        "bad_shape": bytes(header[:4]) + b"\x00" + bytes(header[5:]) + good[len(header) :],
        "oversized": good + bytes(4096),
    }


def test_wire_rejects_malformed_payloads_with_a_reason() -> None:
    for reason, data in _malformed_frames().items():
        with pytest.raises(wire.MalformedPayload) as info:
            wire.decode("frames/cam-0", data, max_frame_bytes=2048)
        assert info.value.reason == reason, reason
    blob = save_safetensors({"w": np.ones((4,), np.float32)})
    bad_models = {
        "truncated": b"\x00\x00",
        "bad_model": struct.pack("!IH", 1, 0) + blob[:-3],  # a tensor past the end of the data
    }
    for reason, data in bad_models.items():
        with pytest.raises(wire.MalformedPayload) as info:
            wire.decode("models/classifier", data)
        assert info.value.reason == reason
    with pytest.raises(wire.MalformedPayload, match="not JSON"):
        wire.decode("models/classifier", struct.pack("!IH", 1, 0) + struct.pack("<Q", 4) + b"{{{{")


def test_transport_needs_a_realtime_environment() -> None:
    with pytest.raises(TypeError, match="RealtimeEnvironment"):
        MqttTransport(simpy.Environment(), "x")


# --- round trips on a plain broker ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos_round_trips_call_handlers_on_the_simpy_thread(
    plain_broker: MosquittoBroker, rt_env, transports: Make, protocol: str
) -> None:
    sub = transports(plain_broker, "sub", protocol=protocol)
    pub = transports(plain_broker, "pub", protocol=protocol)
    received: list[Publish] = []
    threads: set[int] = set()

    def handler(message: Publish) -> None:
        threads.add(threading.get_ident())
        received.append(message)

    for qos in (0, 1, 2):
        sub.subscribe(f"rt/q{qos}", handler, qos)
    connect_all(rt_env, sub, pub)
    confirms = [pub.publish(f"rt/q{qos}", f"{qos}:{i}", qos, confirm=True) for qos in (0, 1, 2) for i in range(20)]
    run_until(rt_env, lambda: len(received) >= 60 and all(c.triggered for c in confirms), "60 messages")

    assert threads == {threading.get_ident()}  # the thread that runs env.run, not paho's
    assert all(c.ok and c.value == 0 for c in confirms)
    for qos in (0, 1, 2):
        got = [m for m in received if m.topic == f"rt/q{qos}"]
        assert [m.payload for m in got] == [f"{qos}:{i}".encode() for i in range(20)]  # complete and in order
        assert all(m.qos == qos and not m.dup for m in got)
        assert all(m.packet_id is not None for m in got) if qos else True
    assert pub.stats.published == 60 and pub.stats.publish_confirmed == 60 and pub.stats.refusals == 0
    assert sub.stats.delivered == 60 and sub.stats.duplicates == 0 and sub.stats.malformed == 0


def test_retained_message_reaches_a_late_subscriber(plain_broker: MosquittoBroker, rt_env, transports: Make) -> None:
    pub = transports(plain_broker, "registry")
    rt_env.run(until=pub.connect())
    done = pub.publish("models/classifier", b"v1", 1, retain=True, confirm=True)
    rt_env.run(until=done)
    assert done.value == 0x10  # MQTT 5 PUBACK: accepted, no matching subscribers (yet)
    assert pub.stats.no_matching_subscribers == 1 and pub.stats.refusals == 0

    late = transports(plain_broker, "edge-late")
    got: list[Publish] = []
    late.subscribe("models/#", got.append, 1)
    rt_env.run(until=late.connect())
    run_until(rt_env, lambda: len(got) >= 1, "the retained message")
    assert got[0].payload == b"v1" and got[0].retain


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_session_gets_qos1_messages_published_while_offline(
    plain_broker: MosquittoBroker, rt_env, transports: Make, protocol: str
) -> None:
    first = transports(plain_broker, "edge-p", protocol=protocol, clean_session=False)
    first.subscribe("frames/#", lambda m: None, 1)
    connect_all(rt_env, first)
    first.close()

    pub = transports(plain_broker, "pub", protocol=protocol)
    rt_env.run(until=pub.connect())
    confirms = []
    if protocol == packets.MQTT5:  # expires while queued: the broker must not deliver it
        confirms.append(pub.publish("frames/cam-0", b"expiring", 1, confirm=True, expiry_s=1))
    confirms += [pub.publish("frames/cam-0", f"offline-{i}".encode(), 1, confirm=True) for i in range(5)]
    run_until(rt_env, lambda: all(c.triggered for c in confirms), "PUBACKs")
    if protocol == packets.MQTT5:
        # Let the 1 s expiry pass. Mosquitto keeps time in whole seconds and expires a message once the
        # second counter is past publish-second + 1, i.e. up to 2 s after publishing.
        rt_env.sync()  # real time spent outside env.run must not shorten this wait
        rt_env.run(until=rt_env.now + 2.5)

    got: list[bytes] = []
    again = transports(plain_broker, "edge-p", protocol=protocol, clean_session=False)
    again.subscribe("frames/#", lambda m: got.append(m.payload), 1)
    rt_env.run(until=again.connect())
    assert again.session_present is True
    run_until(rt_env, lambda: len(got) >= 5, "the queued messages")
    pub.publish("frames/cam-0", b"sentinel", 1)  # after everything queued, on the same ordered path
    run_until(rt_env, lambda: b"sentinel" in got, "the sentinel")
    assert got == [f"offline-{i}".encode() for i in range(5)] + [b"sentinel"]


def test_will_message_is_published_on_abrupt_death_only(
    plain_broker: MosquittoBroker, rt_env, transports: Make
) -> None:
    watcher = transports(plain_broker, "watcher")
    wills: list[Publish] = []
    watcher.subscribe("status/#", wills.append, 1)
    polite = transports(plain_broker, "cam-polite", will=Publish("status/cam-polite", b"offline", 1))
    victim = transports(plain_broker, "cam-victim", will=Publish("status/cam-victim", b"offline", 1))
    connect_all(rt_env, watcher, polite, victim)

    polite.close()  # clean DISCONNECT: the will is discarded
    victim.crash()  # TCP torn down without DISCONNECT: the broker publishes the will
    run_until(rt_env, lambda: any(m.topic == "status/cam-victim" for m in wills), "the will")
    rt_env.sync()
    rt_env.run(until=rt_env.now + 0.3)  # would a (wrong) will of the polite client show up as well?
    assert [(m.topic, m.payload) for m in wills] == [("status/cam-victim", b"offline")]


def _seq(i: int) -> bytes:
    return struct.pack("!I", i) + bytes(60)


def _restart_in_thread(
    env: simpy.Environment, broker: MosquittoBroker, at_s: list[float], kill: bool, done: list[float]
):
    """A SimPy process restarting the broker at each time in `at_s`, from a helper thread (so the SimPy
    thread keeps draining paho's queue while Mosquitto is down)."""
    for at in at_s:
        yield env.timeout(max(0.0, at - env.now))
        worker = threading.Thread(target=broker.restart, kwargs={"kill": kill})
        worker.start()
        yield wait_for(env, lambda w=worker: not w.is_alive(), WAIT_S, what="broker restart")
        done.append(env.now)


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_qos1_stream_survives_two_broker_restarts(broker_factory, rt_env, transports: Make, kill: bool) -> None:
    # SIGTERM: Mosquitto saves its database on the way down. SIGKILL: only what it autosaved survives, so
    # that broker saves on every change (`autosave_on_changes`), which a durable deployment would do.
    broker = broker_factory("durable", persistence=True, autosave_on_changes=kill)
    n, rate = 200, 50.0
    sub = transports(broker, "edge-0", clean_session=False)
    pub = transports(broker, "cam-0", clean_session=False)
    deliveries: list[int] = []
    sub.subscribe("frames/cam-0", lambda m: deliveries.append(struct.unpack_from("!I", m.payload)[0]), 1)
    connect_all(rt_env, sub, pub)
    old_port = broker.port
    confirms: list[simpy.Event] = []

    def stream():
        for i in range(n):
            confirms.append(pub.publish("frames/cam-0", _seq(i), 1, confirm=True))
            yield rt_env.timeout(1.0 / rate)

    restarts: list[float] = []
    rt_env.process(stream())
    rt_env.process(_restart_in_thread(rt_env, broker, [1.2, 2.6], kill=kill, done=restarts))
    run_until(
        rt_env,
        lambda: len(set(deliveries)) >= n and len(confirms) == n and all(c.triggered for c in confirms),
        "all 200 messages",
        timeout_s=40,
    )

    assert len(restarts) == 2 and broker.port == old_port and broker.starts == 3
    assert sorted(set(deliveries)) == list(range(n))  # nothing lost
    # Duplicates (by id) are possible and counted, never mistaken for new messages; the DUP-flag counter is
    # separate (a re-published message arrives without DUP, a DUP-flagged one may be a first copy).
    assert sub.stats.delivered == len(deliveries) >= n
    assert all(c.value == 0 for c in confirms) and pub.stats.publish_confirmed == n
    for client in (sub, pub):
        assert client.stats.connection_losses == 2 and client.stats.reconnects == 2, client.stats
    assert sub.session_present is True  # the persistent session came back from Mosquitto's database


def test_qos0_losses_across_a_broker_kill_are_counted(plain_broker: MosquittoBroker, rt_env, transports: Make) -> None:
    n, rate = 150, 100.0
    sub = transports(plain_broker, "edge-0")
    pub = transports(plain_broker, "cam-0")
    received: list[int] = []
    sub.subscribe("frames/cam-0", lambda m: received.append(struct.unpack_from("!I", m.payload)[0]), 0)
    connect_all(rt_env, sub, pub)
    sent = [0]

    def stream():
        for i in range(n):
            pub.publish("frames/cam-0", _seq(i), 0)
            sent[0] += 1
            yield rt_env.timeout(1.0 / rate)

    restarts: list[float] = []
    rt_env.process(stream())
    rt_env.process(_restart_in_thread(rt_env, plain_broker, [0.4], kill=True, done=restarts))
    # The tail of the stream flows again once both clients are back (and the subscriber subscribed again).
    run_until(
        rt_env,
        lambda: sent[0] == n and restarts and sub.subscribed() and (received and received[-1] == n - 1),
        "the end of the stream",
    )

    lost = n - len(set(received))
    assert lost > 0 and pub.stats.dropped_not_connected > 0
    assert pub.stats.dropped_not_connected <= lost  # what the sender knows it dropped is part of what was lost
    assert pub.stats.published == n
    assert len(received) == len(set(received))  # QoS 0: never twice
    for client in (sub, pub):
        assert client.stats.connection_losses == 1 and client.stats.reconnects == 1


# --- authentication and ACL ------------------------------------------------------------------------------
def test_unauthenticated_and_bad_password_clients_are_refused(
    auth_broker: MosquittoBroker, rt_env, transports: Make
) -> None:
    anonymous = transports(auth_broker, "intruder")
    anonymous.connect()
    run_until(rt_env, lambda: anonymous.stats.connect_refusals >= 1, "the refusal")
    assert not anonymous.connected.triggered and not anonymous.is_connected
    assert anonymous.stats.refusals == 1 and anonymous.stats.connects == 0
    assert anonymous.stats.refusal_log[0].code == 0x87  # Mosquitto 2: Not authorized
    assert anonymous.stats.refusal_reasons() == {"connect:Not authorized": 1}

    wrong = transports(
        auth_broker, "cam-0", username="cam-0", password="wrong", protocol=packets.MQTT311, raise_on_refusal=True
    )
    with pytest.raises(ConnectionRefused, match="refused the connection of 'cam-0'"):
        rt_env.run(until=wrong.connect())
    assert wrong.stats.connect_refusals == 1


def test_camera_cannot_publish_model_updates(auth_broker: MosquittoBroker, rt_env, transports: Make) -> None:
    def login(name: str, **kwargs) -> MqttTransport:
        user, password = auth_broker.credentials(name)
        return transports(auth_broker, kwargs.pop("client_id", name), username=user, password=password, **kwargs)

    edge, camera, registry = login("edge-0"), login("cam-0"), login("registry")
    camera311 = login("cam-1", protocol=packets.MQTT311)  # its own user: bound client ids, one session each
    frames: list[bytes] = []
    models: list[bytes] = []
    camera_reads: list[Publish] = []
    edge.subscribe("$share/edge/frames/#", lambda m: frames.append(m.payload), 1)
    edge.subscribe("models/#", lambda m: models.append(m.payload), 1)
    camera.subscribe("models/#", camera_reads.append, 1)  # the camera role reads nothing
    connect_all(rt_env, edge, camera, registry, camera311)

    denied = camera.publish("models/classifier", b"evil-q1", 1, confirm=True)
    camera.publish("models/classifier", b"evil-q0", 0)
    denied311 = camera311.publish("models/classifier", b"evil-311", 1, confirm=True)
    rt_env.run(until=denied & denied311)
    assert denied.value == 0x87  # MQTT 5: PUBACK "Not authorized"
    assert camera.stats.publish_refusals == 1 and camera.stats.refusal_log[0].topic == "models/classifier"
    assert denied311.value == 0 and camera311.stats.refusals == 0  # MQTT 3.1.1 has no reason codes: silent drop

    camera.publish("frames/cam-0", b"frame-0", 1)  # its own frames topic works
    camera.publish("frames/cam-1", b"spoofed", 1)  # another camera's topic does not
    registry.publish("models/classifier", b"v2", 1)
    run_until(rt_env, lambda: b"frame-0" in frames and b"v2" in models, "the permitted messages")
    camera.publish("frames/cam-0", b"sentinel", 1)  # after the spoofed one, on the same ordered path
    run_until(rt_env, lambda: b"sentinel" in frames, "the sentinel")
    assert models == [b"v2"]  # none of the camera's model updates reached a subscriber
    assert frames == [b"frame-0", b"sentinel"]
    assert camera_reads == []
    assert edge.stats.refusals == 0 and registry.stats.refusals == 0


# --- TLS ------------------------------------------------------------------------------------------------------
def test_tls_with_the_generated_ca(tls_broker: MosquittoBroker, rt_env, transports: Make) -> None:
    assert tls_broker.ca_file is not None and tls_broker.url.startswith("mqtts://")
    sub = transports(tls_broker, "edge-0", tls_ca=str(tls_broker.ca_file))
    pub = transports(tls_broker, "cam-0", tls_ca=str(tls_broker.ca_file))
    got: list[bytes] = []
    sub.subscribe("frames/#", lambda m: got.append(m.payload), 1)
    connect_all(rt_env, sub, pub)
    pub.publish("frames/cam-0", b"over tls", 1)
    run_until(rt_env, lambda: got == [b"over tls"], "the message over TLS")

    stranger = transports(tls_broker, "cam-1")  # TLS, but trusts only the system CAs
    with pytest.raises(TransportError, match="certificate verify failed.*tls_ca"):
        rt_env.run(until=stranger.connect())
    assert stranger.stats.connect_failures == 1 and stranger.stats.connects == 0


# --- malformed payloads -----------------------------------------------------------------------------------
def test_malformed_frames_are_counted_and_skipped(plain_broker: MosquittoBroker, rt_env, transports: Make) -> None:
    codec = wire.WireCodec(_pixels, max_frame_bytes=2048)
    edge = transports(plain_broker, "edge-0", codec=codec)
    attacker = transports(plain_broker, "attacker")  # raw bytes
    camera = transports(plain_broker, "cam-0", codec=codec)
    frames: list[Frame] = []
    edge.subscribe("frames/#", lambda m: frames.append(m.payload), 1)
    connect_all(rt_env, edge, attacker, camera)

    camera.publish("frames/cam-0", _frame(frame_id=1), 1)
    bad = _malformed_frames()
    for data in [*bad.values(), b""]:
        attacker.publish("frames/cam-0", data, 1)
    camera.publish("frames/cam-0", _frame(frame_id=2), 1)
    attacker.publish("frames/cam-9", b"trailing garbage", 1)
    run_until(rt_env, lambda: edge.stats.delivered + edge.stats.malformed >= 11, "all 11 messages")

    assert [f.frame_id for f in frames] == [1, 2]
    np.testing.assert_allclose(frames[0].pixels, _pixels(frames[0]) / 255.0, atol=1e-7)
    assert edge.stats.malformed == 9 and edge.stats.delivered == 2
    assert edge.stats.malformed_reasons == {**{reason: 1 for reason in bad}, "truncated": 3}


def test_bridge_serves_many_transports_with_one_poller(plain_broker: MosquittoBroker, rt_env) -> None:
    bridge = RealtimeBridge(rt_env, poll_s=0.005)
    clients = [MqttTransport(rt_env, f"cam-{i}", plain_broker.host, plain_broker.port, bridge=bridge) for i in range(5)]
    try:
        got: list[str] = []
        clients[0].subscribe("frames/#", lambda m: got.append(m.topic), 1)
        connect_all(rt_env, *clients)
        for i, client in enumerate(clients):
            client.publish(f"frames/cam-{i}", b"x", 1)
        run_until(rt_env, lambda: len(got) == 5, "5 messages")
        assert sorted(got) == [f"frames/cam-{i}" for i in range(5)]
    finally:
        for client in clients:
            client.close()


def test_lag_meter_percentiles_come_from_its_bins() -> None:
    from iotbed.broker.realtime import LagMeter

    meter = LagMeter()
    assert meter.report() == {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    for _ in range(98):
        meter.add(0.00005)  # 0.05 ms: the first 0.1-ms bin
    meter.add(0.0123)
    meter.add(-0.001)  # early (the poller ran before its due time) counts as on time
    assert meter.percentile_ms(50) == pytest.approx(0.1)
    assert meter.percentile_ms(99) == pytest.approx(0.1)
    assert meter.percentile_ms(100) == pytest.approx(12.3)
    other = LagMeter()
    other.add(2.0)  # beyond the last bin: counted there, and its max kept
    meter.merge(other)
    assert meter.samples == 101 and meter.report()["max_ms"] == pytest.approx(2000.0)


# --- quarantine notices on the wire --------------------------------------------------------------------------
def test_wire_quarantine_round_trip_and_refusals() -> None:
    import torch

    from iotbed.nodes.payloads import QUARANTINE_TOPIC, Quarantine

    flagged = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8)).astype(np.float32) / 255.0)
    notice = Quarantine(2, flagged, "gw-0")
    data = wire.encode(notice)
    assert len(data) == notice.nbytes
    back = wire.decode(QUARANTINE_TOPIC, data)
    assert isinstance(back, Quarantine) and back.version == 2 and back.gateway == "gw-0"
    assert torch.equal((back.flagged * 255).round(), (flagged * 255).round())  # 8-bit pixels travel exactly
    bad = {
        "truncated": data[:5],
        "bad_magic": b"XX" + data[2:],
        "bad_length": data[:-1],
        "oversized": data + bytes(64),
    }
    for reason, payload in bad.items():
        with pytest.raises(wire.MalformedPayload) as info:
            wire.decode_quarantine(payload, max_bytes=len(data) + 32)
        assert info.value.reason == reason, reason
    # a header that claims 2^32-1 frames (or clean images) of 4x8192x8192 is refused by its length, before any
    # allocation
    for flagged, clean in ((2**32 - 1, 0), (0, 2**32 - 1)):
        huge = wire.QUARANTINE_HEADER.pack(b"IQ", wire.QUARANTINE_FORMAT_VERSION, 2, flagged, clean, 4, 8192, 8192, 0)
        with pytest.raises(wire.MalformedPayload, match="bad_length"):
            wire.decode(QUARANTINE_TOPIC, huge)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=512), cut=st.integers(0, 600), flip=st.integers(0, 255))
def test_wire_quarantine_decoder_refuses_garbage_and_mutations(data: bytes, cut: int, flip: int) -> None:
    import torch

    from iotbed.nodes.payloads import QUARANTINE_TOPIC, Quarantine

    good = wire.encode(Quarantine(7, torch.zeros(2, 1, 4, 4), "gw-1"))
    mutated = bytearray(good)
    if mutated:
        mutated[cut % len(mutated)] ^= flip
    for payload in (data, bytes(mutated), good[: cut % (len(good) + 1)], data + good):
        try:
            decoded = wire.decode(QUARANTINE_TOPIC, payload)
        except wire.MalformedPayload:
            continue
        assert isinstance(decoded, Quarantine) and decoded.flagged.ndim == 4
