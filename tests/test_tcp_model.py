"""The TCP model alone: delivery, loss repair (RTO, fast retransmit, RACK, tail loss probe), ordering,
backoff, congestion window, handshake, reset, and wire-byte accounting, on a two-node network."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pytest
import simpy

from iotbed.sim.links import BernoulliLoss, LinkDirection, NoLoss, Transmitter
from iotbed.sim.network import Network
from iotbed.sim.tcp import ESTABLISHED, TcpConnection, TcpSettings

BW = 10e6  # bit/s
LAT = 0.005  # s, one way
SEG_S = 1500 * 8 / BW  # one full segment (1448 + 52 bytes) on the wire
ACK_S = 52 * 8 / BW


class ScriptedLoss:
    """Drops the packets whose index (0-based, in the order the direction sends them) is listed, and notes
    when each packet was sent."""

    def __init__(self, env: simpy.Environment, drops: Iterable[int] = ()) -> None:
        self.env = env
        self.drops = set(drops)
        self.times: list[float] = []

    def lost(self) -> bool:
        index = len(self.times)
        self.times.append(self.env.now)
        return index in self.drops


@dataclass
class Frame:
    """A stand-in for a trace record (the network's FrameAccount)."""

    wire_bytes: int = 0
    t_first_hop: float = -1.0


@dataclass
class Pair:
    env: simpy.Environment
    network: Network
    conn: TcpConnection
    forward: LinkDirection
    backward: LinkDirection
    at_b: list[tuple[float, object]] = field(default_factory=list)  # (time, message) delivered to b
    at_a: list[tuple[float, object]] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)

    def send_at(self, t: float, message: object, size: int, frame: Frame | None = None, end: str = "a") -> None:
        endpoint = self.conn.a if end == "a" else self.conn.b
        self.env.timeout(t - self.env.now).callbacks.append(lambda _: endpoint.send(message, size, frame))

    def delivered_b(self) -> list[object]:
        return [m for _, m in self.at_b]


def build(jitter: float = 0.0, settings: TcpSettings | None = None, seed: int = 0, latency: float = LAT) -> Pair:
    """Node a --(10 Mbit/s, 5 ms each way, no loss until a test sets one)-- node b; a TCP connection a-b."""
    env = simpy.Environment()
    network = Network(env)
    rng = np.random.default_rng(seed)
    network.add_node("a")
    network.add_node("b")
    forward = LinkDirection("a->b", "a", "b", Transmitter(BW, 10_000), latency, jitter, NoLoss(), rng)
    backward = LinkDirection("b->a", "b", "a", Transmitter(BW, 10_000), latency, jitter, NoLoss(), rng)
    network.add_link(forward, backward)
    pair = Pair(env, network, None, forward, backward)  # type: ignore[arg-type]
    pair.conn = TcpConnection(
        network,
        "a",
        "b",
        on_message_a=lambda m: pair.at_a.append((env.now, m)),
        on_message_b=lambda m: pair.at_b.append((env.now, m)),
        settings=settings,
    )
    network.drop_listeners.append(lambda packet, reason, link: pair.drops.append(reason))
    return pair


def warm_up(pair: Pair, n: int = 5, gap: float = 0.05) -> float:
    """A few one-segment messages so the sender has RTT samples; returns when the next test may start."""
    for i in range(n):
        pair.send_at(i * gap, f"warm-{i}", 200)
    pair.env.run(until=n * gap)
    assert len(pair.at_b) == n
    return n * gap


