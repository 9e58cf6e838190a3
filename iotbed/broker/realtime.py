"""The realtime bridge: SimPy work posted from other threads, and how far the clock lags.

`RealtimeBridge` runs work posted from any thread (paho's network threads) on the SimPy thread of a
`simpy.rt.RealtimeEnvironment`, polled every `poll_s`; `LagMeter` is the histogram of its lag behind the
wall clock; `wait_for` is an event that fires once a condition holds, for tests and run loops.

Clock: the environment runs in wall-clock time as long as it keeps up. The bridge's poller measures, at
every poll, how far the environment is behind the wall clock (`RealtimeBridge.lag`): a run whose
events fell behind is visible as such instead of passing off late sends as on-time ones.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import simpy
import simpy.rt

DEFAULT_POLL_S = 0.0005  # how often the bridge hands paho's messages to the SimPy thread


class LagMeter:
    """How far a realtime environment runs behind the wall clock, sampled at each poll: a histogram in
    0.1-ms bins up to 1 s (one more bin above), so percentiles cost nothing per sample."""

    BIN_S = 1e-4
    BINS = 10_001

    def __init__(self) -> None:
        self.counts = [0] * self.BINS
        self.samples = 0
        self.max_s = 0.0

    def add(self, lag_s: float) -> None:
        if lag_s < 0.0:
            lag_s = 0.0
        self.counts[min(self.BINS - 1, int(lag_s / self.BIN_S))] += 1
        self.samples += 1
        if lag_s > self.max_s:
            self.max_s = lag_s

    def merge(self, other: LagMeter) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.samples += other.samples
        self.max_s = max(self.max_s, other.max_s)

    def percentile_ms(self, q: float) -> float | None:
        """The upper edge of the bin holding the q-th percentile (q in 0-100), in ms; None without samples."""
        if not self.samples:
            return None
        rank = q / 100.0 * self.samples
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return round(min((i + 1) * self.BIN_S, self.max_s) * 1e3, 4)
        return self.max_s * 1e3

    def report(self) -> dict[str, float | int | None]:
        return {
            "samples": self.samples,
            "p50_ms": self.percentile_ms(50),
            "p99_ms": self.percentile_ms(99),
            "max_ms": self.max_s * 1e3 if self.samples else None,
        }


class RealtimeBridge:
    """Runs work posted from any thread on the SimPy thread, polled every `poll_s` of simulated (= real) time.

    One bridge can serve many transports on the same environment (one poller instead of one per client).
    Each poll also measures the environment's lag behind the wall clock (`lag`)."""

    def __init__(self, env: simpy.Environment, poll_s: float = DEFAULT_POLL_S) -> None:
        if not isinstance(env, simpy.rt.RealtimeEnvironment):
            raise TypeError(
                "MqttTransport needs a simpy.rt.RealtimeEnvironment (use RealtimeEnvironment("
                "factor=1, strict=False)); in a plain Environment simulated time does not wait for "
                "the broker"
            )
        if poll_s <= 0:
            raise ValueError("poll_s must be above zero")
        self.env = env
        self.poll_s = poll_s
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.SimpleQueue()
        self._users = 0
        self._running = False
        self.sim_thread: int | None = None
        self.lag = LagMeter()

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Any thread: run `fn(*args)` on the SimPy thread at the next poll."""
        self._queue.put((fn, args))

    def drain(self) -> int:
        """SimPy thread: run everything posted so far."""
        n = 0
        get = self._queue.get_nowait
        while True:
            try:
                fn, args = get()
            except queue.Empty:
                return n
            fn(*args)
            n += 1

    def attach(self) -> None:
        self._users += 1
        if not self._running:
            self._running = True
            self.env.process(self._poll())

    def detach(self) -> None:
        self._users = max(0, self._users - 1)

    def _poll(self) -> Any:
        self.sim_thread = threading.get_ident()
        env = self.env
        lag, clock = self.lag, time.monotonic
        try:
            while self._users > 0:
                # the wall-clock instant this event was due at, against now
                lag.add(clock() - env.real_start - (env.now - env.env_start) * env.factor)  # type: ignore[attr-defined]
                self.drain()
                yield env.timeout(self.poll_s)
            self.drain()
        finally:
            self._running = False


def wait_for(
    env: simpy.Environment,
    predicate: Callable[[], bool],
    timeout_s: float,
    poll_s: float = 0.005,
    what: str = "condition",
) -> simpy.Event:
    """An event that succeeds once `predicate()` holds, checked every `poll_s`, or fails with TimeoutError
    after `timeout_s`. For tests and run loops: `env.run(until=wait_for(env, lambda: n >= 10, 5.0))`."""

    def watch() -> Any:
        deadline = env.now + timeout_s
        while not predicate():
            if env.now >= deadline:
                raise TimeoutError(f"{what} did not hold within {timeout_s} s")
            yield env.timeout(poll_s)

    return env.process(watch())
