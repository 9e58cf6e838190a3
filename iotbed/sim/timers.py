"""Many timers of one fixed length, as one FIFO and at most one pending SimPy event per tick.

Every QoS 1/2 message arms a retransmission timer that almost never fires (the acknowledgement comes
first). Giving each its own SimPy event would double the event count of a run; since all timers of a
session have the same length, their deadlines arrive in order, so a FIFO checked once per tick holds them
all. A timer fires at the first tick at or after its deadline, never early, at most one tick late (like a
client that checks for retries in its network loop).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import simpy
from simpy.events import Timeout


class FifoTimers:
    def __init__(self, env: simpy.Environment, delay: float, tick: float) -> None:
        if delay <= 0 or tick <= 0:
            raise ValueError("timer delay and tick must be above zero")
        self.env = env
        self.delay = delay
        self.tick = tick
        self._queue: deque[tuple[float, Callable[[Any], None], Any]] = deque()
        self._wake_pending = False

    def start(self, callback: Callable[[Any], None], arg: Any) -> None:
        """Call `callback(arg)` once `delay` has passed."""
        deadline = self.env.now + self.delay
        self._queue.append((deadline, callback, arg))
        if not self._wake_pending:
            self._schedule(deadline)

    def _schedule(self, deadline: float) -> None:
        wake = max(math.ceil(deadline / self.tick - 1e-9) * self.tick, deadline)
        self._wake_pending = True
        Timeout(self.env, wake - self.env.now).callbacks.append(self._fire)

    def _fire(self, _: simpy.Event) -> None:
        now = self.env.now
        queue = self._queue
        # The wake stays pending while the callbacks run: one that re-arms only appends (its deadline is the
        # latest), and the next wake is booked below for the earliest deadline left, not for the re-armed one.
        while queue and queue[0][0] <= now:
            _, callback, arg = queue.popleft()
            callback(arg)
        self._wake_pending = False
        if queue:
            self._schedule(queue[0][0])