def test_no_loss_delivers_in_order_at_serialisation_plus_propagation() -> None:
    pair = build(settings=TcpSettings(nagle=False))
    frame = Frame()
    pair.send_at(0.0, "big", 5000, frame)  # 3 full segments and one of 656 bytes
    pair.env.run(until=0.1)
    wire = 3 * 1500 + (656 + 52)
    assert pair.at_b == [(pytest.approx(wire * 8 / BW + LAT), "big")]
    acks_of_big = pair.conn.b.stats.acks_sent
    assert acks_of_big == 4  # quick ACKs at the start of a connection
    for i in range(20):
        pair.send_at(0.1 + 0.01 * i, i, 100 + 50 * i)
    pair.env.run(until=2.0)
    assert pair.delivered_b() == ["big", *range(20)]
    for (t, _), i in zip(pair.at_b[1:], range(20)):
        assert t == pytest.approx(0.1 + 0.01 * i + (100 + 50 * i + 52) * 8 / BW + LAT)
    a, b = pair.conn.stats
    assert a.retransmissions == 0 and a.timeouts == 0 and a.segments_sent == 4 + 20
    # every byte on the links is counted at the ends and on the frames; the ACKs of "big" are charged to it
    assert pair.forward.stats.bytes_sent == a.wire_bytes and pair.backward.stats.bytes_sent == b.wire_bytes
    assert frame.wire_bytes == wire + 52 * acks_of_big
    assert frame.t_first_hop == pytest.approx(SEG_S + LAT)  # the first segment reached the next node


def test_link_taps_see_each_message_in_the_segment_that_ends_it() -> None:
    pair = build()
    seen: list[object] = []
    pair.forward.taps.append(lambda packet: seen.extend(packet.message.messages))
    pair.send_at(0.0, "big", 5000)
    pair.send_at(0.1, "small", 10)
    pair.env.run(until=1.0)
    assert seen == ["big", "small"]


def test_nagle_coalesces_small_writes_while_a_small_segment_is_unacknowledged() -> None:
    """Nagle (on in Linux, paho-mqtt and Mosquitto) with delayed ACKs: once quick ACKs are spent, a small
    message written while the previous one is unacknowledged waits and goes out with the next ones."""
    counts = {}
    for nagle in (True, False):
        pair = build(settings=TcpSettings(nagle=nagle))
        for i in range(60):
            pair.send_at(0.01 * i, i, 200)
        pair.env.run(until=2.0)
        assert pair.delivered_b() == list(range(60))
        counts[nagle] = pair.conn.a.stats.segments_sent
    assert counts[False] == 60 and counts[True] < 45


def test_a_single_loss_with_no_later_traffic_costs_one_rto() -> None:
    """A fresh connection has no RTT sample: the RTO is 1 s (RFC 6298), and the loss costs exactly that."""
    pair = build(settings=TcpSettings(tail_loss_probe=False))
    pair.forward.loss = ScriptedLoss(pair.env, {0})
    pair.send_at(0.0, "m", 1000)
    pair.env.run(until=5.0)
    a = pair.conn.a.stats
    assert a.timeouts == 1 and a.retransmits_rto == 1 and a.retransmissions == 1
    assert pair.at_b == [(pytest.approx(1.0 + 1052 * 8 / BW + LAT), "m")]


def lossy_after_warm_up(
    drops_from_now: Iterable[int], settings: TcpSettings | None = None, n_warm: int = 5
) -> tuple[Pair, ScriptedLoss, float]:
    """A warmed-up connection whose forward link then drops the listed data packets (0 = the next one)."""
    pair = build(settings=settings)
    loss = ScriptedLoss(pair.env, [])
    pair.forward.loss = loss
    start = warm_up(pair, n_warm)
    sent = len(loss.times)
    loss.drops = {sent + i for i in drops_from_now}
    return pair, loss, start


@pytest.mark.parametrize("probe", [False, True])
def test_a_single_loss_after_rtt_samples_costs_srtt_plus_200ms(probe: bool) -> None:
    """Linux's RTO is SRTT + max(200 ms, 4 mdev): on a steady path about SRTT + 200 ms. A tail loss probe,
    with one segment out, waits min(2 SRTT + 200 ms, RTO): the same time, but it is not counted a timeout."""
    pair, _, start = lossy_after_warm_up([0], TcpSettings(tail_loss_probe=probe))
    a = pair.conn.a
    rtt = 2 * LAT + (200 + 52) * 8 / BW + ACK_S
    assert a.srtt == pytest.approx(rtt, rel=0.01)
    assert a.rto == pytest.approx(a.srtt + 0.2, rel=1e-6)
    rto = a.rto
    pair.send_at(start, "lost", 200)
    pair.env.run(until=start + 3.0)
    assert pair.delivered_b()[-1] == "lost"
    assert pair.at_b[-1][0] == pytest.approx(start + rto + 252 * 8 / BW + LAT)
    if probe:
        assert (a.stats.retransmits_tlp, a.stats.timeouts) == (1, 0)
    else:
        assert (a.stats.retransmits_rto, a.stats.timeouts, a.stats.retransmits_tlp) == (1, 1, 0)
    assert a.backoff == 0 and a.rto == pytest.approx(a.srtt + 0.2, rel=0.05)  # the repair's ACK reset it


