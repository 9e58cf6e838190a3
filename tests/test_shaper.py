"""The in-process link shaper: token-bucket rate, delay distribution, loss, determinism, loss through the TCP
model (transport tcp); and, against a real broker, that the shaping happens in real time before the paho
publish."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import simpy
from mosquitto_fixtures import WAIT_S

from iotbed.broker.packets import MQTT5, publish_size, tcp_ip_size
from iotbed.broker.realtime import wait_for
from iotbed.emulation.paths import NodePaths, PathShape
from iotbed.emulation.shaper import (
    GilbertElliottLoss,
    LinkShaper,
    TcpPath,
    TokenBucket,
    make_loss,
    mqtt_bytes,
    path_shaper,
)
from iotbed.sim.links import BernoulliLoss, NoLoss
from iotbed.sim.tcp import TcpSettings


def _run(shaper: LinkShaper, arrivals: list[tuple[float, int, int]]) -> list[float]:
    """Submit (time, size, qos) messages; return the times their `send` ran, in submission order (nan: never)."""
    env = shaper.env
    sent = [math.nan] * len(arrivals)

    def feed():
        for i, (at, size, qos) in enumerate(arrivals):
            if at > env.now:
                yield env.timeout(at - env.now)
            shaper.submit(size, qos, lambda i=i: sent.__setitem__(i, env.now))

    env.process(feed())
    env.run()
    return sent


def _gen(seed: int = 1) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- token bucket -----------------------------------------------------------------------------------------
def test_token_bucket_backlog_drains_at_exactly_the_rate() -> None:
    # 200 x 500 B at t=0 through 10 kB/s with a 1000 B bucket: two leave at once, then one every 50 ms.
    shaper = LinkShaper(simpy.Environment(), _gen(), rate_bytes_s=10_000, burst_bytes=1000)
    sent = _run(shaper, [(0.0, 500, 0)] * 200)
    assert sent[:2] == [0.0, 0.0]
    assert np.allclose(np.diff(sent[1:]), 0.05, rtol=0, atol=1e-9)
    assert sent[-1] == pytest.approx((200 * 500 - 1000) / 10_000, abs=1e-9)
    assert shaper.stats.max_backlog == 198


def test_token_bucket_long_run_rate_within_half_a_percent() -> None:
    # Poisson arrivals offering 2x the rate, mixed sizes: the achieved rate is the configured one.
    rng = _gen(7)
    rate = 50_000.0
    sizes = rng.integers(200, 3000, size=4000)
    times = np.cumsum(rng.exponential(sizes.mean() / (2 * rate), size=4000))
    shaper = LinkShaper(simpy.Environment(), _gen(), rate_bytes_s=rate, burst_bytes=4000)
    sent = np.asarray(_run(shaper, [(float(t), int(s), 0) for t, s in zip(times, sizes, strict=True)]))
    assert np.all(np.diff(sent) >= -1e-12)  # FIFO
    half = len(sent) // 2  # steady state: measure over the second half, where a backlog keeps the link busy
    achieved = sizes[half + 1 :].sum() / (sent[-1] - sent[half])
    assert achieved == pytest.approx(rate, rel=0.005)


def test_token_bucket_lets_bursts_through_and_big_messages_pass_at_the_mean_rate() -> None:
    bucket = TokenBucket(rate_bytes_s=1000, burst_bytes=3000)
    assert [bucket.departure(0.0, 1000) for _ in range(3)] == [0.0, 0.0, 0.0]  # a full bucket: a burst
    assert bucket.departure(0.0, 1000) == pytest.approx(1.0)
    big = TokenBucket(rate_bytes_s=1000, burst_bytes=500)
    assert big.departure(0.0, 2000) == 0.0  # bigger than the bucket: goes when the bucket is full ...
    assert big.departure(0.0, 500) == pytest.approx(2.0)  # ... and the debt is paid before the next one
    under = LinkShaper(simpy.Environment(), _gen(), rate_bytes_s=10_000, burst_bytes=1500)
    arrivals = [(i * 0.2, 1000, 0) for i in range(20)]  # 5 kB/s offered: never waits
    assert _run(under, arrivals) == [t for t, _, _ in arrivals]


def test_queue_limit_drops_tail() -> None:
    shaper = LinkShaper(simpy.Environment(), _gen(), rate_bytes_s=1000, burst_bytes=100, queue_limit=5)
    sent = _run(shaper, [(0.0, 100, 0)] * 20)
    assert sum(not math.isnan(t) for t in sent) == 6 and shaper.stats.dropped_queue_full == 14


# --- delay and jitter -------------------------------------------------------------------------------------
def _delays(delay_s: float, jitter_s: float, n: int, seed: int = 3) -> np.ndarray:
    shaper = LinkShaper(simpy.Environment(), _gen(seed), delay_s=delay_s, jitter_s=jitter_s)
    return np.asarray(_run(shaper, [(0.0, 100, 0)] * n))


def test_delay_distribution_mean_and_spread() -> None:
    # N(50 ms, 10 ms), truncated at 0 (5 sigma away: no effect). Tolerances: mean within 4 standard errors,
    # standard deviation within 3 % (its standard error at n=20000 is 0.5 %).
    n = 20_000
    d = _delays(0.050, 0.010, n)
    assert abs(d.mean() - 0.050) < 4 * 0.010 / math.sqrt(n)
    assert d.std() == pytest.approx(0.010, rel=0.03)
    assert d.min() >= 0.0
    assert np.all(_delays(0.020, 0.0, 10) == 0.020)  # no jitter: exactly the delay


def test_jitter_is_truncated_at_zero() -> None:
    # N(5 ms, 10 ms) truncated below at 0: E[max(0, X)] = mu*Phi(mu/s) + s*phi(mu/s); mean within 4 SE.
    n, mu, s = 20_000, 0.005, 0.010
    d = _delays(mu, s, n)
    z = mu / s
    expected = mu * 0.5 * (1 + math.erf(z / math.sqrt(2))) + s * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    assert d.min() == 0.0 and np.mean(d == 0.0) == pytest.approx(0.5 * (1 + math.erf(-z / math.sqrt(2))), abs=0.015)
    assert abs(d.mean() - expected) < 4 * d.std() / math.sqrt(n)


def test_same_seed_same_schedule() -> None:
    def schedule(seed: int) -> list[float]:
        shaper = LinkShaper(
            simpy.Environment(),
            _gen(seed),
            rate_bytes_s=20_000,
            delay_s=0.01,
            jitter_s=0.005,
            loss=make_loss("gilbert_elliott", _gen(seed + 100), p=0.1, r=0.5, loss_bad=0.7),
            retry_interval_s=0.5,
        )
        return _run(shaper, [(i * 0.01, 800, i % 2) for i in range(300)])

    a, b, c = schedule(11), schedule(11), schedule(12)
    assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    assert not np.array_equal(np.asarray(a), np.asarray(c), equal_nan=True)


# --- loss ----------------------------------------------------------------------------------------------------
def test_bernoulli_loss_rate_and_qos1_retransmission() -> None:
    n, p = 10_000, 0.2
    shaper = LinkShaper(simpy.Environment(), _gen(), loss=BernoulliLoss(p, _gen(5)))
    sent = _run(shaper, [(0.0, 100, 0)] * n)
    lost = sum(math.isnan(t) for t in sent) / n
    assert abs(lost - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert shaper.stats.dropped_loss == shaper.stats.losses == round(lost * n)

    class Record:  # the fields of a trace FrameRecord the shaper charges
        wire_bytes = retries = losses = 0
        drop_reason = drop_link = ""

    env = simpy.Environment()
    reliable = LinkShaper(env, _gen(), loss=BernoulliLoss(0.5, _gen(6)), retry_interval_s=1.0, name="uplink")
    records = [Record() for _ in range(200)]
    arrived: list[float] = []
    for record in records:
        reliable.submit(100, 1, lambda: arrived.append(env.now), record)
    env.run()
    assert len(arrived) == 200  # QoS 1: every message gets through eventually
    assert reliable.stats.retransmissions == reliable.stats.losses == sum(r.retries for r in records) > 0
    by_retries = sorted(records, key=lambda r: r.retries)
    assert all(t == r.retries * 1.0 for t, r in zip(sorted(arrived), by_retries, strict=True))  # 1 s per retry
    assert sum(r.wire_bytes for r in records) == 100 * (200 + reliable.stats.retransmissions)
    assert {r.drop_link for r in records if r.losses} == {"uplink"}


def test_gilbert_elliott_loss_is_bursty_with_the_stationary_rate() -> None:
    n = 50_000
    model = GilbertElliottLoss(0.05, 0.3, 0.0, 0.8, _gen(9))
    shaper = LinkShaper(simpy.Environment(), _gen(), loss=model)
    sent = np.asarray(_run(shaper, [(0.0, 100, 0)] * n))
    lost = np.isnan(sent)
    assert lost.mean() == pytest.approx(model.mean_loss, abs=0.01)  # 0.114; bursts inflate the variance
    after_loss = lost[1:][lost[:-1]].mean()  # P(loss | previous lost) far above the mean: bursts
    assert after_loss > 2 * lost.mean()


# --- loss through the TCP model (transport tcp) ---------------------------------------------------------
class Record:
    """The fields of a trace FrameRecord the shaper charges."""

    def __init__(self) -> None:
        self.wire_bytes = self.retries = self.losses = 0
        self.drop_reason = self.drop_link = ""


class LoseNth:
    """Loses the packets at the given positions (1-based) of the link's sequence of loss draws."""

    def __init__(self, *positions: int) -> None:
        self.positions = set(positions)
        self.draws = 0

    def lost(self) -> bool:
        self.draws += 1
        return self.draws in self.positions


