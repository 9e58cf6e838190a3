"""An in-process link shaper for live runs: what a node sends waits here before the real paho publish.

The real broker sits on loopback, which has no bandwidth limit, delay or loss worth speaking of. So what a
camera publishes passes through a `LinkShaper` first, which models its path to the broker the way the
simulator models links, and hands each message to paho when it would have arrived. How loss is modelled
follows the scenario's `broker.transport`, as in simulation:

- `udp` (MQTT-SN-like, the model before TCP), per message:
  1. admission: by default the link serialises, as a simulated link does: messages leave in FIFO order and
     each occupies the link for size / rate (`Serializer`). With `burst_bytes`, a token bucket of that depth
     decides instead: a message waits until the bucket holds min(size, burst) tokens, then takes `size`
     tokens (the bucket may go negative, so a message bigger than the bucket still passes, at the mean
     rate), so bursts pass at once. With `queue_limit`, a message that finds that many messages waiting is
     dropped (drop-tail, "queue_full").
  2. loss, drawn after admission (a lost message still used the link), from any `LossModel` of
     `iotbed.sim.links`. A lost QoS 0 message is gone ("link_loss"); a lost QoS 1/2 message is sent again
     `retry_interval_s` later through the shaper, as the simulated MQTT sender retransmits, until it gets
     through (or `max_retries` is reached: "max_retries").
  3. delay: propagation `delay_s` plus `jitter_s` * N(0, 1), truncated at zero (the distribution
     `LinkDirection.delay_after_departure` uses in simulation; like there, jitter may reorder messages).
- `tcp` (`tcp=TcpPath(...)`; the default transport): the camera's messages are written into a TCP connection
  of the simulator's model (`iotbed.sim.tcp.TcpConnection`) over a private two-node network: one link
  direction to the broker (`rate_bytes_s`, `delay_s`, `jitter_s`, `loss`, `queue_limit` as a drop-tail queue
  of packets) and one back (the `TcpPath`'s, which the model's ACKs cross). A message is cut into segments
  that are serialised, delayed and lost one by one; TCP repairs a lost segment (or ACK) as the model's Linux
  does (RACK, tail loss probe, fast retransmit, RTO), and the receiving end hands messages on whole and in
  order, so the messages written behind a lost one wait for its repair (head-of-line blocking). The
  connection opens with a handshake over those links when the shaper is made. Nothing is dropped and
  nothing is resent by MQTT: `record.retries` stays 0; a lost segment counts in `record.losses`, as in
  simulation. Nagle's algorithm is on unless `TcpPath.settings` says otherwise (`path_shaper` follows the
  scenario's `broker.tcp_nodelay`, as the live clients do).

What is shaped, and what is not: only what a camera publishes, on its way to the broker. In `tcp` mode the
model's own ACKs cross the path back; the real MQTT acknowledgements (PUBACK, PUBREC, ...), the
broker-to-subscriber leg (the frames an edge server receives) and everything edge servers, gateways and the
registry send go over loopback unshaped.

Everything is SimPy timeouts on the environment the node runs on (a `simpy.rt.RealtimeEnvironment` in
emulation), so the only real-time effect is that `send()` runs later. The shaper is deterministic given its
`numpy.random.Generator` (and the loss models'): the same seed gives the same departure times, delays and
losses. It works on any SimPy environment, which is how it is unit-tested without waiting.

Shaping real packets in the kernel instead is `iotbed.emulation.netns` (`iotbed emulate --netns`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy
from simpy.events import Timeout

from iotbed.broker.packets import TCP_IPV4_HEADER_BYTES, TCP_MSS_BYTES
from iotbed.emulation.paths import NodePaths, same_loss
from iotbed.sim.links import BernoulliLoss, GilbertElliottLoss, LinkDirection, LossModel, NoLoss, Transmitter
from iotbed.sim.network import Network, Packet
from iotbed.sim.tcp import TcpConnection, TcpSettings, TcpStats

if TYPE_CHECKING:
    from iotbed.sim.trace import FrameRecord

__all__ = [
    "LinkShaper",
    "Serializer",
    "ShaperStats",
    "TcpPath",
    "TokenBucket",
    "make_loss",
    "path_shaper",
    "BernoulliLoss",
    "GilbertElliottLoss",
]

UNLIMITED_QUEUE = 1_000_000  # packets: a transmitter that never drops


class TokenBucket:
    """Departure times of a FIFO stream through a token bucket (no SimPy process: arithmetic per message)."""

    def __init__(self, rate_bytes_s: float, burst_bytes: float) -> None:
        if rate_bytes_s <= 0 or burst_bytes <= 0:
            raise ValueError("a token bucket needs a rate and a depth above zero")
        self.rate = float(rate_bytes_s)
        self.burst = float(burst_bytes)
        self.tokens = self.burst  # at time `self.t`
        self.t = 0.0
        self.last_departure = 0.0

    def departure(self, now: float, size: int) -> float:
        start = now if now > self.last_departure else self.last_departure  # FIFO: not before the previous one
        tokens = min(self.burst, self.tokens + (start - self.t) * self.rate)
        need = min(float(size), self.burst)
        depart = start if tokens >= need else start + (need - tokens) / self.rate
        tokens = min(self.burst, tokens + (depart - start) * self.rate) - size
        self.tokens, self.t, self.last_departure = tokens, depart, depart
        return depart


class Serializer:
    """Departure times of a FIFO stream over a link of `rate_bytes_s`: each message's transmission starts when
    the previous one's ends (or when it arrives) and lasts size / rate (the simulator's Lindley recursion)."""

    def __init__(self, rate_bytes_s: float) -> None:
        if rate_bytes_s <= 0:
            raise ValueError("a link needs a rate above zero")
        self.rate = float(rate_bytes_s)
        self.busy_until = 0.0

    def departure(self, now: float, size: int) -> float:
        start = now if now > self.busy_until else self.busy_until
        self.busy_until = start + size / self.rate
        return self.busy_until


@dataclass(slots=True)
class ShaperStats:
    """What a shaper did. In `tcp` mode the link counters are packets (segments, ACKs, the handshake), and
    nothing is dropped for good or resent by MQTT."""

    submitted: int = 0
    sent: int = 0
    bytes_admitted: int = 0  # bytes put on the link towards the broker (tcp: every packet, headers included)
    dropped_queue_full: int = 0  # udp: messages; tcp: packets, which TCP resends
    dropped_loss: int = 0  # QoS 0 messages lost for good (udp)
    losses: int = 0  # udp: every loss draw that hit, QoS 1/2 ones sent again included; tcp: packets lost
    retransmissions: int = 0  # resent by MQTT (udp); 0 in tcp mode
    given_up: int = 0
    max_backlog: int = 0  # udp: messages waiting; tcp: packets in the link's queue
    ack_losses: int = 0  # tcp: packets lost on the way back (ACKs)
    tcp_retransmissions: int = 0  # tcp: segments the model's sender resent


@dataclass(frozen=True)
class TcpPath:
    """What the `tcp` mode needs beyond the path towards the broker: the path back, which the model's ACKs
    cross, and the TCP settings. `rng` draws that path's jitter (None: a stream split off the shaper's)."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: LossModel = field(default_factory=NoLoss)
    rate_bytes_s: float | None = None
    queue: int | None = None
    settings: TcpSettings = field(default_factory=TcpSettings)
    # `submit`'s size counts 40 B of TCP/IPv4 headers per 1460-B segment (`packets.tcp_ip_size`, what the live
    # transport charges with tcp_ip_overhead): the model is given the MQTT bytes and adds its own headers
    size_has_headers: bool = True
    rng: np.random.Generator | None = None