@pytest.mark.parametrize("rack", [True, False])
def test_a_loss_with_three_later_segments_is_repaired_by_fast_retransmit(rack: bool) -> None:
    """Ten segments, the second lost, on a fresh connection (RTO 1 s): three duplicate ACKs bring it back
    within about one RTT of their arrival, with no timeout."""
    pair = build(settings=TcpSettings(rack=rack))
    loss = ScriptedLoss(pair.env, {1})
    pair.forward.loss = loss
    pair.send_at(0.0, "ten", 10 * 1448)
    pair.env.run(until=3.0)
    a = pair.conn.a.stats
    assert pair.delivered_b() == ["ten"]
    assert (a.timeouts, a.retransmits_rto, a.retransmits_tlp, a.retransmits_fast) == (0, 0, 0, 1)
    assert a.dup_acks >= 3 and a.fast_recoveries == 1
    # the 3rd duplicate ACK (for segment 5) reaches a one RTT after segment 5 left; the resend takes a hop
    third_dup = 5 * SEG_S + LAT + ACK_S + LAT + 52 * 8 / BW
    resent = loss.times[10]
    assert resent == pytest.approx(third_dup, abs=2 * SEG_S)
    assert pair.at_b[0][0] == pytest.approx(resent + SEG_S + LAT, abs=1e-6)
    assert pair.at_b[0][0] < 0.03
    assert pair.conn.a.cwnd == int(11 * 0.7)  # 11 after the first ACK, times CUBIC's beta


def test_rto_follows_linux_estimator() -> None:
    """First sample r: SRTT = r and RTO = r + max(2r, 200 ms), i.e. 3 RTT on a long path; on a steady path
    the variance term sinks to its 200 ms floor: RTO = SRTT + 200 ms; a sudden longer RTT raises it."""
    pair = build(latency=0.15, settings=TcpSettings(quickacks=1000))  # every ACK at once: no delayed-ACK time
    pair.send_at(0.0, 0, 100)
    pair.env.run(until=0.5)
    a = pair.conn.a
    r = 0.3 + (152 + 52) * 8 / BW
    assert a.srtt == pytest.approx(r) and a.rto == pytest.approx(3 * r)
    for i in range(1, 30):
        pair.send_at(1.0 * i, i, 100)
    pair.env.run(until=30.0)
    assert a.srtt == pytest.approx(r) and a.rto == pytest.approx(r + 0.2, rel=1e-3)
    pair.forward.latency_s = 0.4  # the path gets 250 ms longer: 4 * mdev goes from ~0 to 250 ms
    pair.send_at(30.0, "slow", 100)
    pair.env.run(until=31.0)
    srtt = r + 0.25 / 8
    assert a.srtt == pytest.approx(srtt, rel=1e-3) and a.rto == pytest.approx(srtt + 0.25, rel=1e-3)


def test_rack_repairs_a_loss_with_only_two_later_segments_where_dupthresh_needs_an_rto() -> None:
    """A 3-segment message whose first segment is lost gets only two duplicate ACKs. RACK (Linux's default)
    resends after the reordering window (min RTT / 4); three-dupack fast retransmit alone waits for the RTO."""
    results = {}
    for rack in (True, False):
        pair, _, start = lossy_after_warm_up([0], TcpSettings(rack=rack, tail_loss_probe=False))
        a = pair.conn.a
        min_rtt, rto = a.min_rtt, a.rto
        pair.send_at(start, "three", 3 * 1448)
        pair.env.run(until=start + 3.0)
        assert pair.delivered_b()[-1] == "three"
        results[rack] = (pair.at_b[-1][0] - start, a.stats.retransmits_fast, a.stats.timeouts, min_rtt, rto)
    took, fast, timeouts, min_rtt, _ = results[True]
    assert (fast, timeouts) == (1, 0)
    # the 1st duplicate ACK is back one RTT after segment 2 left; then min_rtt / 4; then one hop
    expected = 2 * SEG_S + LAT + ACK_S + LAT + min_rtt / 4 + SEG_S + LAT
    assert took == pytest.approx(expected, abs=0.002)
    took, fast, timeouts, _, rto = results[False]
    assert (fast, timeouts) == (0, 1) and took == pytest.approx(rto + SEG_S + LAT, abs=0.002)


