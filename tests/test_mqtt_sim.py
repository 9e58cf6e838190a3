"""MQTT semantics of the simulated broker and clients over a lossy simulated network.

Over TCP (the default transport) unless a test is about MQTT's own retransmission after `retry_interval`,
which only `transport: udp` (a packet per MQTT packet, MQTT-SN style) has; tests/test_mqtt_tcp.py has the
TCP side of loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import simpy

from iotbed.broker.messages import Publish
from iotbed.broker.sim_mqtt import MqttSettings, SimBroker, SimMqttClient
from iotbed.sim.links import BernoulliLoss, LinkDirection, NoLoss, Transmitter
from iotbed.sim.network import Network


@dataclass
class Net:
    env: simpy.Environment
    network: Network
    broker: SimBroker
    received: dict[str, list[Publish]] = field(default_factory=dict)

    def client(self, node: str, client_id: str, **kwargs) -> SimMqttClient:  # type: ignore[no-untyped-def]
        return SimMqttClient(self.env, self.network, node, client_id, self.broker, **kwargs)

    def subscriber(self, node: str, client_id: str, topic_filter: str, qos: int, **kwargs) -> SimMqttClient:  # type: ignore[no-untyped-def]
        sub = self.client(node, client_id, **kwargs)
        self.received[client_id] = []
        sub.connect()
        sub.subscribe(topic_filter, self.received[client_id].append, qos)
        return sub


def build(
    loss: float = 0.0,
    seed: int = 0,
    retry: float = 0.2,
    max_retries: int | None = None,
    keepalive: float = 5.0,
    transport: str = "tcp",
) -> Net:
    """pub-node --(lossy 10 Mbit/s, 5 ms)-- router --(clean)-- broker-node, plus sub-node on the router."""
    env = simpy.Environment()
    network = Network(env)
    rng = np.random.default_rng(seed)
    for node in ("pub", "router", "broker", "sub"):
        network.add_node(node)

    def link(a: str, b: str, lossy: bool) -> None:
        def direction(src: str, dst: str) -> LinkDirection:
            model = BernoulliLoss(loss, rng) if lossy and loss > 0 else NoLoss()
            return LinkDirection(f"{src}->{dst}", src, dst, Transmitter(10e6, 10_000), 0.005, 0.0, model, rng)

        network.add_link(direction(a, b), direction(b, a))

    link("pub", "router", lossy=True)
    link("router", "broker", lossy=False)
    link("sub", "router", lossy=False)
    settings = MqttSettings(retry_interval_s=retry, max_retries=max_retries, keepalive_s=keepalive, transport=transport)
    return Net(env, network, SimBroker(env, network, "broker", settings))


def publish_stream(net: Net, pub: SimMqttClient, n: int, qos: int, topic: str = "frames/cam-0", gap: float = 0.01):  # type: ignore[no-untyped-def]
    def proc():  # type: ignore[no-untyped-def]
        yield pub.connect()
        for i in range(n):
            pub.publish(topic, i.to_bytes(4, "big") + bytes(996), qos)
            yield net.env.timeout(gap)

    net.env.process(proc())


def payload_ids(messages: list[Publish]) -> list[int]:
    return [int.from_bytes(m.payload[:4], "big") for m in messages]


def test_qos1_over_a_lossy_link_delivers_every_message_with_retries() -> None:
    net = build(loss=0.2, seed=1, transport="udp")
    net.subscriber("sub", "edge", "frames/#", qos=1)
    pub = net.client("pub", "cam")
    publish_stream(net, pub, 300, qos=1)
    net.env.run(until=60)
    ids = payload_ids(net.received["edge"])
    assert set(ids) == set(range(300))  # at least once: every message arrives
    assert pub.outbound.stats.retransmissions > 0
    assert len(ids) >= 300  # duplicates are allowed at QoS 1 (lost PUBACKs)
    assert not pub.outbound.inflight


def test_qos0_over_a_lossy_link_loses_messages_and_counts_them() -> None:
    net = build(loss=0.2, seed=1, transport="udp")
    net.subscriber("sub", "edge", "frames/#", qos=1)
    pub = net.client("pub", "cam")
    publish_stream(net, pub, 300, qos=0)
    net.env.run(until=60)
    received = payload_ids(net.received["edge"])
    lost = net.network.directions[("pub", "router")].stats.dropped_loss
    assert lost > 20  # about 20% of 300
    assert len(received) == 300 - lost  # the subscriber misses exactly what the link lost
    assert len(set(received)) == len(received)
    assert pub.outbound.stats.retransmissions == 0


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_qos2_is_exactly_once_despite_loss(transport: str) -> None:
    net = build(loss=0.25, seed=3, transport=transport)
    net.subscriber("sub", "edge", "frames/#", qos=2)
    pub = net.client("pub", "cam")
    publish_stream(net, pub, 200, qos=2)
    net.env.run(until=120)
    ids = payload_ids(net.received["edge"])
    assert sorted(ids) == list(range(200))  # all of them, none twice
    if transport == "udp":
        assert pub.outbound.stats.retransmissions > 0
    else:  # TCP repaired the losses; MQTT resent nothing on the live connection
        assert pub.outbound.stats.retransmissions == 0 and pub.tcp.a.stats.retransmissions > 0


def test_delivered_qos_is_the_lower_of_publish_and_subscription() -> None:
    net = build()
    net.subscriber("sub", "low", "frames/#", qos=0)
    pub = net.client("pub", "cam")
    publish_stream(net, pub, 5, qos=2)
    net.env.run(until=5)
    assert [m.qos for m in net.received["low"]] == [0] * 5


def test_max_retries_gives_up_on_an_unreachable_subscriber_path() -> None:
    net = build(loss=1.0, max_retries=3, transport="udp")
    gave_up: list[Publish] = []
    pub = net.client("pub", "cam", on_give_up=gave_up.append)
    pub.publish("frames/x", b"x", 1)  # sent without a connection: every copy is lost on the link
    net.env.run(until=10)
    assert len(gave_up) == 1 and pub.outbound.stats.retransmissions == 3


def test_retained_message_reaches_a_late_subscriber() -> None:
    net = build()
    pub = net.client("pub", "registry")

    def late() -> object:
        yield pub.connect()
        pub.publish("models/classifier", b"v2" * 100, 1, retain=True)
        yield net.env.timeout(2.0)
        net.subscriber("sub", "late", "models/#", qos=1)

    net.env.process(late())
    net.env.run(until=5)
    assert len(net.received["late"]) == 1
    assert net.received["late"][0].retain and net.received["late"][0].payload == b"v2" * 100


def test_persistent_session_gets_what_was_published_while_it_was_away() -> None:
    net = build()
    sub = net.subscriber("sub", "edge", "frames/#", qos=1, clean_session=False)
    pub = net.client("pub", "cam")

    def scenario() -> object:
        yield pub.connect()
        yield net.env.timeout(0.5)
        sub.disconnect()
        yield net.env.timeout(0.5)
        for i in range(5):
            pub.publish("frames/cam", i.to_bytes(4, "big"), 1)
        yield net.env.timeout(1.0)
        assert net.received["edge"] == []
        sub.connect()

    net.env.process(scenario())
    net.env.run(until=5)
    assert payload_ids(net.received["edge"]) == [0, 1, 2, 3, 4]
    assert net.broker.stats.queued_offline == 5


def test_clean_session_loses_what_was_published_while_away() -> None:
    net = build()
    sub = net.subscriber("sub", "edge", "frames/#", qos=1, clean_session=True)
    pub = net.client("pub", "cam")

    def scenario() -> object:
        yield pub.connect()
        sub.disconnect()
        yield net.env.timeout(0.5)
        pub.publish("frames/cam", b"gone", 1)
        yield net.env.timeout(0.5)
        sub.connect()
        sub.subscribe("frames/#", net.received["edge"].append, 1)

    net.env.process(scenario())
    net.env.run(until=5)
    assert net.received["edge"] == []


def test_will_message_is_published_when_a_client_vanishes_over_udp() -> None:
    """Over udp there is no connection to close: the broker learns of the crash from 1.5 keep-alives of silence."""
    net = build(keepalive=2.0, transport="udp")
    net.subscriber("sub", "monitor", "status/#", qos=1)
    will = Publish("status/cam", b"offline", 1)
    cam = net.client("pub", "cam", will=will)

    def scenario() -> object:
        yield cam.connect()
        yield net.env.timeout(1.0)
        cam.crash()

    net.env.process(scenario())
    net.env.run(until=2.5)
    assert net.received["monitor"] == []  # not before 1.5 keep-alives of silence
    net.env.run(until=10)
    assert [m.payload for m in net.received["monitor"]] == [b"offline"]
    assert net.broker.stats.wills_published == 1


def test_crashed_clients_connection_is_seen_closed_at_once() -> None:
    """A killed process's kernel closes its TCP connection, and Mosquitto drops the client at once (as
    `MqttTransport.crash` shows live): the will goes out within the path's delay, not after 1.5 keep-alives,
    and a persistent session starts queueing at once instead of sending into a dead connection."""
    net = build(keepalive=60.0)
    net.subscriber("sub", "monitor", "status/#", qos=1)
    edge = net.subscriber("sub", "edge", "frames/#", qos=1, clean_session=False)
    pub = net.client("pub", "cam", will=Publish("status/cam", b"offline", 1))
    crashed_at: list[float] = []

    def scenario() -> object:
        yield pub.connect()
        yield net.env.timeout(1.0)
        pub.crash()
        edge.crash()
        crashed_at.append(net.env.now)
        assert not net.broker.sessions["edge"].connected  # seen at the crash, not a keep-alive later
        assert "cam" not in net.broker.sessions  # a clean session ends with its connection
        yield net.env.timeout(0.1)
        late = net.client("pub", "cam-1")
        yield late.connect()
        for i in range(3):
            late.publish("frames/cam-1", i.to_bytes(4, "big"), 1)
        yield net.env.timeout(0.5)
        edge.rejoin()

    net.env.process(scenario())
    net.env.run(until=1.1)
    assert [m.payload for m in net.received["monitor"]] == [b"offline"]  # within 100 ms of the crash at 1 s
    net.env.run(until=5)
    assert net.broker.stats.wills_published == 1
    assert net.broker.stats.queued_offline == 3  # queued for the away session
    assert payload_ids(net.received["edge"]) == [0, 1, 2]  # delivered after the rejoin


def test_clean_disconnect_discards_the_will() -> None:
    net = build(keepalive=1.0)
    net.subscriber("sub", "monitor", "status/#", qos=1)
    cam = net.client("pub", "cam", will=Publish("status/cam", b"offline", 1))

    def scenario() -> object:
        yield cam.connect()
        cam.disconnect()

    net.env.process(scenario())
    net.env.run(until=10)
    assert net.received["monitor"] == []


@pytest.mark.parametrize("persistence", [True, False])
def test_broker_restart_keeps_what_mosquitto_keeps(persistence: bool) -> None:
    """Mosquitto 2.0.11, restarted with SIGTERM and persistence on, keeps a persistent session's queued
    messages and its non-shared subscriptions, but not its shared ones: two away persistent subscribers, one
    shared and one not, get what was queued before the restart; after it only the non-shared one is still
    subscribed, and what is published to the shared group finds no subscriber. Without persistence nothing
    is kept."""
    net = build()
    undelivered: list[tuple[int, str]] = []
    net.broker.undelivered_listeners.append(lambda m, reason: undelivered.append((payload_ids([m])[0], reason)))
    shared = net.subscriber("sub", "shared", "$share/g/frames/#", qos=1, clean_session=False)
    plain = net.subscriber("sub", "plain", "frames/#", qos=1, clean_session=False)
    pub = net.client("pub", "cam")

    def scenario() -> object:
        yield pub.connect()
        yield net.env.timeout(0.5)
        shared.crash()
        plain.crash()
        for i in range(2):  # queued for both away sessions
            pub.publish("frames/cam", i.to_bytes(4, "big"), 1)
        yield net.env.timeout(0.1)
        net.broker.crash(persistence)
        yield net.env.timeout(0.1)
        net.broker.start()
        yield net.env.timeout(0.4)  # the publisher is back (it reconnects every 0.1 s)
        for i in range(2, 5):
            pub.publish("frames/cam", i.to_bytes(4, "big"), 1)
        yield net.env.timeout(0.5)
        shared.rejoin()
        plain.rejoin()

    net.env.process(scenario())
    net.env.run(until=5)
    if persistence:
        assert net.broker.sessions["shared"].subscriptions == {"$share/g/frames/#": 1}  # subscribed again
        # The group had no member between the restart and the rejoin: 2, 3, 4 reached only `plain`.
        assert payload_ids(net.received["shared"]) == [0, 1]
        assert payload_ids(net.received["plain"]) == [0, 1, 2, 3, 4]
        assert undelivered == []
    else:
        assert net.received["shared"] == net.received["plain"] == []
        assert sorted(undelivered) == [
            (0, "broker_restart"),
            (0, "broker_restart"),
            (1, "broker_restart"),
            (1, "broker_restart"),
            (2, "no_subscriber"),
            (3, "no_subscriber"),
            (4, "no_subscriber"),
        ]


def test_shared_subscription_splits_messages_round_robin() -> None:
    net = build()
    net.subscriber("sub", "edge-0", "$share/edge/frames/#", qos=1)
    net.subscriber("broker", "edge-1", "$share/edge/frames/#", qos=1)
    pub = net.client("pub", "cam")
    publish_stream(net, pub, 10, qos=1)
    net.env.run(until=5)
    a, b = payload_ids(net.received["edge-0"]), payload_ids(net.received["edge-1"])
    assert sorted(a + b) == list(range(10))
    assert len(a) == 5 and len(b) == 5


@pytest.mark.parametrize("transport", ["tcp", "udp"])
@pytest.mark.parametrize("seed", [0, 1])
def test_same_seed_same_deliveries(seed: int, transport: str) -> None:
    def once() -> list[tuple[float, int]]:
        net = build(loss=0.1, seed=seed, transport=transport)
        times: list[tuple[float, int]] = []
        sub = net.client("sub", "edge")
        sub.connect()
        sub.subscribe("frames/#", lambda m: times.append((net.env.now, int.from_bytes(m.payload[:4], "big"))), 1)
        publish_stream(net, net.client("pub", "cam"), 100, qos=1)
        net.env.run(until=30)
        return times

    assert once() == once()


def test_in_flight_window_holds_the_rest_back_in_order_and_drops_beyond_the_queue() -> None:
    """The sender side alone, with the peer unreachable (paused): `max_inflight` go in flight, `max_queued`
    wait in order, the rest are dropped and reported; acknowledgements let the waiting ones in, in order."""
    from iotbed.broker.messages import Ack, OutboundFlow
    from iotbed.broker.packets import PacketType
    from iotbed.sim.timers import FifoTimers

    env = simpy.Environment()
    sent: list[int] = []
    dropped: list[int] = []
    flow = OutboundFlow(
        FifoTimers(env, 1.0, 0.05),
        lambda m, about: sent.append(int(m.payload[0])),
        None,
        max_inflight=3,
        max_queued=4,
        on_queue_full=lambda m: dropped.append(int(m.payload[0])),
    )
    accepted = [flow.publish(Publish("t", bytes([i]), 1)) for i in range(10)]
    assert accepted == [True] * 7 + [False] * 3
    assert sent == [0, 1, 2] and dropped == [7, 8, 9] and len(flow.waiting) == 4
    first = min(flow.inflight)
    flow.on_ack(Ack(PacketType.PUBACK, first))
    flow.on_ack(Ack(PacketType.PUBACK, first + 1))
    assert sent == [0, 1, 2, 3, 4] and len(flow.inflight) == 3 and len(flow.waiting) == 2
    assert flow.stats.dropped_queue_full == 3


def test_a_slow_subscriber_fills_the_window_then_the_queue_and_the_broker_drops_the_rest() -> None:
    """8 cameras x 10 fps into one edge that reads 5/s for 10 s: the broker holds 20 in flight and 100
    queued, and drops what does not fit: 800 - 50 - 20 - 100 = 630 (to within the frames in transit as the
    slow period starts and ends). Nothing is dropped before or after, and nothing is resent: the edge's
    unread messages are in its socket buffer, which TCP does not retransmit."""
    from conftest import SCENARIOS

    import iotbed

    scenario = iotbed.load_scenario(SCENARIOS / "slow_subscriber.yaml")
    result = iotbed.run(scenario, write=False, progress=False)
    summary, trace = result.summary, result.trace
    arrivals = 8 * 10 * 10  # cameras x fps x slow seconds
    assert summary["broker"]["queue_drops"] == pytest.approx(arrivals - 5 * 10 - 20 - 100, abs=5)
    assert summary["frames"]["dropped"] == {"broker_queue_full": summary["broker"]["queue_drops"]}
    assert summary["broker"]["deepest_queue"] == 100
    assert summary["frames"]["retries"] == 0 and summary["frames"]["duplicates"] == 0
    lost = trace[trace.drop_reason == "broker_queue_full"]
    # only while the edge was slow (its last slow read ends one read interval, 0.2 s, after the period)
    assert lost.t_capture.min() > 5.0 and lost.t_capture.max() < 15.0 + 0.2
    # Once full, the queue lets one frame in per read (5/s) and holds them 120 reads = 24 s deep, longer than
    # the slow period has left: the frames it let in are read when the edge speeds up again, at 15 s.
    waited = trace[(trace.t_capture > 8) & (trace.t_capture < 15) & (trace.status == "delivered")]
    assert len(waited) == pytest.approx(5 * 7, abs=3)
    done = waited.t_capture + waited.latency_s
    assert done.min() > 15.0 and done.max() < 15.5


def test_without_limits_the_broker_queues_everything_for_a_slow_subscriber() -> None:
    from conftest import SCENARIOS

    import iotbed

    scenario = iotbed.load_scenario(SCENARIOS / "slow_subscriber.yaml", ["broker.max_queued=0"])
    summary = iotbed.run(scenario, write=False, progress=False).summary
    assert summary["broker"]["queue_drops"] == 0
    assert summary["frames"]["delivered"] == summary["frames"]["captured"]
    assert summary["broker"]["deepest_queue"] > 600


@pytest.mark.parametrize("qos", [1, 2])
def test_a_slow_subscriber_that_crashes_loses_its_unread_messages_to_the_broker_not_to_the_void(qos: int) -> None:
    """Slow from 5 s, its client gone at 8 s and back 0.5 s later with its persistent session: nothing is read
    while it is away, what it had not read comes again from the broker, and every frame ends delivered or
    dropped from the full queue; at QoS 2 none twice."""
    from conftest import SCENARIOS

    import iotbed

    scenario = iotbed.load_scenario(
        SCENARIOS / "slow_subscriber.yaml",
        [
            f"broker.qos={{frames/#: {qos}}}",
            "nodes.edge_servers.0.persistent_session=true",
            "faults=[{kind: slow_subscriber, node: edge-0, at: 5s, down: 10s, rate: 5},"
            " {kind: node_crash, node: edge-0, at: 8s, down: 0.5s}]",
        ],
    )
    result = iotbed.run(scenario, write=False, progress=False)
    summary, trace = result.summary, result.trace
    assert not ((trace.t_edge > 8.0) & (trace.t_edge < 8.5)).any()
    assert summary["frames"]["in_flight"] == 0
    assert summary["frames"]["delivered"] + summary["broker"]["queue_drops"] == summary["frames"]["captured"]
    assert set(summary["frames"]["dropped"]) == {"broker_queue_full"}
    if qos == 2:
        assert summary["frames"]["duplicates"] == 0


def test_messages_arriving_together_at_a_slow_reader_are_read_one_interval_apart() -> None:
    """Publisher, broker and subscriber on one node: a burst reaches the slow reader in one instant."""
    net = build()
    sub = net.subscriber("broker", "edge", "frames/#", qos=1)
    pub = net.client("broker", "cam")
    read_at: list[float] = []
    sub._handlers[0] = ("frames/#", lambda m: read_at.append(net.env.now))
    sub._handlers_for.clear()

    def burst():  # type: ignore[no-untyped-def]
        yield pub.connect()
        yield net.env.timeout(1.0)
        sub.slow_down(rate=4, duration_s=10.0)
        for i in range(6):  # six in the same instant
            pub.publish("frames/cam-0", bytes([i]) * 100, 1)

    net.env.process(burst())
    net.env.run(until=20)
    gaps = np.diff(read_at)
    assert len(read_at) == 6
    np.testing.assert_allclose(gaps, 0.25, atol=1e-9)  # 4 a second, the first at once