def _tcp_run(loss: object, n: int = 12, seed: int = 1) -> tuple[list[float], list[Record], LinkShaper]:
    """`n` one-segment messages (1,000 B on the wire), one every 20 ms from t=1 s, over 100 kB/s and 10 ms each
    way, Nagle off (on, each small message would wait for the previous one's ACK); their arrival times, their
    records and the shaper."""
    env = simpy.Environment()
    back = TcpPath(delay_s=0.01, settings=TcpSettings(nagle=False))
    shaper = LinkShaper(env, _gen(seed), name="cam-0", rate_bytes_s=100_000, delay_s=0.01, loss=loss, tcp=back)
    records = [Record() for _ in range(n)]
    arrived = [math.nan] * n

    def feed():
        yield env.timeout(1.0)
        for i in range(n):
            shaper.submit(1000, 1, lambda i=i: arrived.__setitem__(i, env.now), records[i])
            yield env.timeout(0.02)

    env.process(feed())
    env.run(until=30)
    return arrived, records, shaper


def test_tcp_model_delays_a_lost_message_and_holds_the_ones_behind_it() -> None:
    clean, clean_records, clean_shaper = _tcp_run(NoLoss())
    segment = (mqtt_bytes(1000) + 52) / 100_000  # the model's segment: MQTT bytes plus Linux's 52 B of headers
    assert clean == pytest.approx([1.0 + 0.02 * i + segment + 0.01 for i in range(12)], abs=1e-9)
    assert clean_shaper.stats.sent == 12 and clean_shaper.stats.tcp_retransmissions == 0
    # Draws 1 and 2 on the link towards the broker are the handshake's SYN and ACK; 5 is message 2's segment.
    lossy, records, shaper = _tcp_run(LoseNth(5))
    assert [r.losses for r in records] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert lossy[:2] == clean[:2]
    repaired = lossy[2] - clean[2]
    assert repaired > 0.02  # at least one round trip: TCP found the hole and resent it
    # the ones that got through while it was missing waited for it, and came out with it
    held = [i for i in range(3, 12) if lossy[i] == pytest.approx(lossy[2], abs=1e-9)]
    assert held == list(range(3, 3 + len(held))) and len(held) >= 2
    assert all(lossy[i] > clean[i] + 0.01 for i in held)
    # the resent segment took the link for one transmission; after that, as if nothing happened
    assert all(clean[i] <= lossy[i] <= clean[i] + segment + 1e-9 for i in range(3 + len(held), 12))
    assert lossy[-1] == clean[-1]
    assert lossy == sorted(lossy)  # in order
    # no message lost or resent by MQTT: TCP resent one segment
    assert shaper.stats.sent == 12 and shaper.stats.retransmissions == 0 and shaper.stats.dropped_loss == 0
    assert shaper.stats.losses == 1 and shaper.stats.tcp_retransmissions >= 1
    assert all(r.retries == 0 and r.drop_reason == "" for r in records)
    # the resent segment is charged to its frame, as in simulation
    assert records[2].wire_bytes > clean_records[2].wire_bytes