def test_two_losses_in_one_window_are_repaired_in_the_same_round_trip() -> None:
    pair = build()
    loss = ScriptedLoss(pair.env, {1, 4})
    pair.forward.loss = loss
    pair.send_at(0.0, "ten", 10 * 1448)
    pair.env.run(until=3.0)
    a = pair.conn.a.stats
    assert pair.delivered_b() == ["ten"]
    assert (a.retransmits_fast, a.timeouts, a.fast_recoveries) == (2, 0, 1)
    # Both holes are known at once (SACK + RACK); PRR lets one segment go per segment delivered, so the second
    # goes on the next SACK, one segment's transmission later: both in one round trip.
    assert loss.times[11] - loss.times[10] == pytest.approx(SEG_S)


def test_without_prr_both_holes_are_resent_at_once() -> None:
    pair = build(settings=TcpSettings(prr=False))
    loss = ScriptedLoss(pair.env, {1, 4})
    pair.forward.loss = loss
    pair.send_at(0.0, "ten", 10 * 1448)
    pair.env.run(until=3.0)
    assert pair.delivered_b() == ["ten"]
    assert loss.times[10] == pytest.approx(loss.times[11])


def test_messages_behind_a_loss_wait_until_it_is_repaired() -> None:
    # Without Nagle: with it, m1..m3 would wait for m0's ACK in the sender instead (the next test).
    pair, _, start = lossy_after_warm_up([0], TcpSettings(tail_loss_probe=False, nagle=False))
    for i in range(4):  # the first is lost; three more follow within a few ms: fast retransmit
        pair.send_at(start + 0.002 * i, f"m{i}", 300)
    pair.env.run(until=start + 3.0)
    tail = pair.at_b[-4:]
    assert [m for _, m in tail] == ["m0", "m1", "m2", "m3"]
    times = {t for t, _ in tail}
    assert len(times) == 1  # all four handed over together, when the hole was filled
    t_repair = times.pop()
    assert t_repair > start + 0.006 + 2 * LAT  # m3 arrived long before: it was held
    assert pair.conn.b.stats.messages_delivered == 5 + 4
    assert pair.conn.a.stats.retransmits_fast == 1


def test_no_reordering_on_a_connection_even_with_jitter() -> None:
    """Jitter reorders packets on the link; the receiver still hands messages over in order, once each."""
    pair = build(jitter=0.004, seed=3)
    sizes = np.random.default_rng(4).integers(50, 6000, 300)
    for i, size in enumerate(sizes):
        pair.send_at(0.002 * i, i, int(size))
    pair.env.run(until=20.0)
    assert pair.delivered_b() == list(range(300))
    a = pair.conn.a.stats
    assert a.dup_acks > 10  # segments did overtake each other
    assert pair.conn.b.stats.bytes_delivered == int(sizes.sum())


def test_repeated_loss_of_one_segment_backs_the_rto_off() -> None:
    """Lose the first three transmissions of one segment: it goes at 0, 1, 3 and 7 s (1 s, doubling)."""
    pair = build(settings=TcpSettings(tail_loss_probe=False))
    loss = ScriptedLoss(pair.env, {0, 1, 2})
    pair.forward.loss = loss
    a = pair.conn.a
    pair.send_at(0.0, "m", 500)
    pair.env.run(until=6.0)
    assert (a.backoff, a.rto) == (2, 4.0)  # timeouts at 1 and 3 s; the next is due at 7 s
    pair.env.run(until=20.0)
    assert loss.times == pytest.approx([0.0, 1.0, 3.0, 7.0])
    assert pair.at_b == [(pytest.approx(7.0 + 552 * 8 / BW + LAT), "m")]
    assert a.stats.timeouts == 3
    assert a.backoff == 0 and a.rto == pytest.approx(a.srtt + 0.2)  # the echo of the 4th copy is a sample


