"""A scenario's network: its nodes, the links between them (one `LinkGroup` per `links:` entry), and a
monitor that samples the links. Simulations run packets over it; live runs read each node's path off it
and which cameras each gateway relays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from iotbed.naming import group_nodes, node_name
from iotbed.scenario import LinkSpec, Scenario
from iotbed.sim.links import BernoulliLoss, GilbertElliottLoss, LinkDirection, LossModel, NoLoss, Transmitter
from iotbed.sim.network import Network
from iotbed.sim.rng import RandomStreams


@dataclass
class LinkGroup:
    """The link directions made from one `links:` entry, one list per direction (a->b and b->a)."""

    name: str
    directions: dict[str, list[LinkDirection]] = field(default_factory=dict)


@dataclass
class LinkMonitor:
    """Samples every link group's queues and throughput at a fixed simulated interval (one event per sample)."""

    env: simpy.Environment
    groups: list[LinkGroup]
    interval_s: float
    rows: list[dict[str, float | str | int]] = field(default_factory=list)

    def run(self):  # type: ignore[no-untyped-def]
        last_bytes: dict[str, int] = {}
        while True:
            yield self.env.timeout(self.interval_s)
            now = self.env.now
            for group in self.groups:
                for key, directions in group.directions.items():
                    occupancy = [d.transmitter.occupancy(now) for d in directions]
                    sent = sum(d.stats.bytes_sent for d in directions)
                    delta = sent - last_bytes.get(key, 0)
                    last_bytes[key] = sent
                    self.rows.append(
                        {
                            "time_s": now,
                            "link_group": key,
                            "queue_mean_packets": sum(occupancy) / len(occupancy),
                            "queue_max_packets": max(occupancy),
                            "throughput_mbps": delta * 8 / self.interval_s / 1e6,
                            "throughput_per_link_mbps": delta * 8 / self.interval_s / 1e6 / len(directions),
                        }
                    )


def _loss_model(spec: LinkSpec, rng: np.random.Generator) -> LossModel:
    loss = spec.loss
    if loss is None:
        return NoLoss()
    if loss.model == "bernoulli":
        return BernoulliLoss(loss.rate, rng) if loss.rate > 0 else NoLoss()
    return GilbertElliottLoss(loss.p, loss.r, loss.loss_good, loss.loss_bad, rng)


def _pairs(spec: LinkSpec, counts: dict[str, int]) -> list[tuple[str, str]]:
    """Each node of the larger group joins one node of the other group, round robin; (a-node, b-node)."""
    a, b = spec.between
    na, nb = counts[a], counts[b]
    if na >= nb:
        return [(node_name(a, i), node_name(b, i % nb)) for i in range(na)]
    return [(node_name(a, j % na), node_name(b, j)) for j in range(nb)]


def add_nodes(network: Network, scenario: Scenario) -> None:
    for group, count in scenario.group_counts().items():
        for node in group_nodes(group, count):
            network.add_node(node)


def add_links(network: Network, scenario: Scenario, streams: RandomStreams) -> list[LinkGroup]:
    counts = scenario.group_counts()
    groups = []
    for spec in scenario.links:
        a, b = spec.between
        group = LinkGroup(f"{a}<->{b}", {f"{a}->{b}": [], f"{b}->{a}": []})
        pairs = _pairs(spec, counts)
        hub_side = 1 if counts[a] >= counts[b] else 0  # the side of the smaller group
        shared: dict[str, Transmitter] = {}
        for a_node, b_node in pairs:
            hub = (a_node, b_node)[hub_side]
            for src, dst, key in ((a_node, b_node, f"{a}->{b}"), (b_node, a_node, f"{b}->{a}")):
                if spec.shared_medium:
                    transmitter = shared.setdefault(hub, Transmitter(spec.bandwidth, spec.queue))
                else:
                    transmitter = Transmitter(spec.bandwidth, spec.queue)
                name = f"{src}->{dst}"
                rng = streams.generator("link", name)
                direction = LinkDirection(
                    name, src, dst, transmitter, spec.latency, spec.jitter, _loss_model(spec, rng), rng
                )
                group.directions[key].append(direction)
            network.add_link(group.directions[f"{a}->{b}"][-1], group.directions[f"{b}->{a}"][-1])
        groups.append(group)
    return groups


def build_topology(scenario: Scenario, env: simpy.Environment | None = None) -> tuple[Network, list[LinkGroup]]:
    """The scenario's nodes and links on a network (a fresh environment unless one is given)."""
    network = Network(env if env is not None else simpy.Environment())
    add_nodes(network, scenario)
    return network, add_links(network, scenario, RandomStreams(scenario.seed))


def relayed_cameras(network: Network, scenario: Scenario) -> dict[str, list[str]]:
    """Gateway node -> the camera nodes whose packets to the broker cross it."""
    broker = scenario.resolve_node(scenario.broker.node)
    assert broker is not None  # checked by the scenario validator
    gateways = {n for g in scenario.nodes.gateways for n in group_nodes(g.name, g.count)}
    relayed: dict[str, list[str]] = {g: [] for g in sorted(gateways)}
    for group in scenario.nodes.cameras:
        for camera in group_nodes(group.name, group.count):
            for direction in network.route(camera, broker):
                if direction.dst in gateways:
                    relayed[direction.dst].append(camera)
    return relayed
