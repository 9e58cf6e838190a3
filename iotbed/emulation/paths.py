"""Each live node's path to the broker and back, read off the simulated topology.

A live run has no gateways or routers in between: every client talks to the broker directly. So each node
gets the path the simulator would route its packets over, collapsed into one shaped hop: the bottleneck
bandwidth, the sum of propagation delays, the root-sum-square of the jitters, the loss model of the first
lossy link, and the smallest queue. Where the bottleneck is a shared medium (Wi-Fi-like: several nodes on
one channel), the nodes that share it are named by the same `medium` key, so kernel shaping can give them
one channel to share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import simpy

from iotbed.naming import group_of
from iotbed.scenario import AttackSpec, Scenario
from iotbed.sim.links import BernoulliLoss, GilbertElliottLoss, LinkDirection, LossModel, NoLoss
from iotbed.sim.network import Network
from iotbed.sim.rng import RandomStreams
from iotbed.sim.topology import add_links, add_nodes


@dataclass(frozen=True)
class PathShape:
    rate_bytes_s: float  # math.inf: no bandwidth limit on the path
    delay_s: float
    jitter_s: float
    loss: LossModel  # the first lossy link's model (NoLoss on a clean path)
    queue: int  # packets
    medium: str = ""  # the bottleneck's transmitter, when several paths share it; "" otherwise

    @property
    def shaped(self) -> bool:
        return (
            math.isfinite(self.rate_bytes_s)
            or self.delay_s > 0
            or self.jitter_s > 0
            or not isinstance(self.loss, NoLoss)
        )


def path_shape(route: tuple[LinkDirection, ...], media: dict[int, str] | None = None) -> PathShape:
    """`media`: transmitter id -> name, for transmitters more than one node's path meets."""
    lossy = [d for d in route if not isinstance(d.loss, NoLoss)]
    bottleneck = min(route, key=lambda d: d.transmitter.bandwidth_bps, default=None)
    return PathShape(
        rate_bytes_s=bottleneck.transmitter.bandwidth_bps / 8 if bottleneck is not None else math.inf,
        delay_s=sum(d.latency_s for d in route),
        jitter_s=math.sqrt(sum(d.jitter_s**2 for d in route)),
        loss=lossy[0].loss if lossy else NoLoss(),
        queue=min((d.transmitter.capacity for d in route), default=10_000),
        medium=(media or {}).get(id(bottleneck.transmitter), "") if bottleneck is not None else "",
    )


def same_loss(model: LossModel, rng: np.random.Generator) -> LossModel:
    """The link's loss model with the same parameters, drawing from another stream."""
    if isinstance(model, BernoulliLoss):
        return BernoulliLoss(model.rate, rng)
    if isinstance(model, GilbertElliottLoss):
        return GilbertElliottLoss(model.p, model.r, model.loss_good, model.loss_bad, rng)
    return NoLoss()


@dataclass(frozen=True)
class NodePaths:
    up: PathShape  # node -> broker
    down: PathShape  # broker -> node


def node_paths(scenario: Scenario, nodes: list[str]) -> dict[str, NodePaths]:
    """Each of `nodes`' paths to and from the broker's node in the scenario's topology."""
    topology = Network(simpy.Environment())
    add_nodes(topology, scenario)
    add_links(topology, scenario, RandomStreams(scenario.seed))
    broker = scenario.resolve_node(scenario.broker.node)
    assert broker is not None
    routes = {n: (topology.route(n, broker), topology.route(broker, n)) for n in nodes}
    meets: dict[int, set[str]] = {}
    for n, (up, down) in routes.items():
        for d in (*up, *down):
            meets.setdefault(id(d.transmitter), set()).add(n)
    media: dict[int, str] = {}
    for direction in topology.directions.values():
        key = id(direction.transmitter)
        if len(meets.get(key, ())) > 1:
            # a link several nodes' paths cross; a shared medium (one transmitter, many directions) is
            # named after the node all its links meet at
            media[key] = direction.name if key not in media else f"medium@{_common_end(media[key], direction)}"
    return {n: NodePaths(path_shape(up, media), path_shape(down, media)) for n, (up, down) in routes.items()}


def _common_end(name: str, direction: LinkDirection) -> str:
    if name.startswith("medium@"):
        return name.removeprefix("medium@")
    src, _, dst = name.partition("->")
    return direction.src if direction.src in (src, dst) else direction.dst


def nodes_behind(scenario: Scenario, nodes: list[str], spec: AttackSpec) -> list[str]:
    """Of `nodes`, those whose packets to the broker cross the link a `mitm` attack sits on (the same links
    the simulated attacker taps: a group name at an end takes all of its links, a node name one)."""
    topology = Network(simpy.Environment())
    add_nodes(topology, scenario)
    add_links(topology, scenario, RandomStreams(scenario.seed))
    broker = scenario.resolve_node(scenario.broker.node)
    assert broker is not None and spec.link is not None
    src_group, dst_group = scenario.attack_link_groups(spec)
    src_end, dst_end = spec.link

    def attacked(d: LinkDirection) -> bool:
        return (
            group_of(d.src) == src_group
            and group_of(d.dst) == dst_group
            and src_end in (src_group, d.src)
            and dst_end in (dst_group, d.dst)
        )

    return [n for n in nodes if any(attacked(d) for d in topology.route(n, broker))]