def test_rto_backoff_is_capped_at_120_s() -> None:
    pair = build()
    pair.forward.loss = ScriptedLoss(pair.env, range(100))
    pair.send_at(0.0, "m", 500)
    pair.env.run(until=600.0)
    a = pair.conn.a
    assert a.rto == 120.0 and a.stats.timeouts >= 8  # 1 + 2 + ... + 64 + 120 + 120 + ...


def test_a_lost_ack_is_covered_by_the_next_cumulative_ack() -> None:
    pair = build()
    back = ScriptedLoss(pair.env, {0})
    pair.backward.loss = back
    pair.send_at(0.0, "m0", 500)
    pair.send_at(0.05, "m1", 500)
    pair.env.run(until=3.0)
    a = pair.conn.a
    assert pair.delivered_b() == ["m0", "m1"]
    assert len(back.times) == 2  # one ACK each; the first was lost
    assert a.stats.retransmissions == 0 and a.stats.timeouts == 0
    assert a.snd_una == 1000 and a.in_flight == 0


def test_random_loss_delivers_every_message_in_order_exactly_once() -> None:
    rng = np.random.default_rng(7)
    pair = build(seed=1)
    pair.forward.loss = BernoulliLoss(0.01, np.random.default_rng(8))
    pair.backward.loss = BernoulliLoss(0.01, np.random.default_rng(9))
    sizes = rng.integers(100, 30_000, 1500)
    for i, size in enumerate(sizes):
        pair.send_at(0.02 * i, i, int(size))
    for i in range(200):  # and some traffic the other way
        pair.send_at(0.1 * i + 0.001, -i, 400, end="b")
    pair.env.run(until=100.0)
    assert pair.delivered_b() == list(range(1500))
    assert [m for _, m in pair.at_a] == [-i for i in range(200)]
    a, b = pair.conn.stats
    assert pair.forward.stats.dropped_loss > 50 and a.retransmissions >= pair.forward.stats.dropped_loss // 2
    assert a.retransmits_fast > a.timeouts  # most losses are repaired without waiting for the RTO
    assert pair.forward.stats.bytes_sent == a.wire_bytes and pair.backward.stats.bytes_sent == b.wire_bytes


def test_window_grows_in_slow_start_and_reacts_to_losses() -> None:
    pair = build()
    pair.send_at(0.0, "bulk", 200 * 1448)
    pair.env.run(until=5.0)
    a = pair.conn.a
    assert pair.delivered_b() == ["bulk"] and a.cwnd > 40  # slow start from 10, no loss
    # an idle connection does not earn a window: one segment every 50 ms keeps the initial window
    idle = build()
    for i in range(40):
        idle.send_at(0.05 * i, i, 1000)
    idle.env.run(until=5.0)
    assert idle.conn.a.cwnd == 10
    # an RTO takes the window to one segment
    pair, _, start = lossy_after_warm_up([0], TcpSettings(tail_loss_probe=False))
    pair.send_at(start, "lost", 100)
    pair.env.run(until=start + pair.conn.a.rto + 0.001)
    assert pair.conn.a.cwnd == 1 and pair.conn.a.ssthresh == 7


def test_delayed_acks_and_acks_riding_on_answers() -> None:
    # one-way bulk: quick ACKs at first, then about one ACK per two full segments
    pair = build()
    pair.send_at(0.0, "bulk", 400 * 1448)
    pair.env.run(until=5.0)
    acks = pair.conn.b.stats.acks_sent
    assert 200 <= acks <= 200 + 16 + 10
    # request/response: once the server answers, its ACKs ride on the answers
    pair = build()
    pair.conn.b.on_message = lambda m: pair.conn.b.send(("re", m), 4)
    for i in range(100):
        pair.send_at(0.01 * i, i, 300)
    pair.env.run(until=3.0)
    assert [m for _, m in pair.at_a] == [("re", i) for i in range(100)]
    assert pair.conn.b.stats.acks_sent <= 2
    assert pair.conn.a.stats.retransmissions == 0