def test_tcp_model_repairs_every_loss_the_same_way_for_the_same_seed() -> None:
    def run(seed: int) -> tuple[list[float], int]:
        env = simpy.Environment()
        rng = _gen(seed)
        back = TcpPath(delay_s=0.02, jitter_s=0.002, loss=BernoulliLoss(0.1, _gen(seed + 1)), rng=_gen(seed + 2))
        shaper = LinkShaper(
            env,
            rng,
            rate_bytes_s=50_000,
            delay_s=0.02,
            jitter_s=0.002,
            loss=BernoulliLoss(0.1, _gen(seed + 3)),
            tcp=back,
        )
        sent = _run(shaper, [(1.0 + i * 0.05, 1000 + 600 * (i % 4), 1) for i in range(300)])
        return sent, shaper.stats.tcp_retransmissions

    (a, ra), (b, rb), (c, _) = run(11), run(11), run(12)
    assert not any(math.isnan(t) for t in a)  # every message delivered
    assert a == sorted(a) and ra > 0  # in order, with losses repaired
    assert a == b and ra == rb
    assert a != c


def test_the_model_gets_the_mqtt_bytes_and_each_transport_its_own_shaper() -> None:
    assert all(mqtt_bytes(tcp_ip_size(m)) == m for m in range(1, 20_000, 7))
    shape = PathShape(25_000.0, 0.01, 0.001, BernoulliLoss(0.05, None), 40)  # type: ignore[arg-type]
    paths = NodePaths(shape, PathShape(25_000.0, 0.01, 0.0, BernoulliLoss(0.02, None), 40))  # type: ignore[arg-type]
    env = simpy.Environment()

    def make(transport: str, kernel_loss: bool = False) -> LinkShaper:
        return path_shaper(env, "cam-0", paths, _gen(), _gen(2), transport=transport, kernel_loss=kernel_loss)

    tcp, udp, kernel = make("tcp"), make("udp"), make("tcp", kernel_loss=True)
    assert tcp.transport == "tcp" and isinstance(tcp.loss, BernoulliLoss) and tcp.loss.rate == 0.05
    assert tcp.tcp is not None and tcp.tcp.settings.nagle  # as paho and Mosquitto leave it ...
    nodelay = path_shaper(env, "cam-1", paths, _gen(), _gen(2), transport="tcp", tcp_nodelay=True)
    assert nodelay.tcp is not None and not nodelay.tcp.settings.nagle  # ... unless the scenario says otherwise
    assert udp.transport == "udp" and isinstance(udp.loss, BernoulliLoss) and udp.queue_limit == 40
    # --netns without netem: the kernel loses real packets, so the shaper only times them
    assert kernel.transport == "udp" and isinstance(kernel.loss, NoLoss) and kernel.queue_limit is None
    assert kernel.bucket is not None and kernel.delay_s == 0.01 and kernel.jitter_s == 0.001
    with pytest.raises(ValueError, match="udp model only"):
        LinkShaper(env, _gen(), max_retries=3, tcp=TcpPath())