class _Account:
    """The `FrameAccount` the model's packets charge: their bytes go to the frame's trace record. The first
    hop's time stays the live transport's to stamp (when paho sends the frame)."""

    __slots__ = ("record", "t_first_hop")

    def __init__(self, record: FrameRecord) -> None:
        self.record = record
        self.t_first_hop = 0.0

    @property
    def wire_bytes(self) -> int:
        return self.record.wire_bytes

    @wire_bytes.setter
    def wire_bytes(self, value: int) -> None:
        self.record.wire_bytes = value


def mqtt_bytes(wire_size: int) -> int:
    """The MQTT bytes of a message whose size on the wire `packets.tcp_ip_size` gave (its inverse)."""
    segments = max(1, math.ceil(wire_size / (TCP_MSS_BYTES + TCP_IPV4_HEADER_BYTES)))
    return max(1, wire_size - TCP_IPV4_HEADER_BYTES * segments)


def make_loss(kind: str, rng: np.random.Generator, **params: float) -> LossModel:
    """`none`, `bernoulli` (rate) or `gilbert_elliott` (p, r, loss_good, loss_bad)."""
    if kind in ("none", ""):
        return NoLoss()
    if kind == "bernoulli":
        return BernoulliLoss(float(params.get("rate", 0.0)), rng)
    if kind in ("gilbert_elliott", "gilbert-elliott", "ge"):
        return GilbertElliottLoss(
            float(params["p"]),
            float(params["r"]),
            float(params.get("loss_good", 0.0)),
            float(params.get("loss_bad", 1.0)),
            rng,
        )
    raise ValueError(f"unknown loss model {kind!r}; use none, bernoulli or gilbert_elliott")


