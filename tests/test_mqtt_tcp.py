"""MQTT over the simulated TCP connections (`broker.transport: tcp`, the default): TCP, not MQTT, repairs a
lost segment; a connection delivers in order; a broker restart resends what a persistent session held, once;
a crashed node's segments are dropped; a down broker refuses connections; taps see messages inside segments;
the summary reports TCP's retransmissions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import simpy
from conftest import SCENARIOS

import iotbed
from iotbed.attacks.network import AttackWindow, ManInTheMiddle
from iotbed.broker import packets
from iotbed.broker.messages import Publish
from iotbed.broker.sim_mqtt import MqttSettings, SimBroker, SimMqttClient
from iotbed.errors import IotbedError
from iotbed.nodes.payloads import Frame
from iotbed.scenario import load_scenario
from iotbed.sim.links import BernoulliLoss, LinkDirection, NoLoss, Transmitter
from iotbed.sim.network import Network, Packet
from iotbed.sim.tcp import CLOSED, TcpSegment

BW = 10e6  # bit/s
LAT = 0.005  # s, one way, on every link
QUICKSTART = SCENARIOS / "quickstart.yaml"


class ArmedLoss:
    """Loses the next packet sent after `arm()`, and nothing else."""

    def __init__(self) -> None:
        self.armed = False
        self.lost_count = 0

    def arm(self) -> None:
        self.armed = True

    def lost(self) -> bool:
        if self.armed:
            self.armed = False
            self.lost_count += 1
            return True
        return False


@dataclass
class Net:
    """pub --(link)-- broker --(link)-- sub, 10 Mbit/s and 5 ms each way; the broker on node `broker`."""

    env: simpy.Environment
    network: Network
    broker: SimBroker
    directions: dict[str, LinkDirection]
    drops: list[tuple[float, str, str]] = field(default_factory=list)  # (time, reason, link)
    undelivered: list[tuple[Publish, str]] = field(default_factory=list)
    retried: list[Publish] = field(default_factory=list)

    def client(self, node: str, client_id: str, **kwargs) -> SimMqttClient:  # type: ignore[no-untyped-def]
        return SimMqttClient(
            self.env, self.network, node, client_id, self.broker, on_retry=self.retried.append, **kwargs
        )


def build(
    transport: str = "tcp",
    jitter: float = 0.0,
    sub_latency: float = LAT,
    keepalive: float = 60.0,
    seed: int = 0,
) -> Net:
    env = simpy.Environment()
    network = Network(env)
    rng = np.random.default_rng(seed)
    for node in ("pub", "broker", "sub"):
        network.add_node(node)
    directions = {}
    for a, b, latency in (("pub", "broker", LAT), ("broker", "sub", sub_latency)):
        ends = []
        for src, dst in ((a, b), (b, a)):
            d = LinkDirection(f"{src}->{dst}", src, dst, Transmitter(BW, 10_000), latency, jitter, NoLoss(), rng)
            directions[d.name] = d
            ends.append(d)
        network.add_link(*ends)
    settings = MqttSettings(retry_interval_s=0.2, keepalive_s=keepalive, transport=transport)
    broker = SimBroker(env, network, "broker", settings, on_retry=None)
    net = Net(env, network, broker, directions)
    network.drop_listeners.append(
        lambda p, reason, link: net.drops.append((env.now, reason, link.name if link else ""))
    )
    broker.undelivered_listeners.append(lambda m, reason: net.undelivered.append((m, reason)))
    broker._on_retry = net.retried.append  # the broker's sessions count their resends here too
    return net


def ids(messages: list[Publish]) -> list[int]:
    return [int.from_bytes(m.payload[:4], "big") for m in messages]


def message(i: int, size: int = 500) -> bytes:
    return i.to_bytes(4, "big") + bytes(size - 4)


def test_a_message_lost_on_a_link_is_repaired_by_tcp_not_by_mqtt() -> None:
    """A warmed-up connection loses one PUBLISH segment with nothing sent after it: TCP resends it once, one
    RTO (SRTT + 200 ms, as a tail loss probe) later; MQTT resends nothing, and no MQTT timer runs."""
    net = build()
    loss = ArmedLoss()
    net.directions["pub->broker"].loss = loss
    got: list[tuple[float, Publish]] = []
    edge = net.client("broker", "edge")  # on the broker's node: loopback
    edge.connect()
    edge.subscribe("frames/#", lambda m: got.append((net.env.now, m)), 1)
    cam = net.client("pub", "cam")
    at: dict[str, float] = {}

    def run():  # type: ignore[no-untyped-def]
        yield cam.connect()
        for i in range(5):
            cam.publish("frames/cam", message(i), 1)
            yield net.env.timeout(0.05)
        yield net.env.timeout(0.5)
        at["rto"], at["sent"] = cam.tcp.a.rto, net.env.now
        loss.arm()
        cam.publish("frames/cam", message(5), 1)

    net.env.process(run())
    net.env.run(until=3.0)
    assert ids([m for _, m in got]) == [0, 1, 2, 3, 4, 5]  # once each
    assert loss.lost_count == 1 and [r for _, r, _ in net.drops] == ["link_loss"]
    a = cam.tcp.a.stats
    assert a.retransmissions == 1 and a.retransmits_tlp + a.retransmits_rto == 1
    assert cam.outbound.stats.retransmissions == 0 and net.retried == [] and not cam.outbound.inflight
    assert not net.broker.timers._queue  # no MQTT retransmission timer was ever armed
    wire = packets.publish_size("frames/cam", 500, 1) + 52
    assert got[-1][0] == pytest.approx(at["sent"] + at["rto"] + wire * 8 / BW + LAT, abs=1e-3)
    assert 0.2 < at["rto"] < 0.25  # Linux: SRTT + max(200 ms, 4 mdev)


def test_the_same_loss_with_transport_udp_costs_mqtts_retry_interval() -> None:
    net = build(transport="udp")
    loss = ArmedLoss()
    net.directions["pub->broker"].loss = loss
    got: list[float] = []
    edge = net.client("broker", "edge")
    edge.connect()
    edge.subscribe("frames/#", lambda m: got.append(net.env.now), 1)
    cam = net.client("pub", "cam")

    def run():  # type: ignore[no-untyped-def]
        yield cam.connect()
        yield net.env.timeout(0.5)
        loss.arm()
        cam.publish("frames/cam", message(0), 1)

    net.env.process(run())
    net.env.run(until=3.0)
    assert cam.outbound.stats.retransmissions == 1 and len(net.retried) == 1
    assert cam.tcp is None
    assert got[0] - 0.5 >= 0.2  # one retry_interval


@pytest.mark.parametrize("qos", [0, 1])
def test_in_order_delivery_on_a_connection_even_with_jitter(qos: int) -> None:
    """4 ms of jitter reorders packets on the link; over TCP the subscriber still gets every message once, in
    the order published. With transport udp the same link delivers them out of order."""
    received = {}
    for transport in ("tcp", "udp"):
        net = build(transport=transport, jitter=0.004, seed=3)
        got: list[Publish] = []
        edge = net.client("broker", "edge")
        edge.connect()
        edge.subscribe("frames/#", got.append, qos)
        cam = net.client("pub", "cam")
        sizes = np.random.default_rng(4).integers(100, 4000, 300).tolist()

        def run(cam=cam, sizes=sizes, env=net.env):  # type: ignore[no-untyped-def]
            yield cam.connect()
            for i, size in enumerate(sizes):
                cam.publish("frames/cam", message(i, size), qos)
                yield env.timeout(0.004)

        net.env.process(run())
        net.env.run(until=20.0)
        received[transport] = ids(got)
        if transport == "tcp":
            assert cam.tcp.a.stats.dup_acks > 0  # segments did overtake each other
    assert received["tcp"] == list(range(300))
    assert sorted(received["udp"]) == list(range(300)) and received["udp"] != list(range(300))


def test_broker_restart_resends_what_a_persistent_session_held_once_on_reconnect() -> None:
    """The subscriber's path is 40 ms long, so QoS 1 messages are always in flight to it. The broker restarts
    (persistence on): nothing is resent on the live connections before it; after the subscriber reconnects
    with its session, each message its session held is resent exactly once, and every message arrives."""
    net = build(sub_latency=0.02)
    got: list[Publish] = []
    sub = net.client("sub", "edge", clean_session=False)
    sub.connect()
    sub.subscribe("frames/#", got.append, 1)
    cam = net.client("pub", "cam")
    held: dict[str, int] = {}

    def publish():  # type: ignore[no-untyped-def]
        yield cam.connect()
        yield net.env.timeout(0.5 - net.env.now)
        for i in range(250):
            cam.publish("frames/cam", message(i), 1)
            yield net.env.timeout(0.01)

    def restart():  # type: ignore[no-untyped-def]
        yield net.env.timeout(1.503)
        session = net.broker.sessions["edge"]
        held["session"] = len(session.outbound.inflight)
        held["cam"] = len(cam.outbound.inflight)
        held["before"] = session.outbound.stats.retransmissions + cam.outbound.stats.retransmissions
        net.broker.crash(persistence=True)
        yield net.env.timeout(0.5)
        net.broker.start()

    net.env.process(publish())
    net.env.process(restart())
    net.env.run(until=6.0)
    session = net.broker.sessions["edge"]
    assert held["before"] == 0  # nothing resent on a live connection
    assert held["session"] > 0 and held["cam"] > 0
    assert session.outbound.stats.retransmissions == held["session"]  # once each, on the reconnect
    counts = Counter(ids(got))
    assert set(counts) == set(range(250))  # every message, at least once
    assert max(counts.values()) <= 2 and sum(c - 1 for c in counts.values()) <= held["session"]
    assert sub.reconnects == 1 and cam.reconnects == 1
    assert any(reason == "tcp_closed" for _, reason, _ in net.drops)  # segments in flight at the restart


def test_a_crashed_nodes_segments_are_dropped_until_the_broker_gives_up_on_it() -> None:
    """The subscriber's node loses power at 1 s: what the broker's end sends it is dropped there ("tcp_closed")
    while that end backs off, until the broker notices the client gone (1.5 keep-alives), closes its end
    and reports the QoS 0 messages it still held as lost with the connection ("tcp_reset")."""
    net = build(keepalive=2.0)
    got: list[tuple[float, Publish]] = []
    sub = net.client("sub", "edge")
    sub.connect()
    sub.subscribe("frames/#", lambda m: got.append((net.env.now, m)), 0)
    cam = net.client("pub", "cam")
    state: dict[str, object] = {}

    def run():  # type: ignore[no-untyped-def]
        yield cam.connect()
        for i in range(80):  # 20 a second for 4 s
            cam.publish("frames/cam", message(i), 0)
            if i == 20:
                sub.crash(power_off=True)  # at about 1 s; no kernel left to close the connection
                state["crash"] = net.env.now
            yield net.env.timeout(0.05)

    net.env.process(run())
    net.env.run(until=2.9)
    connection = sub.tcp
    assert connection.a.state == CLOSED and connection.b.state != CLOSED  # the broker has not noticed yet
    closed = [t for t, reason, link in net.drops if reason == "tcp_closed"]
    assert len(closed) >= 3 and min(closed) > state["crash"]  # type: ignore[operator]
    assert connection.b.stats.timeouts >= 1 and connection.b.backoff >= 1  # and it backs off
    timeouts = connection.b.stats.timeouts
    net.env.run(until=6.0)
    assert connection.b.state == CLOSED  # detected at 3 s: the broker dropped its end
    assert connection.b.stats.timeouts > timeouts  # it kept trying until then
    late = [t for t, reason, _ in net.drops if reason == "tcp_closed" and t > 3.1]
    assert late == []
    assert all(t < state["crash"] + 0.05 for t, _ in got)  # type: ignore[operator]
    lost = [m for m, reason in net.undelivered if reason == "tcp_reset"]
    assert lost and all(m.qos == 0 for m in lost)
    assert cam.tcp.a.stats.retransmissions == 0  # the publisher's connection was not affected


def test_a_down_broker_refuses_connections_and_clients_retry_until_it_is_back() -> None:
    net = build()
    net.broker.crash(persistence=True)  # down from the start
    cam = net.client("pub", "cam")
    syns: list[float] = []
    net.directions["pub->broker"].taps.append(
        lambda p: syns.append(net.env.now) if type(p.message) is TcpSegment and p.message.syn else None
    )
    connected: list[float] = []

    def run():  # type: ignore[no-untyped-def]
        yield cam.connect()
        connected.append(net.env.now)

    def back():  # type: ignore[no-untyped-def]
        yield net.env.timeout(0.55)
        net.broker.start()

    net.env.process(run())
    net.env.process(back())
    net.env.run(until=2.0)
    rtt = 2 * (LAT + 60 * 8 / BW)
    # One attempt per refusal (RST) plus paho's back-off, doubling from 0.1 s: the fourth is answered.
    assert len(syns) == 4
    assert np.diff(syns) == pytest.approx([0.1, 0.2, 0.4], abs=2 * rtt)
    assert syns[-1] < connected[0] < syns[-1] + 3 * rtt
    assert cam.tcp.a.stats.timeouts == 0  # refused at once, never timed out


def test_a_man_in_the_middle_changes_each_frame_once_in_the_segment_that_ends_it() -> None:
    """Frames of three segments cross a lossy link with a man in the middle on it: TCP resends some segments,
    and each frame is changed once, as the segment carrying its last byte crosses."""
    net = build()
    net.directions["pub->broker"].loss = BernoulliLoss(0.1, np.random.default_rng(5))
    shape = (3, 8, 8)
    clean = np.zeros((4, *shape), dtype=np.float32)
    window = AttackWindow("mitm", 0.0, 100.0, 1.0, np.random.default_rng(0), clean + 0.5, clean)
    seen: list[object] = []
    tamper = ManInTheMiddle(window, lambda: net.env.now)
    net.directions["pub->broker"].taps.append(tamper)
    net.directions["pub->broker"].taps.append(
        lambda p: seen.extend(p.message.messages) if type(p.message) is TcpSegment else None
    )
    got: list[Publish] = []
    edge = net.client("broker", "edge")
    edge.connect()
    edge.subscribe("frames/#", got.append, 1)
    cam = net.client("pub", "cam")

    def run():  # type: ignore[no-untyped-def]
        yield cam.connect()
        for i in range(50):
            cam.publish("frames/cam", Frame(i, 0, net.env.now, i % 4, 0, shape, 4000), 1)
            yield net.env.timeout(0.02)

    net.env.process(run())
    net.env.run(until=30.0)
    frames = [m.payload for m in got]
    assert [f.frame_id for f in frames] == list(range(50))
    assert all(f.attack == "mitm" and f.pixels is not None and float(f.pixels.min()) == 0.5 for f in frames)
    assert window.frames_attacked == 50
    assert cam.tcp.a.stats.retransmissions > 0
    publishes = [m for m in seen if isinstance(m, Publish)]
    assert len(publishes) >= 50  # a resent last segment passes the tap again; the frame is not changed twice


def test_publish_bytes_follow_the_transport() -> None:
    mqtt = 3000
    tcp = build().client("pub", "cam")
    udp = build(transport="udp").client("pub", "cam")
    assert tcp.wire_bytes(mqtt) == mqtt + 52 * 3  # 1448-byte segments, 52 B of headers each
    assert udp.wire_bytes(mqtt) == packets.tcp_ip_size(mqtt) == mqtt + 40 * 3


# --- whole runs -----------------------------------------------------------------------------------------
LOSSY = ["duration=30s", "links.0.loss=0.05", "links.0.shared_medium=false", "links.0.jitter=0"]


def test_loss_at_qos1_over_tcp_costs_tcp_retransmissions_not_mqtt_retries() -> None:
    scenario = load_scenario(QUICKSTART, [*LOSSY, "broker.qos={frames/#: 1}"])
    result = iotbed.run(scenario, write=False, progress=False)
    summary, trace = result.summary, result.trace
    frames = summary["frames"]
    assert frames["delivered"] == frames["captured"] and frames["dropped_total"] == 0
    assert frames["retries"] == 0 and frames["duplicates"] == 0
    assert trace["losses"].sum() >= 0.04 * frames["captured"]
    tcp = summary["tcp"]
    assert tcp["client_to_broker"]["retransmissions"] >= 0.04 * frames["captured"]
    assert tcp["broker_to_client"]["retransmissions"] > 0  # PUBACK segments are lost and resent too
    assert summary["latency_ms"]["p99"] < 500  # a probe or an RTO, not the 500 ms retry_interval


def test_loss_at_qos0_over_tcp_loses_no_frame() -> None:
    scenario = load_scenario(QUICKSTART, [*LOSSY, "broker.qos={frames/#: 0}"])
    frames = iotbed.run(scenario, write=False, progress=False).summary["frames"]
    assert frames["dropped_total"] == 0 and frames["delivered"] == frames["captured"]


def test_the_summary_reports_tcp_retransmissions_and_which_transport_ran(tmp_path: Path) -> None:
    scenario = load_scenario(QUICKSTART, ["duration=10s", "links.0.loss=0.03"])
    result = iotbed.run(scenario, tmp_path / "tcp", progress=False)
    summary = result.summary
    assert summary["shaping"]["transport"] == "tcp"
    rows = pd.read_csv(tmp_path / "tcp" / "tcp.csv")
    assert len(rows) == 2 * 10  # both ends of each camera's connection (the edge talks over loopback)
    assert set(rows["end"]) == {"client", "broker"}
    tcp = summary["tcp"]
    assert tcp["connections"] == 10
    for end, direction in (("client", "client_to_broker"), ("broker", "broker_to_client")):
        mine = rows[rows["end"] == end]
        for key in ("retransmissions", "retransmits_rto", "retransmits_fast", "retransmits_tlp", "timeouts"):
            assert tcp[direction][key] == mine[key].sum()
        assert (
            mine["retransmissions"] == mine[["retransmits_rto", "retransmits_fast", "retransmits_tlp"]].sum(axis=1)
        ).all()
    assert tcp["client_to_broker"]["retransmissions"] > 0
    assert tcp["by_group"]["cam"]["client_to_broker"]["retransmissions"] == tcp["client_to_broker"]["retransmissions"]
    # every byte the cameras' connections sent is on the cameras' links
    links = pd.read_csv(tmp_path / "tcp" / "links.csv")
    cam_up = links[links["group"] == "cam->gw"]["bytes_sent"].sum()
    assert cam_up == rows[rows["end"] == "client"]["wire_bytes"].sum()
    udp = iotbed.run(
        load_scenario(QUICKSTART, ["duration=10s", "broker.transport=udp"]), tmp_path / "udp", progress=False
    )
    assert udp.summary["shaping"]["transport"] == "udp" and "tcp" not in udp.summary
    assert not (tmp_path / "udp" / "tcp.csv").exists()


def test_max_retries_needs_transport_udp() -> None:
    with pytest.raises(IotbedError, match="max_retries applies to transport udp"):
        load_scenario(QUICKSTART, ["broker.max_retries=3"])
    assert load_scenario(QUICKSTART, ["broker.max_retries=3", "broker.transport=udp"]).broker.max_retries == 3


def test_packets_that_a_tcp_end_drops_carry_no_frame_loss() -> None:
    """The recorder counts a lost segment against its frame but does not make it the frame's drop reason."""
    from iotbed.sim.tcp import TcpConnection
    from iotbed.sim.trace import TraceRecorder

    recorder = TraceRecorder()
    record = recorder.new_frame("cam-0", "frames/cam-0", 0, 0, 100, 140, 1, 0.0)
    net = build()
    connection = TcpConnection(net.network, "pub", "broker")
    segment = TcpSegment(0, 0, None, 0.0, 0, -1.0)
    packet = Packet(connection.a, connection.b, 52, segment, record)
    recorder.on_packet_dropped(packet, "link_loss", net.directions["pub->broker"])
    assert record.losses == 1 and record.drop_reason == ""
    recorder.on_packet_dropped(packet, "tcp_closed", None)
    assert record.losses == 2 and record.drop_reason == "tcp_closed"


