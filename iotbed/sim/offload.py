"""Where a node's heavy computation runs (a STRIP screen, a CoDefend repair).

Node code asks `offload(fn)` for an event whose value is `fn()`. In a simulation `fn` runs at once and the
event is already triggered: the node then charges the device's modelled time with a timeout, as for any
compute. In a live run `fn` runs on a thread of its own and the event fires, on the SimPy thread, when it
finishes, so a gateway screening or an edge repairing for a minute of wall time does not stop the
frames it handles meanwhile (torch releases the interpreter lock while it computes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import simpy

Offload = Callable[[Callable[[], Any]], simpy.Event]


class Poster(Protocol):
    def post(self, fn: Callable[..., None], *args: Any) -> None: ...


def inline(env: simpy.Environment) -> Offload:
    """Run at once, on the simulation's clock: the event is triggered before it is returned."""

    def offload(fn: Callable[[], Any]) -> simpy.Event:
        event = env.event()
        event.succeed(fn())
        return event

    return offload


class ThreadOffload:
    """Runs work on daemon threads; the result (or the exception) comes back through `bridge` to the SimPy
    thread. `finish` waits for work still running when a run ends: a thread left inside torch when the
    interpreter exits aborts the process."""

    def __init__(self, env: simpy.Environment, bridge: Poster) -> None:
        self.env = env
        self.bridge = bridge
        self._threads: list[threading.Thread] = []

    def __call__(self, fn: Callable[[], Any]) -> simpy.Event:
        event = self.env.event()
        bridge = self.bridge

        def work() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the node, which fails as it would in a simulation
                bridge.post(event.fail, exc)
                return
            bridge.post(event.succeed, result)

        thread = threading.Thread(target=work, name="iotbed-offload", daemon=True)
        self._threads.append(thread)
        thread.start()
        return event

    def running(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def finish(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` in all for the work still running; how many are still running after it."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self.running()