class LinkShaper:
    """One camera's path to the broker in a live run. `submit(size, qos, send)` calls `send()` when the
    message arrives. `tcp`: model the path's loss as TCP repairs it (see the module docstring); None: the
    `udp` model, a lost message lost or resent by MQTT."""

    def __init__(
        self,
        env: simpy.Environment,
        rng: np.random.Generator,
        *,
        name: str = "shaper",
        rate_bytes_s: float | None = None,
        burst_bytes: float | None = None,
        delay_s: float = 0.0,
        jitter_s: float = 0.0,
        loss: LossModel | None = None,
        queue_limit: int | None = None,
        retry_interval_s: float = 1.0,
        max_retries: int | None = None,
        tcp: TcpPath | None = None,
    ) -> None:
        if delay_s < 0 or jitter_s < 0:
            raise ValueError("delay and jitter must not be negative")
        if retry_interval_s <= 0:
            raise ValueError("retry_interval_s must be above zero")
        if tcp is not None and burst_bytes is not None:
            raise ValueError(
                "the tcp model serialises each packet at the rate; a token bucket (burst_bytes) is udp only"
            )
        if tcp is not None and max_retries is not None:
            raise ValueError("max_retries applies to the udp model only: over TCP nothing is resent by MQTT")
        self.env = env
        self.name = name
        self.rng = rng
        self.rate_bytes_s = float(rate_bytes_s) if rate_bytes_s is not None else math.inf
        # udp: admits messages; tcp: the model's link serialises packets, and this only names the rate
        self.bucket: Serializer | TokenBucket | None = None
        if rate_bytes_s is not None:
            self.bucket = Serializer(rate_bytes_s) if burst_bytes is None else TokenBucket(rate_bytes_s, burst_bytes)
        self.delay_s = float(delay_s)
        self.jitter_s = float(jitter_s)
        self.loss: LossModel = loss if loss is not None else NoLoss()
        self.queue_limit = queue_limit
        self.retry_interval_s = float(retry_interval_s)
        self.max_retries = max_retries
        self._stats = ShaperStats()
        self._waiting: deque[float] = deque()  # departure times of admitted messages not yet departed
        self.tcp: TcpConnection | None = None
        self._links: tuple[LinkDirection, LinkDirection] | None = None
        self._size_has_headers = False
        if tcp is not None:
            self._open_tcp(tcp)

    @property
    def transport(self) -> str:
        return "udp" if self.tcp is None else "tcp"

    @property
    def stats(self) -> ShaperStats:
        stats = self._stats
        if self._links is not None and self.tcp is not None:
            up, back = self._links
            stats.bytes_admitted = up.stats.bytes_sent
            stats.dropped_queue_full = up.stats.dropped_queue_full
            stats.losses = up.stats.dropped_loss
            stats.ack_losses = back.stats.dropped_loss + back.stats.dropped_queue_full
            stats.max_backlog = up.transmitter.max_occupancy
            stats.tcp_retransmissions = self.tcp.a.stats.retransmissions
        return stats

    @property
    def tcp_stats(self) -> TcpStats | None:
        """The model's sender's counters (tcp mode), else None."""
        return self.tcp.a.stats if self.tcp is not None else None

    def _open_tcp(self, tcp: TcpPath) -> None:
        network = Network(self.env)
        network.add_node("node")
        network.add_node("broker")
        back_rng = tcp.rng if tcp.rng is not None else np.random.default_rng(int(self.rng.integers(2**63)))
        queue = self.queue_limit if self.queue_limit is not None else UNLIMITED_QUEUE
        back_queue = tcp.queue if tcp.queue is not None else UNLIMITED_QUEUE
        up = LinkDirection(
            self.name,
            "node",
            "broker",
            Transmitter(self.rate_bytes_s * 8, max(1, queue)),
            self.delay_s,
            self.jitter_s,
            self.loss,
            self.rng,
        )
        back_rate = tcp.rate_bytes_s if tcp.rate_bytes_s is not None else math.inf
        back = LinkDirection(
            f"{self.name} (back)",
            "broker",
            "node",
            Transmitter(back_rate * 8, max(1, back_queue)),
            tcp.delay_s,
            tcp.jitter_s,
            tcp.loss,
            back_rng,
        )
        network.add_link(up, back)
        network.drop_listeners.append(_charge_loss)
        self._links = (up, back)
        self._size_has_headers = tcp.size_has_headers
        self.tcp = TcpConnection(network, "node", "broker", on_message_b=self._arrived, settings=tcp.settings)
        self.tcp.open()  # the handshake gives the model its first RTT sample, as the kernel's does

    def delay(self) -> float:
        """One draw of propagation delay plus truncated normal jitter."""
        if self.jitter_s <= 0.0:
            return self.delay_s
        return max(0.0, self.delay_s + self.jitter_s * float(self.rng.standard_normal()))

    def backlog(self, now: float) -> int:
        waiting = self._waiting
        while waiting and waiting[0] <= now:
            waiting.popleft()
        return len(waiting)

    def submit(
        self, size_bytes: int, qos: int, send: Callable[[], None], record: FrameRecord | None = None, _attempt: int = 1
    ) -> bool:
        """Shape one message of `size_bytes` (its bytes on the wire). False if it is dropped at once."""
        if self.tcp is not None:
            self._stats.submitted += 1
            size = mqtt_bytes(size_bytes) if self._size_has_headers else max(1, size_bytes)
            self.tcp.a.send(send, size, _Account(record) if record is not None else None)
            return True
        env = self.env
        now = env.now
        stats = self._stats
        if _attempt == 1:
            stats.submitted += 1
        if self.queue_limit is not None and self.backlog(now) >= self.queue_limit:
            stats.dropped_queue_full += 1
            _note_drop(record, "queue_full", self.name)
            return False
        departure = self.bucket.departure(now, size_bytes) if self.bucket is not None else now
        if departure > now:
            self._waiting.append(departure)
            stats.max_backlog = max(stats.max_backlog, len(self._waiting))
        stats.bytes_admitted += size_bytes
        if record is not None:
            record.wire_bytes += size_bytes
        if self.loss.lost():
            stats.losses += 1
            _note_drop(record, "link_loss", self.name)
            if qos == 0:
                stats.dropped_loss += 1
                return False
            if self.max_retries is not None and _attempt > self.max_retries:
                stats.given_up += 1
                _note_drop(record, "max_retries", self.name)
                return False

            def retry(_: simpy.Event) -> None:
                stats.retransmissions += 1
                if record is not None:
                    record.retries += 1
                self.submit(size_bytes, qos, send, record, _attempt + 1)

            Timeout(env, departure - now + self.retry_interval_s).callbacks.append(retry)
            return True
        wait = departure - now + self.delay()
        if wait <= 0.0:
            stats.sent += 1
            send()
        else:
            Timeout(env, wait).callbacks.append(lambda _: self._deliver(send))
        return True

    def _deliver(self, send: Callable[[], None]) -> None:
        self._stats.sent += 1
        send()

    def _arrived(self, send: Callable[[], None]) -> None:
        """The model's receiving end has the whole message, in order: hand it to paho."""
        self._stats.sent += 1
        send()