@pytest.mark.parametrize("nodelay", [False, True])
def test_nagle_holds_a_small_message_behind_a_lost_one_unless_tcp_nodelay(nodelay: bool) -> None:
    """Two small PUBLISHes 10 ms apart, the first lost. With Nagle's algorithm (the default) the second waits
    in the sender, no duplicate ACK comes, and the loss costs a probe (about SRTT + 200 ms). With TCP_NODELAY
    the second goes at once, its SACK shows the hole and RACK resends within a round trip or two."""
    net = build()
    net.broker.tcp_settings = MqttSettings(tcp_nodelay=nodelay).tcp_settings()
    loss = ArmedLoss()
    net.directions["pub->broker"].loss = loss
    got: list[tuple[float, Publish]] = []
    edge = net.client("broker", "edge")
    edge.connect()
    edge.subscribe("frames/#", lambda m: got.append((net.env.now, m)), 1)
    cam = net.client("pub", "cam")
    assert cam.tcp.settings.nagle is not nodelay
    sent: list[float] = []

    def run():  # type: ignore[no-untyped-def]
        yield cam.connect()
        for i in range(5):
            cam.publish("frames/cam", message(i, 200), 1)
            yield net.env.timeout(0.05)
        yield net.env.timeout(0.5)
        sent.append(net.env.now)
        loss.arm()
        cam.publish("frames/cam", message(5, 200), 1)
        yield net.env.timeout(0.01)
        cam.publish("frames/cam", message(6, 200), 1)

    net.env.process(run())
    net.env.run(until=3.0)
    assert ids([m for _, m in got]) == list(range(7))
    repaired = got[5][0] - sent[0]
    a = cam.tcp.a.stats
    if nodelay:
        assert a.retransmits_fast == 1 and a.retransmits_tlp == 0 and repaired < 0.06
    else:
        assert a.retransmits_fast + a.retransmits_tlp + a.retransmits_rto == 1 and repaired > 0.2