# --- in a live run ---------------------------------------------------------------------------------------
def test_shaper_paces_real_publishes(plain_broker, rt_env, transports) -> None:
    # 20 messages of ~1 kB at once through 20 kB/s (bucket 1100 B) and 100 ms delay: the first arrives after
    # ~0.1 s, the rest spread over ~0.97 s. Tolerance 20 % for a loaded 2-core machine (and 2 ms polling).
    shaper = LinkShaper(rt_env, _gen(), rate_bytes_s=20_000, burst_bytes=1100, delay_s=0.1)
    pub = transports(plain_broker, "cam-0", shaper=shaper)
    sub = transports(plain_broker, "edge-0")
    arrivals: list[float] = []
    sub.subscribe("frames/#", lambda m: arrivals.append(time.monotonic()), 1)
    rt_env.run(until=pub.connect())
    rt_env.run(until=sub.connect())
    rt_env.run(until=wait_for(rt_env, sub.subscribed, WAIT_S))
    rt_env.sync()  # simulated time may lag the wall clock after set-up; the shaper's timeouts count from now
    start = time.monotonic()
    for _ in range(20):
        pub.publish("frames/cam-0", bytes(1000), 1)
    rt_env.run(until=wait_for(rt_env, lambda: len(arrivals) == 20, WAIT_S))
    size = publish_size("frames/cam-0", 1000, 1, MQTT5)  # what the shaper charges: the PUBLISH packet
    expected_span = 19 * size / 20_000 - (1100 - size) / 20_000
    assert arrivals[0] - start == pytest.approx(0.1, abs=0.05)
    assert arrivals[-1] - arrivals[0] == pytest.approx(expected_span, rel=0.2)
    assert shaper.stats.sent == 20 and pub.stats.published == 20
