"""Build a runnable deployment from a scenario: nodes, links, the broker, and the node logic on each node.

The deployment only wires things together; behaviour lives in `iotbed.sim`, `iotbed.broker` and
`iotbed.nodes`. Nothing here is global: two deployments in one process share no state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy
import torch
from torch import nn

from iotbed.attacks.network import AttackWindow, ManInTheMiddle
from iotbed.broker.sim_mqtt import MqttSettings, SimBroker, SimMqttClient
from iotbed.codecs.pixel_drop import PixelDropCodec
from iotbed.defenses.pipeline import build_chain
from iotbed.nodes.camera import Camera, CameraConfig
from iotbed.nodes.classifier import EdgeClassifier
from iotbed.nodes.edge_server import EdgeConfig, EdgeServer
from iotbed.nodes.gateway import ScreeningGateway, ScreenSettings
from iotbed.nodes.registry import ModelRegistry, ScheduledUpdate
from iotbed.nodes.repair import CoDefendRepairer
from iotbed.scenario import AttackSpec, CameraGroup, EdgeServerGroup, FaultSpec, LinkSpec, Scenario
from iotbed.sim.devices import BUILTIN_PROFILES, DeviceProfile
from iotbed.sim.links import BernoulliLoss, GilbertElliottLoss, LinkDirection, LossModel, NoLoss, Transmitter
from iotbed.sim.network import Network
from iotbed.sim.rng import RandomStreams
from iotbed.sim.trace import TraceRecorder


@dataclass(frozen=True, eq=False)
class BackdoorInUpdate:
    """A registry update that is a BadNet: its trigger and target, for stamping frames and for metrics."""

    update_index: int
    trigger: Any
    target: int
    model: nn.Module


@dataclass(frozen=True)
class Artefacts:
    """What a run needs besides the scenario: the images cameras capture and the trained models."""

    images: torch.Tensor  # the test split, (N, C, H, W) in [0, 1]
    labels: np.ndarray
    model: nn.Module
    flops_per_image: float
    updates: tuple[ScheduledUpdate, ...] = ()
    adversarial: dict[str, np.ndarray] = field(default_factory=dict)  # attack label -> (N, C, H, W) float32
    # The bare model on each image as captured ("") and on each attack's oblivious version: the undefended
    # reference the summary puts next to the defended accuracy.
    bare_correct: dict[str, np.ndarray] = field(default_factory=dict)
    backdoors: dict[int, BackdoorInUpdate] = field(default_factory=dict)  # model version -> its backdoor
    clean_pool: Any = None  # ImageDataset: the defenders' clean labelled images (STRIP, CoDefend)


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


@dataclass
class Deployment:
    env: simpy.Environment
    network: Network
    broker: SimBroker
    recorder: TraceRecorder
    cameras: list[Camera]
    edges: list[EdgeServer]
    registry: ModelRegistry | None
    link_groups: list[LinkGroup]
    capture_until_s: float
    monitor: LinkMonitor
    attacks: list[AttackWindow] = field(default_factory=list)
    gateways: list[ScreeningGateway] = field(default_factory=list)


def inject_fault(
    env: simpy.Environment, fault: FaultSpec, broker: SimBroker, clients: dict[str, SimMqttClient], persistence: bool
):  # type: ignore[no-untyped-def]
    yield env.timeout(fault.at)
    if fault.kind == "broker_restart":
        broker.crash(persistence)
        yield env.timeout(fault.down)
        broker.start()
    elif fault.kind == "slow_subscriber":
        clients[fault.node].slow_down(fault.rate, fault.down)  # type: ignore[arg-type, index]
    else:
        client = clients[fault.node]  # type: ignore[index]
        client.crash()
        yield env.timeout(fault.down)
        client.connect()


def device_profiles(scenario: Scenario) -> dict[str, DeviceProfile]:
    profiles = dict(BUILTIN_PROFILES)
    for name, spec in scenario.devices.items():
        profiles[name] = DeviceProfile(
            name, spec.description, spec.cores, spec.gflops_per_core, spec.efficiency, spec.batch_overhead
        )
    return profiles


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
        return [(f"{a}-{i}", f"{b}-{i % nb}") for i in range(na)]
    return [(f"{a}-{j % na}", f"{b}-{j}") for j in range(nb)]


def add_nodes(network: Network, scenario: Scenario) -> None:
    for group, count in scenario.group_counts().items():
        for i in range(count):
            network.add_node(f"{group}-{i}")


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


def camera_codec(group: CameraGroup) -> PixelDropCodec | None:
    codec = group.codec
    return PixelDropCodec(codec.window, codec.rate, codec.mask) if codec.kind == "pixel_drop" else None


def attack_window(
    spec: AttackSpec, scenario: Scenario, artefacts: Artefacts, clean: np.ndarray, streams: RandomStreams
) -> AttackWindow:
    stop = scenario.duration if spec.stop is None else spec.stop
    return AttackWindow(
        spec.label,
        spec.start,
        stop,
        spec.fraction,
        streams.generator("attack", spec.label),
        artefacts.adversarial[spec.label],
        clean,
    )


def attack_targets(spec: AttackSpec, scenario: Scenario) -> set[str]:
    """The camera nodes a compromised_camera attack takes over."""
    counts = scenario.group_counts()
    nodes: set[str] = set()
    for target in spec.cameras:
        if target in counts:
            nodes.update(f"{target}-{i}" for i in range(counts[target]))
        else:
            nodes.add(target)
    return nodes


def camera_windows(scenario: Scenario, windows: list[AttackWindow]) -> dict[str, list[AttackWindow]]:
    """Camera node -> the windows of the attacks that act in the camera (compromised_camera, trigger)."""
    by_camera: dict[str, list[AttackWindow]] = {}
    for spec, window in zip(scenario.attacks, windows):
        if spec.kind in ("compromised_camera", "trigger"):
            for node in attack_targets(spec, scenario):
                by_camera.setdefault(node, []).append(window)
    return by_camera


def build_camera(
    env: simpy.Environment,
    scenario: Scenario,
    group: CameraGroup,
    name: str,
    index: int,
    transport: Any,
    artefacts: Artefacts,
    streams: RandomStreams,
    recorder: TraceRecorder,
    attacks: list[AttackWindow],
) -> Camera:
    """One camera node, the same in simulation and in live runs (only the transport differs)."""
    b = scenario.broker
    topic = group.topic.replace("{name}", name)
    config = CameraConfig(
        group.fps,
        group.arrivals,
        group.start,
        scenario.duration,
        topic,
        scenario.qos_for(topic),
        b.protocol,
        b.tcp_ip_overhead,
        camera_codec(group),
    )
    image_shape = tuple(int(x) for x in artefacts.images.shape[1:])
    return Camera(
        env,
        name,
        index,
        transport,
        config,
        artefacts.labels,
        image_shape,  # type: ignore[arg-type]
        streams.generator("camera", name),
        recorder,
        streams.generator("codec", name),
        attacks,
    )


def edge_config(scenario: Scenario, group: EdgeServerGroup) -> EdgeConfig:
    topic = scenario.registry.topic
    return EdgeConfig(
        group.subscribe,
        scenario.qos_for_filter(group.subscribe),
        topic,
        scenario.qos_for(topic),
        group.batch.max_size,
        group.batch.max_wait,
        group.cores,
        scenario.qos_for(topic),
    )


def edge_classifier(group: EdgeServerGroup, name: str, artefacts: Artefacts, streams: RandomStreams) -> EdgeClassifier:
    return EdgeClassifier(
        artefacts.model,
        1,
        artefacts.flops_per_image,
        artefacts.images,
        build_chain(group.defenses),
        streams.torch_generator("defense", name),
    )


def _install_mitm(
    spec: AttackSpec,
    window: AttackWindow,
    scenario: Scenario,
    network: Network,
    groups: list[LinkGroup],
    env: simpy.Environment,
) -> None:
    src_group, dst_group = scenario.attack_link_groups(spec)
    src_end, dst_end = spec.link  # type: ignore[misc]
    tamper = ManInTheMiddle(window, lambda: env.now)
    for group in groups:
        for direction in group.directions.get(f"{src_group}->{dst_group}", []):
            # a node name picks one link of the group; a group name takes them all
            if src_end in (src_group, direction.src) and dst_end in (dst_group, direction.dst):
                direction.taps.insert(0, tamper)  # attackers act before observers see the frame


def _model_bytes(model: nn.Module, version: int) -> bytes:
    from iotbed.models import model_to_bytes

    return model_to_bytes(model, {"version": str(version)})


def _repairer(
    group: EdgeServerGroup, artefacts: Artefacts, profiles: dict[str, DeviceProfile]
) -> CoDefendRepairer | None:
    if group.repair is None:
        return None
    from iotbed.defenses.codefend import CycleGanConfig

    pool = artefacts.clean_pool
    n = min(group.repair.clean_images, len(pool))
    clean = dataclasses.replace(pool, images=pool.images[:n], labels=pool.labels[:n])
    cyclegan = CycleGanConfig(
        epochs=group.repair.epochs, decay_epochs=group.repair.decay_epochs, seed=group.repair.seed
    )
    return CoDefendRepairer(clean, cyclegan, group.repair.unlearn_epochs, profiles[group.device], group.cores)


def _screening_gateways(
    scenario: Scenario,
    artefacts: Artefacts,
    network: Network,
    streams: RandomStreams,
    profiles: dict[str, DeviceProfile],
    client: Any,
    recorder: TraceRecorder,
    env: simpy.Environment,
    load_model_bytes: Any,
) -> list[ScreeningGateway]:
    from iotbed.defenses.codefend import select_clean_overlays

    gateways = []
    for group in scenario.nodes.gateways:
        spec = group.strip
        if spec is None:
            continue
        pool = artefacts.clean_pool
        picked = select_clean_overlays(
            pool, min(spec.n_blends, len(pool) - 1), streams.torch_generator("strip", group.name)
        )
        rest = torch.ones(len(pool), dtype=torch.bool)
        rest[picked] = False
        overlays, calibration = pool.images[picked], pool.images[rest][: spec.calibration]
        settings = ScreenSettings(spec.frames, spec.n_blends, spec.frr, spec.significance, spec.max_utilisation)
        topic = scenario.registry.topic
        for i in range(group.count):
            name = f"{group.name}-{i}"
            gateway = ScreeningGateway(
                env,
                name,
                client(name, name),
                topic,
                scenario.qos_for(topic),
                settings,
                profiles[group.device],
                artefacts.flops_per_image,
                artefacts.images,
                calibration,
                overlays,
                (1, artefacts.model),
                load_model_bytes,
                streams.torch_generator("strip", name),
                recorder,
            )
            for direction in network.directions.values():
                if direction.dst == name:
                    direction.taps.append(gateway.tap)
            gateways.append(gateway)
    return gateways


def build_deployment(scenario: Scenario, artefacts: Artefacts, load_model_bytes) -> Deployment:  # type: ignore[no-untyped-def]
    streams = RandomStreams(scenario.seed)
    env = simpy.Environment()
    network = Network(env)
    recorder = TraceRecorder()
    network.drop_listeners.append(recorder.on_packet_dropped)
    add_nodes(network, scenario)
    link_groups = add_links(network, scenario, streams)

    b = scenario.broker
    settings = MqttSettings(
        b.protocol, b.retry_interval, b.max_retries, b.keepalive, b.tcp_ip_overhead, b.max_inflight, b.max_queued
    )
    broker_node = scenario.resolve_node(b.node)
    assert broker_node is not None  # checked by the scenario validator
    broker = SimBroker(env, network, broker_node, settings, recorder.on_retry, recorder.on_give_up)
    broker.undelivered_listeners.append(recorder.on_undelivered)

    clients: dict[str, SimMqttClient] = {}

    def client(node: str, client_id: str, clean_session: bool = True) -> SimMqttClient:
        made = SimMqttClient(
            env,
            network,
            node,
            client_id,
            broker,
            clean_session=clean_session,
            on_retry=recorder.on_retry,
            on_give_up=recorder.on_give_up,
            on_not_connected=recorder.on_not_connected,
        )
        clients[client_id] = made
        return made

    clean = artefacts.images.numpy()
    windows = [attack_window(spec, scenario, artefacts, clean, streams) for spec in scenario.attacks]
    for spec, window in zip(scenario.attacks, windows):
        if spec.kind == "mitm":
            _install_mitm(spec, window, scenario, network, link_groups, env)
    by_camera = camera_windows(scenario, windows)
    cameras = []
    for group in scenario.nodes.cameras:
        for i in range(group.count):
            name = f"{group.name}-{i}"
            cameras.append(
                build_camera(
                    env,
                    scenario,
                    group,
                    name,
                    len(cameras),
                    client(name, name),
                    artefacts,
                    streams,
                    recorder,
                    by_camera.get(name, []),
                )
            )

    profiles = device_profiles(scenario)
    models_topic = scenario.registry.topic
    edges = []
    for group in scenario.nodes.edge_servers:
        for i in range(group.count):
            name = f"{group.name}-{i}"
            config, classifier = edge_config(scenario, group), edge_classifier(group, name, artefacts, streams)
            # One repairer per group (its first node), so a quarantine leads to one repaired model.
            repairer = _repairer(group, artefacts, profiles) if i == 0 else None
            edges.append(
                EdgeServer(
                    env,
                    name,
                    client(name, name, not group.persistent_session),
                    config,
                    classifier,
                    profiles[group.device],
                    recorder,
                    load_model_bytes,
                    repairer,
                    _model_bytes,
                )
            )
    gateways = _screening_gateways(
        scenario, artefacts, network, streams, profiles, client, recorder, env, load_model_bytes
    )

    registry = None
    publishers: list[ModelRegistry] = []
    if artefacts.updates:
        node = scenario.registry_node()
        own = [u for u in artefacts.updates if u.publisher is None]
        registry = ModelRegistry(
            env, "registry", client(node, "registry"), models_topic, scenario.qos_for(models_topic), own, recorder
        )
        # A rogue publisher: another client, on the node named, pushing its update on the models topic.
        for rogue in sorted({u.publisher for u in artefacts.updates if u.publisher is not None}):
            name = f"rogue@{rogue}"
            publishers.append(
                ModelRegistry(
                    env,
                    name,
                    client(rogue, name),
                    models_topic,
                    scenario.qos_for(models_topic),
                    [u for u in artefacts.updates if u.publisher == rogue],
                    recorder,
                )
            )

    for camera in cameras:
        env.process(camera.run())
    for edge in edges:
        env.process(edge.run())
    for gateway in gateways:
        env.process(gateway.run())
    if registry is not None:
        env.process(registry.run())
    for publisher in publishers:
        env.process(publisher.run())
    for fault in scenario.faults:
        env.process(inject_fault(env, fault, broker, clients, b.persistence))
    monitor = LinkMonitor(env, link_groups, scenario.monitor_interval)
    env.process(monitor.run())
    return Deployment(
        env,
        network,
        broker,
        recorder,
        cameras,
        edges,
        registry,
        link_groups,
        scenario.duration,
        monitor,
        windows,
        gateways,
    )
