"""Which clock a node's timestamps come from.

Nodes schedule with `env.now`. What they record in the trace (capture, arrival, inference start and end,
model events) comes from `wall_clock(env)`: simulated time in a simulation, and the wall clock in a
live run (`WallClockEnvironment`), so that a process running behind the wall clock does not pass late
events off as on-time ones, and timestamps taken in different worker processes subtract.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic

import simpy
import simpy.rt


class WallClockEnvironment(simpy.rt.RealtimeEnvironment):
    """A realtime environment that can also say what time it really is, in its own time units."""

    def wall_now(self) -> float:
        return self.env_start + (monotonic() - self.real_start) / self.factor


def wall_clock(env: simpy.Environment) -> Callable[[], float] | None:
    """The wall clock of a live run's environment, or None in a simulation; nodes record
    `env.now if wall is None else wall()`, which costs a simulation no call."""
    return getattr(env, "wall_now", None)


def recording_clock(env: simpy.Environment) -> Callable[[], float]:
    """What a node stamps its records with: the wall clock live, simulated time in a simulation. For nodes
    off the per-frame path; a per-frame path keeps `wall_clock` and its inline test, which costs no call."""
    wall = wall_clock(env)
    return wall if wall is not None else (lambda: env.now)