def path_shaper(
    env: simpy.Environment,
    name: str,
    paths: NodePaths,
    rng: np.random.Generator,
    back_rng: np.random.Generator,
    *,
    transport: str,
    retry_interval_s: float = 1.0,
    max_retries: int | None = None,
    tcp_ip_overhead: bool = True,
    tcp_nodelay: bool = False,
    kernel_loss: bool = False,
) -> LinkShaper:
    """The shaper of what camera `name` publishes over its path to the broker (`paths.up`: bottleneck
    bandwidth, delay, jitter, loss, queue), for the scenario's `transport` (`tcp`: its loss through the TCP
    model, its ACKs over `paths.down`, Nagle off with `tcp_nodelay`). `kernel_loss`: the kernel applies the path's loss to real packets and
    real TCP repairs it (`iotbed emulate --netns` without netem), so this shaper only times messages
    (transmission, delay, jitter): it loses, queues out and models TCP for nothing."""
    up, down = paths.up, paths.down
    rate = up.rate_bytes_s if math.isfinite(up.rate_bytes_s) else None
    common: dict[str, Any] = dict(name=name, rate_bytes_s=rate, delay_s=up.delay_s, jitter_s=up.jitter_s)
    if kernel_loss:
        return LinkShaper(env, rng, **common)
    loss = same_loss(up.loss, rng)
    if transport == "udp":
        return LinkShaper(
            env,
            rng,
            **common,
            loss=loss,
            queue_limit=up.queue,
            retry_interval_s=retry_interval_s,
            max_retries=max_retries,
        )
    if transport != "tcp":
        raise ValueError(f"transport must be tcp or udp, not {transport!r}")
    nagle = not tcp_nodelay
    settings = (
        TcpSettings(nagle=nagle)
        if tcp_ip_overhead
        else TcpSettings(header_bytes=0, syn_bytes=0, sack_bytes=0, rst_bytes=0, nagle=nagle)
    )
    back = TcpPath(
        delay_s=down.delay_s,
        jitter_s=down.jitter_s,
        loss=same_loss(down.loss, back_rng),
        rate_bytes_s=down.rate_bytes_s if math.isfinite(down.rate_bytes_s) else None,
        queue=down.queue,
        settings=settings,
        size_has_headers=tcp_ip_overhead,
        rng=back_rng,
    )
    return LinkShaper(env, rng, **common, loss=loss, queue_limit=up.queue, tcp=back)


def _charge_loss(packet: Packet, reason: str, link: LinkDirection | None) -> None:
    """A packet of the model lost or queued out: counted on its frame, which TCP still delivers (as the
    simulator's recorder counts a lost segment)."""
    account = packet.frame
    if isinstance(account, _Account):
        account.record.losses += 1


def _note_drop(record: FrameRecord | None, reason: str, link: str) -> None:
    """Charge a frame's trace record like the simulated network does (`TraceRecorder.on_packet_dropped`)."""
    if record is None:
        return
    if reason in ("queue_full", "link_loss"):
        record.losses += 1
    record.drop_reason = reason
    record.drop_link = link