def test_handshake_gives_an_rtt_sample_and_a_lost_syn_costs_one_second() -> None:
    pair = build()
    syn_loss = ScriptedLoss(pair.env, {0})
    pair.forward.loss = syn_loss
    pair.conn.open()
    assert not pair.conn.established
    pair.conn.a.send("connect", 50)  # waits for the SYN-ACK
    a, b = pair.conn.a, pair.conn.b
    rtt = 2 * (LAT + 60 * 8 / BW)
    pair.env.run(until=1.0 + rtt + 1e-6)
    assert a.state == ESTABLISHED and a.srtt == pytest.approx(rtt) and a.rto == pytest.approx(rtt + 0.2)
    pair.env.run(until=3.0)
    assert pair.conn.established and pair.delivered_b() == ["connect"]
    assert b.srtt == pytest.approx(2 * LAT + 8 * (60 + 52) / BW)  # from the ACK of its SYN-ACK
    # SYN at 0 lost, again at 1 s; SYN-ACK back; ACK, then the data
    assert syn_loss.times[:3] == pytest.approx([0.0, 1.0, 1.0 + rtt])
    assert pair.at_b[0][0] == pytest.approx(1.0 + rtt + (52 + 102) * 8 / BW + LAT)
    assert a.rto == pytest.approx(a.srtt + 0.2) and a.stats.timeouts == 1


def test_reset_drops_unacknowledged_data_and_old_packets() -> None:
    pair = build()
    pair.send_at(0.0, "delivered", 500)
    pair.env.run(until=0.1)
    pair.conn.a.send("in flight", 500)
    pair.conn.a.send("big", 10 * 1448)
    pair.env.run(until=0.101)  # some segments are on the wire
    dropped_a, dropped_b = pair.conn.reset()
    assert dropped_a == ["in flight", "big"] and dropped_b == []
    assert pair.conn.a.state != ESTABLISHED
    with pytest.raises(ConnectionError):
        pair.conn.a.send("closed", 10)
    pair.env.run(until=0.5)
    assert pair.delivered_b() == ["delivered"]
    assert "tcp_closed" in pair.drops  # the old packets arrived at a closed end
    pair.conn.open()
    pair.conn.a.send("again", 500)
    pair.env.run(until=1.0)
    assert pair.delivered_b() == ["delivered", "again"]
    assert pair.conn.a.snd_una == 500  # a new incarnation counts from zero


def test_one_end_aborting_leaves_the_other_retrying() -> None:
    """A crashed node: its end is gone, the peer's segments are dropped there and it keeps backing off."""
    pair = build(settings=TcpSettings(tail_loss_probe=False))
    pair.send_at(0.0, "before", 500)
    pair.env.run(until=0.1)
    assert pair.conn.b.abort() == []
    pair.conn.a.send("into the void", 500)
    pair.env.run(until=10.0)
    assert pair.delivered_b() == ["before"]
    assert pair.conn.a.stats.timeouts >= 4 and pair.conn.a.backoff >= 4
    assert pair.drops.count("tcp_closed") == 1 + pair.conn.a.stats.timeouts


def test_loopback_connection_on_one_node() -> None:
    env = simpy.Environment()
    network = Network(env)
    network.add_node("n")
    got: list[object] = []
    conn = TcpConnection(network, "n", "n", on_message_b=got.append)
    conn.b.on_message = lambda m: (got.append(m), conn.b.send(("ack", m), 4))
    for i in range(5):
        conn.a.send(i, 3000)
    env.run(until=1.0)
    assert got == list(range(5)) and conn.a.in_flight == 0


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        TcpSettings(mss=0)
    with pytest.raises(ValueError):
        TcpSettings(rto_min_s=2.0)
    with pytest.raises(ValueError):
        TcpSettings(beta=1.0)
