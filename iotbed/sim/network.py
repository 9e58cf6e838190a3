"""The simulated network: nodes joined by link directions, shortest-path routing, store-and-forward.

A packet is routed once when it is sent (the route is cached per node pair) and then hops link by link;
each hop is one scheduled SimPy event. Endpoints (an MQTT client or broker) live on nodes and receive
the packets addressed to them.

The packet is its own SimPy event for each hop (it has the `callbacks` and `_ok` that SimPy's loop reads),
pushed onto the environment's queue as `Timeout` would push it: a `Timeout` object per hop costs more than
the rest of the hop. `schedule` does the same for any other callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from heapq import heappush
from typing import Any, Protocol

import networkx as nx
import simpy

from iotbed.sim.links import LinkDirection


class Endpoint(Protocol):
    node: str

    def receive(self, packet: Packet) -> None: ...


class FrameAccount(Protocol):
    """What the network updates on a frame's trace record while packets about it travel."""

    wire_bytes: int
    t_first_hop: float


@dataclass(slots=True)
class Packet:
    sender: Endpoint
    receiver: Endpoint
    size: int  # bytes on the wire
    message: Any
    frame: FrameAccount | None = None
    route: tuple[LinkDirection, ...] = ()
    hop: int = 0
    # As a SimPy event on its way over a hop: what to call on arrival (SimPy sets it to None as it does).
    callbacks: Any = field(default=None, init=False, repr=False, compare=False)
    _ok: bool = field(default=True, init=False, repr=False, compare=False)


class Wake:
    """A bare SimPy event that calls `callbacks` with itself when due; `_value` is the caller's."""

    __slots__ = ("callbacks", "_ok", "_value")

    def __init__(self, callbacks: Any, value: Any) -> None:
        self.callbacks = callbacks
        self._ok = True
        self._value = value


def schedule(env: simpy.Environment, delay: float, callbacks: Any, value: Any) -> None:
    """Call each of `callbacks` (a tuple or list) with a `Wake` holding `value` after `delay`, exactly as
    `Timeout(env, delay, value).callbacks` would be (same time, same order among events), more cheaply."""
    heappush(env._queue, (env._now + delay, 1, next(env._eid), Wake(callbacks, value)))  # type: ignore[attr-defined]


DropListener = Callable[[Packet, str, LinkDirection | None], None]


class NoRouteError(RuntimeError):
    pass


class Network:
    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.graph: nx.Graph = nx.Graph()
        self.directions: dict[tuple[str, str], LinkDirection] = {}
        self._routes: dict[tuple[str, str], tuple[LinkDirection, ...]] = {}
        self.drop_listeners: list[DropListener] = []
        self.tcp_timers: Any = None  # the timers of the TCP connections over this network (iotbed.sim.tcp)
        self._on_arrival = (self._arrive,)  # a packet's callbacks for every hop (SimPy only iterates them)

    def add_node(self, name: str) -> None:
        self.graph.add_node(name)

    def add_link(self, forward: LinkDirection, backward: LinkDirection) -> None:
        self.graph.add_edge(forward.src, forward.dst)
        self.directions[(forward.src, forward.dst)] = forward
        self.directions[(backward.src, backward.dst)] = backward

    def route(self, src: str, dst: str) -> tuple[LinkDirection, ...]:
        key = (src, dst)
        route = self._routes.get(key)
        if route is None:
            try:
                path = nx.shortest_path(self.graph, src, dst)
            except (nx.NetworkXNoPath, nx.NodeNotFound) as exc:
                raise NoRouteError(f"no route from {src} to {dst}") from exc
            route = tuple(self.directions[(a, b)] for a, b in zip(path, path[1:]))
            self._routes[key] = route
        return route

    def send(
        self, sender: Endpoint, receiver: Endpoint, size: int, message: Any, frame: FrameAccount | None = None
    ) -> None:
        route = self._routes.get((sender.node, receiver.node))
        if route is None:
            route = self.route(sender.node, receiver.node)
        packet = Packet(sender, receiver, size, message, frame, route)
        if not route:  # same node: handed over at once, as over a loopback socket
            receiver.receive(packet)
            return
        self.transmit(packet)

    def transmit(self, packet: Packet) -> None:
        """Offer `packet` to the link of its current hop (its route is set and not finished)."""
        link = packet.route[packet.hop]
        stats = link.stats
        env = self.env
        now = env._now
        size = packet.size
        stats.packets_sent += 1
        departure = link.transmitter.admit(now, size)
        if departure is None:
            stats.dropped_queue_full += 1
            self.drop(packet, "queue_full", link)
            return
        stats.bytes_sent += size
        frame = packet.frame
        if frame is not None:
            frame.wire_bytes += size
        if link.loss.lost():
            stats.dropped_loss += 1
            self.drop(packet, "link_loss", link)
            return
        delay = link.latency_s if link.jitter_s <= 0.0 else link.delay_after_departure()
        packet.callbacks = self._on_arrival
        # Timeout(env, departure + delay - now) would fire at now + that: the same sum, the same float.
        heappush(env._queue, (now + (departure + delay - now), 1, next(env._eid), packet))  # type: ignore[attr-defined]

    def _arrive(self, packet: Packet) -> None:
        link = packet.route[packet.hop]
        link.stats.packets_delivered += 1
        if link.taps:
            for tap in link.taps:
                tap(packet)
        hop = packet.hop = packet.hop + 1
        if hop == 1:
            frame = packet.frame
            if frame is not None and frame.t_first_hop < 0:
                frame.t_first_hop = self.env._now
        if hop < len(packet.route):
            self.transmit(packet)
        else:
            packet.receiver.receive(packet)

    def drop(self, packet: Packet, reason: str, link: LinkDirection | None) -> None:
        """A packet is gone (a full queue, a lost transmission, a receiver that is down): tell the listeners."""
        for listener in self.drop_listeners:
            listener(packet, reason, link)
