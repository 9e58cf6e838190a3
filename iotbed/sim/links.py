"""Links: serialisation at a bandwidth, a drop-tail queue, propagation delay, jitter and loss.

A link direction does not need a SimPy process: with a FIFO queue the departure time of a packet follows
from the previous one (Lindley's recursion), so sending a packet costs one scheduled event (its arrival at
the far end) and a few arithmetic operations. That keeps thousands of cameras cheap to simulate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class LossModel(Protocol):
    def lost(self) -> bool: ...


class NoLoss:
    def lost(self) -> bool:
        return False


class BernoulliLoss:
    """Each packet is lost independently with probability `rate`."""

    def __init__(self, rate: float, rng: np.random.Generator) -> None:
        self.rate = rate
        self._rng = rng

    def lost(self) -> bool:
        return self._rng.random() < self.rate


class GilbertElliottLoss:
    """Two-state burst loss: Good -> Bad with probability p, Bad -> Good with r, per packet.

    In each state a packet is lost with `loss_good` or `loss_bad`. The stationary loss rate is
    (r * loss_good + p * loss_bad) / (p + r).
    """

    def __init__(self, p: float, r: float, loss_good: float, loss_bad: float, rng: np.random.Generator) -> None:
        self.p, self.r, self.loss_good, self.loss_bad = p, r, loss_good, loss_bad
        self._rng = rng
        self.bad = False

    def lost(self) -> bool:
        u_switch, u_loss = self._rng.random(2)
        if self.bad:
            self.bad = u_switch >= self.r
        else:
            self.bad = u_switch < self.p
        return u_loss < (self.loss_bad if self.bad else self.loss_good)

    @property
    def mean_loss(self) -> float:
        return (self.r * self.loss_good + self.p * self.loss_bad) / (self.p + self.r)


@dataclass(slots=True)
class Transmitter:
    """The serialising resource of one link direction, or of a shared medium that several directions use."""

    bandwidth_bps: float
    capacity: int  # packets in the system (queued plus the one being sent); drop-tail beyond it
    busy_until: float = 0.0
    departures: deque[float] = field(default_factory=deque)
    busy_time: float = 0.0
    max_occupancy: int = 0

    def occupancy(self, now: float) -> int:
        departures = self.departures
        while departures and departures[0] <= now:
            departures.popleft()
        return len(departures)

    def admit(self, now: float, size_bytes: int) -> float | None:
        """Queue a packet; its departure time, or None if the queue is full."""
        departures = self.departures
        while departures and departures[0] <= now:  # inline `occupancy`: this runs for every packet
            departures.popleft()
        occupancy = len(departures)
        if occupancy >= self.capacity:
            return None
        tx = size_bytes * 8.0 / self.bandwidth_bps
        start = now if now > self.busy_until else self.busy_until
        end = start + tx
        self.busy_until = end
        departures.append(end)
        self.busy_time += tx
        if occupancy + 1 > self.max_occupancy:
            self.max_occupancy = occupancy + 1
        return end


@dataclass(slots=True)
class LinkStats:
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_delivered: int = 0
    dropped_queue_full: int = 0
    dropped_loss: int = 0


@dataclass(slots=True)
class LinkDirection:
    """One direction of a link, from node `src` to node `dst`."""

    name: str
    src: str
    dst: str
    transmitter: Transmitter
    latency_s: float
    jitter_s: float
    loss: LossModel
    rng: np.random.Generator
    stats: LinkStats = field(default_factory=LinkStats)
    # Hooks that see every packet this direction delivers, in order: attackers in the path, then observers.
    taps: list[Callable[[Any], None]] = field(default_factory=list)

    def delay_after_departure(self) -> float:
        """Propagation delay plus jitter (normal, truncated so that a packet never arrives early)."""
        if self.jitter_s <= 0.0:
            return self.latency_s
        return max(0.0, self.latency_s + self.jitter_s * float(self.rng.standard_normal()))
