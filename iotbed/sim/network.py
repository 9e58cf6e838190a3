"""The simulated network: nodes joined by link directions, shortest-path routing, store-and-forward.

A packet is routed once when it is sent (the route is cached per node pair) and then hops link by link;
each hop is one scheduled SimPy event. Endpoints (an MQTT client or broker) live on nodes and receive
the packets addressed to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import networkx as nx
import simpy
from simpy.events import Timeout

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
        if not packet.route:  # same node: handed over at once, as over a loopback socket
            receiver.receive(packet)
            return
        self._transmit(packet)

    def _transmit(self, packet: Packet) -> None:
        link = packet.route[packet.hop]
        stats = link.stats
        now = self.env._now
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
        Timeout(self.env, departure + delay - now, packet).callbacks.append(self._arrive)

    def _arrive(self, event: simpy.Event) -> None:
        packet: Packet = event._value
        link = packet.route[packet.hop]
        link.stats.packets_delivered += 1
        if link.taps:
            for tap in link.taps:
                tap(packet)
        packet.hop += 1
        if packet.hop == 1 and packet.frame is not None and packet.frame.t_first_hop < 0:
            packet.frame.t_first_hop = self.env.now
        if packet.hop < len(packet.route):
            self._transmit(packet)
        else:
            packet.receiver.receive(packet)

    def drop(self, packet: Packet, reason: str, link: LinkDirection | None) -> None:
        """A packet is gone (a full queue, a lost transmission, a receiver that is down): tell the listeners."""
        for listener in self.drop_listeners:
            listener(packet, reason, link)
