"""An in-process link shaper for live runs: what a node sends waits here before the real paho publish.

The real broker sits on loopback, which has no bandwidth limit, delay or loss worth speaking of. So a node's
outgoing messages pass through a `LinkShaper` first, which models its uplink the way `iotbed.sim.links`
models a simulated link, and hands each message to paho when it would have arrived:

1. admission: by default the link serialises, as a simulated link does: messages leave in FIFO order and each
   occupies the link for size / rate, so a message is delayed by its own transmission time and by the ones
   ahead of it (`Serializer`). With `burst_bytes`, a token bucket of that depth decides instead: a message
   waits until the bucket holds min(size, burst) tokens, then takes `size` tokens (the bucket may go
   negative, so a message bigger than the bucket still passes, at the mean rate), so bursts pass at once.
   With `queue_limit`, a message that finds that many messages waiting is dropped (drop-tail, "queue_full").
2. loss, drawn after admission (a lost message still used the link), from any `LossModel` of
   `iotbed.sim.links` (`BernoulliLoss`, `GilbertElliottLoss`). A lost QoS 0 message is gone ("link_loss");
   a lost QoS 1/2 message is sent again `retry_interval_s` later through the shaper, as the simulated MQTT
   sender retransmits, until it gets through (or `max_retries` is reached: "max_retries").
3. delay: propagation `delay_s` plus `jitter_s` * N(0, 1), truncated at zero (the distribution
   `LinkDirection.delay_after_departure` uses in simulation; like there, jitter may reorder messages).

Everything is SimPy timeouts on the environment the node runs on (a `simpy.rt.RealtimeEnvironment` in
emulation), so the only real-time effect is that `send()` runs later. The shaper is deterministic given its
`numpy.random.Generator` (and the loss model's): the same seed gives the same departure times, delays and
losses. It works on any SimPy environment, which is how it is unit-tested without waiting.

Shaping real packets in the kernel instead is `iotbed.emulation.netns` (`iotbed emulate --netns`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import simpy
from simpy.events import Timeout

from iotbed.sim.links import BernoulliLoss, GilbertElliottLoss, LossModel, NoLoss

if TYPE_CHECKING:
    from iotbed.sim.trace import FrameRecord

__all__ = ["LinkShaper", "Serializer", "ShaperStats", "TokenBucket", "make_loss", "BernoulliLoss", "GilbertElliottLoss"]


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
    submitted: int = 0
    sent: int = 0
    bytes_admitted: int = 0
    dropped_queue_full: int = 0
    dropped_loss: int = 0  # QoS 0 messages lost for good
    losses: int = 0  # every loss draw that hit, including QoS 1/2 ones that were sent again
    retransmissions: int = 0
    given_up: int = 0
    max_backlog: int = 0


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
    """One node's uplink in a live run. `submit(size, qos, send)` calls `send()` when the message arrives."""

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
    ) -> None:
        if delay_s < 0 or jitter_s < 0:
            raise ValueError("delay and jitter must not be negative")
        if retry_interval_s <= 0:
            raise ValueError("retry_interval_s must be above zero")
        self.env = env
        self.name = name
        self.rng = rng
        self.bucket: Serializer | TokenBucket | None = None
        if rate_bytes_s is not None:
            self.bucket = Serializer(rate_bytes_s) if burst_bytes is None else TokenBucket(rate_bytes_s, burst_bytes)
        self.delay_s = float(delay_s)
        self.jitter_s = float(jitter_s)
        self.loss: LossModel = loss if loss is not None else NoLoss()
        self.queue_limit = queue_limit
        self.retry_interval_s = float(retry_interval_s)
        self.max_retries = max_retries
        self.stats = ShaperStats()
        self._waiting: deque[float] = deque()  # departure times of admitted messages not yet departed

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
        env = self.env
        now = env.now
        stats = self.stats
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
        self.stats.sent += 1
        send()


def _note_drop(record: FrameRecord | None, reason: str, link: str) -> None:
    """Charge a frame's trace record like the simulated network does (`TraceRecorder.on_packet_dropped`)."""
    if record is None:
        return
    if reason in ("queue_full", "link_loss"):
        record.losses += 1
    record.drop_reason = reason
    record.drop_link = link
