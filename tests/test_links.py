"""Link mechanics: serialisation, drop-tail queues, loss models, jitter, timers, packet sizes, topics."""

from __future__ import annotations

import numpy as np
import pytest
import simpy

from iotbed.broker import packets
from iotbed.broker.topics import matches, validate_filter
from iotbed.sim.links import BernoulliLoss, GilbertElliottLoss, LinkDirection, NoLoss, Transmitter
from iotbed.sim.network import Network
from iotbed.sim.rng import RandomStreams
from iotbed.sim.timers import FifoTimers


def test_transmitter_serialises_back_to_back_and_drops_tail() -> None:
    tx = Transmitter(bandwidth_bps=8000.0, capacity=3)  # 1 byte per millisecond
    assert tx.admit(0.0, 100) == pytest.approx(0.1)
    assert tx.admit(0.0, 100) == pytest.approx(0.2)  # waits for the first
    assert tx.admit(0.05, 100) == pytest.approx(0.3)
    assert tx.admit(0.05, 100) is None  # three in the system: the fourth is dropped
    assert tx.admit(0.1, 100) == pytest.approx(0.4)  # the first left at 0.1, room again
    assert tx.admit(1.0, 10) == pytest.approx(1.01)  # idle link: starts at once
    assert tx.busy_time == pytest.approx(0.41)
    assert tx.max_occupancy == 3


def test_bernoulli_loss_rate() -> None:
    loss = BernoulliLoss(0.1, np.random.default_rng(1))
    rate = np.mean([loss.lost() for _ in range(50_000)])
    assert abs(rate - 0.1) < 0.006  # 4 standard errors


def test_gilbert_elliott_stationary_rate_and_bursts() -> None:
    loss = GilbertElliottLoss(p=0.02, r=0.25, loss_good=0.0, loss_bad=0.8, rng=np.random.default_rng(2))
    draws = np.array([loss.lost() for _ in range(100_000)])
    assert abs(draws.mean() - loss.mean_loss) < 0.01
    # bursty: after a loss, another loss is far likelier than on average
    after_loss = draws[1:][draws[:-1]]
    assert after_loss.mean() > 5 * draws.mean()


def test_jitter_is_truncated_so_nothing_arrives_early() -> None:
    rng = np.random.default_rng(3)
    link = LinkDirection("a->b", "a", "b", Transmitter(1e6, 10), 0.005, 0.004, NoLoss(), rng)
    delays = np.array([link.delay_after_departure() for _ in range(20_000)])
    assert delays.min() >= 0.0
    assert abs(np.median(delays) - 0.005) < 2e-4
    assert 0.0035 < delays.std() < 0.0045


def test_network_routes_over_shortest_path_and_delivers_in_time() -> None:
    env = simpy.Environment()
    net = Network(env)
    rng = np.random.default_rng(0)
    for node in "abc":
        net.add_node(node)

    def link(x: str, y: str, bw: float, lat: float) -> None:
        net.add_link(
            LinkDirection(f"{x}->{y}", x, y, Transmitter(bw, 10), lat, 0.0, NoLoss(), rng),
            LinkDirection(f"{y}->{x}", y, x, Transmitter(bw, 10), lat, 0.0, NoLoss(), rng),
        )

    link("a", "b", 8e6, 0.001)
    link("b", "c", 8e5, 0.002)
    arrivals: list[float] = []

    class Sink:
        node = "c"

        def receive(self, packet: object) -> None:
            arrivals.append(env.now)

    class Source:
        node = "a"

    net.send(Source(), Sink(), 1000, "x")  # type: ignore[arg-type]
    env.run()
    # store and forward: 1 ms + 1 ms on the first link, then 10 ms + 2 ms on the second
    assert arrivals == [pytest.approx(0.014)]


def test_fifo_timers_never_fire_early_and_at_most_a_tick_late() -> None:
    env = simpy.Environment()
    timers = FifoTimers(env, delay=1.0, tick=0.05)
    fired: list[tuple[float, float]] = []
    starts = np.random.default_rng(4).uniform(0, 10, 200)

    def start_at(t: float) -> object:
        yield env.timeout(t)
        timers.start(lambda started: fired.append((started, env.now)), env.now)

    for t in starts:
        env.process(start_at(float(t)))
    env.run()
    assert len(fired) == 200
    lateness = np.array([done - started - 1.0 for started, done in fired])
    assert lateness.min() >= -1e-9 and lateness.max() <= 0.05 + 1e-9


def test_a_rearming_timer_does_not_postpone_the_timers_behind_it() -> None:
    """Two timers due at 1.0 s and 1.3 s; the first re-arms when it fires (as every retransmission does).
    The second must still fire at its own deadline (within a tick), not at the re-armed one's 2.0 s."""
    env = simpy.Environment()
    timers = FifoTimers(env, delay=1.0, tick=0.05)
    fired: dict[str, list[float]] = {"a": [], "b": []}

    def on(name: str) -> None:
        fired[name].append(env.now)
        if name == "a" and len(fired["a"]) < 3:
            timers.start(on, "a")

    def later() -> object:
        yield env.timeout(0.3)
        timers.start(on, "b")

    timers.start(on, "a")
    env.process(later())
    env.run()
    assert fired["a"] == pytest.approx([1.0, 2.0, 3.0])
    assert fired["b"] == pytest.approx([1.3])


def test_random_streams_depend_on_names_not_order() -> None:
    a = RandomStreams(5)
    b = RandomStreams(5)
    first = a.generator("camera", "cam-1").random(3)
    b.generator("camera", "cam-0").random(3)  # asking for another stream first changes nothing
    assert np.array_equal(first, b.generator("camera", "cam-1").random(3))
    assert not np.array_equal(first, RandomStreams(6).generator("camera", "cam-1").random(3))


@pytest.mark.parametrize(
    ("n", "size"), [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4)]
)
def test_remaining_length_varint(n: int, size: int) -> None:
    encoded = packets.encode_remaining_length(n)
    assert len(encoded) == size == packets.remaining_length_bytes(n)
    value = sum((byte & 0x7F) << (7 * i) for i, byte in enumerate(encoded))
    assert value == n


@pytest.mark.parametrize("protocol", [packets.MQTT311, packets.MQTT5])
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("payload", [0, 100, 1059, 20_000])
def test_publish_size_matches_the_encoded_header(protocol: str, qos: int, payload: int) -> None:
    header = packets.encode_publish_header("frames/cam-0", payload, qos, 7 if qos else None, protocol=protocol)
    assert len(header) + payload == packets.publish_size("frames/cam-0", payload, qos, protocol)


def test_known_packet_bytes() -> None:
    # PUBLISH QoS 1, topic "a/b", packet id 10, payload "hi" (MQTT 3.1.1 section 3.3)
    assert packets.encode_publish_header("a/b", 2, 1, 10) == bytes([0x32, 9, 0, 3, ord("a"), ord("/"), ord("b"), 0, 10])
    assert packets.ack_size() == 4
    assert packets.tcp_ip_size(1460) == 1500 and packets.tcp_ip_size(1461) == 1541


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("frames/#", "frames/cam-1", True),
        ("frames/#", "frames", True),
        ("frames/+", "frames/cam-1", True),
        ("frames/+", "frames/cam-1/x", False),
        ("+/+", "frames/cam-1", True),
        ("#", "$SYS/broker/load", False),
        ("$SYS/#", "$SYS/broker/load", True),
        ("$share/edge/frames/#", "frames/cam-1", True),
        ("frames/cam-1", "frames/cam-10", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["frames/#/x", "fr#mes", "a/b+", "", "$share//frames"])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_filter(bad)
