"""Wiring a scenario into running nodes, once for both runtimes.

`build_nodes` makes every node of a scenario (cameras, gateways, edge servers, the model registry and rogue
publishers) with the attack windows that act in them; a runtime supplies only a `Wiring`: how to make an
MQTT client on a node, how a gateway sees the frames it relays, and where heavy computation runs.
`build_deployment` is the simulation's runtime (a SimPy network and the simulated broker);
`iotbed.emulation.live.build_live` is the live one (paho clients against Mosquitto). Faults are written
once against `Transport` (`inject_fault`). Nothing here is global: two deployments in one process share
no state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import simpy
import torch
from torch import nn

from iotbed.attacks.network import AttackWindow, ManInTheMiddle
from iotbed.broker.messages import Publish
from iotbed.broker.sim_mqtt import MqttSettings, SimBroker, SimMqttClient
from iotbed.broker.topics import matches, split_shared
from iotbed.broker.transport import Transport
from iotbed.codecs.pixel_drop import PixelDropCodec
from iotbed.defenses.pipeline import build_chain
from iotbed.defenses.reject import STRIP_SCORE_OVERLAYS, FrameScorer, GamblerScore, SoftmaxScore, StripScore, Threshold
from iotbed.errors import ScenarioError
from iotbed.naming import INITIAL_MODEL_VERSION, group_nodes
from iotbed.nodes.camera import Camera, CameraConfig, ConditionWindow
from iotbed.nodes.classifier import EdgeClassifier, Guard
from iotbed.nodes.cloud import ESCALATIONS_FILTER, CloudConfig, CloudServer, escalations_filter
from iotbed.nodes.edge_server import EdgeConfig, EdgeServer
from iotbed.nodes.encrypted import CameraPrivacy, EncryptedService, EncryptingCamera
from iotbed.nodes.gateway import ScreeningGateway, ScreenSettings
from iotbed.nodes.payloads import Frame, results_topic
from iotbed.nodes.registry import ModelRegistry, ScheduledUpdate
from iotbed.nodes.repair import CoDefendRepairer
from iotbed.nodes.reviewers import ReviewConfig, ReviewDesk, ServiceTime
from iotbed.nodes.update_attacker import UpdateChannelAttacker
from iotbed.nodes.update_channel import UpdateChannel
from iotbed.privacy.ckks import generate_keys
from iotbed.privacy.costs import HeCosts
from iotbed.privacy.encrypted_cnn import EncryptedCnn
from iotbed.privacy.interactive import InteractiveCnn
from iotbed.scenario import AttackSpec, CameraGroup, EdgeServerGroup, FaultSpec, Scenario
from iotbed.scenario.schema import GatewayGroup, SentinetScreenSpec, StripScreenSpec
from iotbed.sim.devices import BUILTIN_PROFILES, DeviceProfile
from iotbed.sim.network import Network
from iotbed.sim.offload import Offload, inline
from iotbed.sim.rng import RandomStreams
from iotbed.sim.topology import LinkGroup, LinkMonitor, add_links, add_nodes, relayed_cameras
from iotbed.sim.trace import TraceRecorder
from iotbed.trust.channel_setup import setup_channel
from iotbed.trust.documents import blob_digest

if TYPE_CHECKING:
    from iotbed.defenses.gambler import Gambler

NodeRun = Callable[[], Generator[simpy.Event, object, None]]


@dataclass(frozen=True, eq=False)
class BackdoorInUpdate:
    """A registry update that is a BadNet: its trigger and target, for stamping frames and for metrics.
    With several triggers, `frame_triggers[i]` is the one a stamped frame of test image i shows."""

    update_index: int
    trigger: Any
    target: int
    model: nn.Module
    source_classes: tuple[int, ...] = ()  # a source-specific backdoor's sources (empty: all but the target)
    frame_triggers: np.ndarray | None = None

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """The test images as cameras show them with the trigger (each its own one of several)."""
        if self.frame_triggers is None:
            return self.trigger.apply(images)
        return self.trigger.apply(images, torch.from_numpy(self.frame_triggers))


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
    conditions: dict[str, np.ndarray] = field(default_factory=dict)  # condition label -> the images as seen
    cloud_models: dict[str, tuple[nn.Module, float]] = field(default_factory=dict)  # group -> (model, FLOPs)
    he: HeArtefacts | None = None  # where cameras encrypt: the compiled network and its measured costs
    gamblers: dict[str, Gambler] = field(default_factory=dict)  # edge group -> its reject score's network
    guards: dict[str, Guard] = field(default_factory=dict)  # edge group -> its Defed detector

    @property
    def num_classes(self) -> int:
        return int(self.model.spec.num_classes)


@dataclass(frozen=True, eq=False)
class HeArtefacts:
    net: EncryptedCnn | InteractiveCnn
    costs: HeCosts
    cost_file: str


class MakeClient(Protocol):
    def __call__(self, node: str, client_id: str, clean_session: bool = True) -> Transport: ...


@dataclass
class Wiring:
    """What a runtime supplies to `build_nodes`.

    `client(node, client_id, clean_session)`: an MQTT client on `node`. `relay(gateway, cameras)`: let a
    gateway see the frames of the cameras behind it. `offload`: where heavy computation runs.
    `topology`: the scenario's network, for which cameras each gateway relays."""

    env: simpy.Environment
    recorder: TraceRecorder
    client: MakeClient
    relay: Callable[[ScreeningGateway, list[str]], None]
    offload: Offload
    topology: Network


@dataclass
class Nodes:
    """A scenario's nodes, built once, and how to start them: `runs` by client id, so a runtime can start all
    of them or a worker's share."""

    cameras: list[Camera] = field(default_factory=list)
    edges: list[EdgeServer] = field(default_factory=list)
    clouds: list[CloudServer] = field(default_factory=list)
    reviewers: list[ReviewDesk] = field(default_factory=list)
    gateways: list[ScreeningGateway] = field(default_factory=list)
    registry: ModelRegistry | None = None
    publishers: list[ModelRegistry] = field(default_factory=list)  # rogue publishers, each its own client
    attackers: list[UpdateChannelAttacker] = field(default_factory=list)  # `security.attacks`, each its own client
    windows: list[AttackWindow] = field(default_factory=list)  # one per `attacks:` entry
    clients: dict[str, Transport] = field(default_factory=dict)  # client id -> its transport
    node_of: dict[str, str] = field(default_factory=dict)  # client id -> the node it runs on
    runs: dict[str, NodeRun] = field(default_factory=dict)  # client id -> its node's process

    def start(self, env: simpy.Environment, chosen: set[str] | None = None) -> None:
        for client_id, run in self.runs.items():
            if chosen is None or client_id in chosen:
                env.process(run())


class BrokerControl(Protocol):
    """A broker a run can stop and start again (`broker_restart` faults)."""

    def stop(self) -> None: ...

    def start(self) -> Any: ...


@dataclass
class SimBrokerControl:
    broker: SimBroker
    persistence: bool

    def stop(self) -> None:
        self.broker.crash(self.persistence)

    def start(self) -> None:
        self.broker.start()


def inject_fault(
    env: simpy.Environment, fault: FaultSpec, clients: dict[str, Transport], broker: BrokerControl | None
) -> Generator[simpy.Event, object, None]:
    """One fault, in either runtime. `broker_restart`: the broker stops at `at` and starts `down` later.
    `node_crash`: the node's client vanishes (no DISCONNECT) and rejoins with its client id `down` later.
    `slow_subscriber`: the node reads at most `rate` messages a second for `down`."""
    yield env.timeout(fault.at)
    if fault.kind == "broker_restart":
        assert broker is not None
        broker.stop()
        yield env.timeout(fault.down)
        broker.start()
        return
    client = clients[fault.node]  # type: ignore[index]
    if fault.kind == "slow_subscriber":
        client.slow_down(fault.rate, fault.down)  # type: ignore[arg-type]
        return
    client.crash()
    yield env.timeout(fault.down)
    client.rejoin()


def start_faults(
    env: simpy.Environment,
    faults: list[FaultSpec],
    clients: dict[str, Transport],
    broker: BrokerControl | None,
    chosen: set[str] | None = None,
) -> None:
    """Start the faults on `chosen` clients (all by default), and the broker's where `broker` is given."""
    for fault in faults:
        if fault.kind == "broker_restart":
            if broker is not None:
                env.process(inject_fault(env, fault, clients, broker))
        elif chosen is None or fault.node in chosen:
            env.process(inject_fault(env, fault, clients, broker))


def device_profiles(scenario: Scenario) -> dict[str, DeviceProfile]:
    profiles = dict(BUILTIN_PROFILES)
    for name, spec in scenario.devices.items():
        profiles[name] = DeviceProfile(
            name,
            spec.description,
            spec.cores,
            spec.gflops_per_core,
            spec.efficiency,
            spec.batch_overhead,
            spec.sha256_bytes_per_s,
            spec.ed25519_verify,
            spec.he_core_speed,
        )
    return profiles


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
            nodes.update(group_nodes(target, counts[target]))
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
    conditions = [
        ConditionWindow(c.label, c.start, c.stop if c.stop is not None else math.inf, artefacts.conditions[c.label])
        for c in group.conditions
    ]
    privacy = {}
    if group.privacy is not None:
        he = artefacts.he
        assert he is not None  # prepared for every scenario with encrypting cameras
        keys_rng = streams.generator("he-keys", name)
        owner = generate_keys(he.net.params, he.net.rotations, int(keys_rng.integers(0, 2**63 - 1)))
        profiles = device_profiles(scenario)
        privacy["privacy"] = CameraPrivacy(
            owner,
            he.net,
            he.costs,
            profiles[group.privacy.device],
            artefacts.images.numpy(),
            streams.generator("he-encrypt", name),
            1,  # the context upload must arrive: frames wait for its acknowledgement
            scenario.qos_for(results_topic(name)),
        )
    return (EncryptingCamera if privacy else Camera)(
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
        conditions,
        **privacy,
    )


def durable_filters(scenario: Scenario, group: EdgeServerGroup, index: int) -> tuple[str, ...] | None:
    """The non-shared filters server `index` of `group` subscribes to with `durable_subscription`: the
    group's filter itself for one server, else the topics of every `count`-th camera it matches."""
    if not group.durable_subscription:
        return None
    _, inner = split_shared(group.subscribe)
    if group.count == 1:
        return (inner,)
    topics = [
        camera.topic.replace("{name}", name)
        for camera in scenario.nodes.cameras
        for name in group_nodes(camera.name, camera.count)
    ]
    matched = tuple(t for t in topics if matches(inner, t))
    if not matched:
        where = f"nodes.edge_servers.{scenario.nodes.edge_servers.index(group)}"
        raise ScenarioError(
            f"{where}.durable_subscription: no camera's topic matches `subscribe: {group.subscribe}`, so its "
            f"servers would receive no frame; make `subscribe` match the cameras' topics (e.g. frames/#)"
        )
    return matched[index :: group.count]


def edge_config(scenario: Scenario, group: EdgeServerGroup, index: int = 0) -> EdgeConfig:
    topic = scenario.registry.topic
    escalating = group.reject is not None and group.reject.action == "escalate"
    return EdgeConfig(
        group.subscribe,
        scenario.qos_for_filter(group.subscribe),
        topic,
        scenario.qos_for(topic),
        group.batch.max_size,
        group.batch.max_wait,
        group.cores,
        scenario.qos_for(topic),
        scenario.qos_for_filter(ESCALATIONS_FILTER) if escalating else None,
        (group.reject.to or "") if group.reject is not None else "",
        scenario.qos_for(results_topic("_")),
        durable_filters(scenario, group, index),
    )


def escalating_edges(scenario: Scenario) -> dict[str, frozenset[str]]:
    """For each clouds or reviewers group, the edge server nodes that escalate to it."""
    senders: dict[str, set[str]] = {g.name: set() for g in [*scenario.nodes.clouds, *scenario.nodes.reviewers]}
    for group in scenario.nodes.edge_servers:
        if group.reject is not None and group.reject.to is not None:
            senders[group.reject.to].update(group_nodes(group.name, group.count))
    return {name: frozenset(edges) for name, edges in senders.items()}


def edge_classifier(group: EdgeServerGroup, name: str, artefacts: Artefacts, streams: RandomStreams) -> EdgeClassifier:
    return EdgeClassifier(
        artefacts.model,
        1,
        artefacts.flops_per_image,
        artefacts.images,
        build_chain(group.input_defenses),
        streams.torch_generator("defense", name),
        reject_scorer(group, artefacts, streams.torch_generator("reject-score", name)),
        artefacts.guards.get(group.name),
    )


def reject_scorer(group: EdgeServerGroup, artefacts: Artefacts, generator: torch.Generator) -> FrameScorer | None:
    """The reject option's score for an edge group: of the model's softmax, of the group's Deep Gamblers
    network, or STRIP's entropy over overlays from the defenders' clean pool past the calibration images."""
    spec = group.reject
    if spec is None:
        return None
    if spec.score == "gambler":
        return GamblerScore(artefacts.gamblers[group.name])
    if spec.score == "strip":
        pool = artefacts.clean_pool
        overlays = pool.images[spec.calibration : spec.calibration + STRIP_SCORE_OVERLAYS]
        return StripScore(overlays, spec.strip.n_blends, generator)
    return SoftmaxScore(spec.score)


def reject_threshold(group: EdgeServerGroup, artefacts: Artefacts, streams: RandomStreams) -> Threshold | None:
    """The reject option's threshold for an edge group, fitted on held-out clean labelled images through the
    group's own defenses and model (the frames it will score are never used)."""
    spec = group.reject
    if spec is None:
        return None
    from iotbed.defenses.reject import RejectTargetError, for_coverage, guaranteed_risk

    pool = artefacts.clean_pool
    n = min(spec.calibration, len(pool))
    labels = np.asarray(pool.labels[:n])
    calibration = EdgeClassifier(
        artefacts.model,
        INITIAL_MODEL_VERSION,
        artefacts.flops_per_image,
        pool.images[:n],
        build_chain(group.input_defenses),
        streams.torch_generator("reject", group.name),
        reject_scorer(group, artefacts, streams.torch_generator("reject-calibration", group.name)),
    )
    shape = tuple(int(x) for x in pool.images.shape[1:])
    frames = [Frame(i, 0, 0.0, i, int(labels[i]), shape, 0) for i in range(n)]  # type: ignore[arg-type]
    correct = calibration.predict(frames) == labels
    scores = calibration.last_scores
    assert scores is not None
    target = spec.target
    if target.coverage is not None:
        return for_coverage(spec.score, scores, correct, target.coverage)
    assert target.risk is not None
    try:
        return guaranteed_risk(spec.score, scores, correct, target.risk, 1.0 - target.confidence)
    except RejectTargetError as exc:
        raise ScenarioError(f"edge server group {group.name!r}, `reject.target.risk`: {exc}") from None


def _model_bytes(model: nn.Module, version: int) -> bytes:
    from iotbed.models import model_to_bytes

    return model_to_bytes(model, {"version": str(version)})


def _repairer(
    scenario: Scenario, group: EdgeServerGroup, artefacts: Artefacts, profiles: dict[str, DeviceProfile]
) -> CoDefendRepairer | None:
    if group.repair is None:
        return None
    screening = sum(g.count for g in scenario.nodes.gateways if g.screen is not None)
    from iotbed.defenses.codefend import CycleGanConfig

    pool = artefacts.clean_pool
    n = min(group.repair.clean_images, len(pool))
    clean = dataclasses.replace(pool, images=pool.images[:n], labels=pool.labels[:n])
    cyclegan = CycleGanConfig(
        epochs=group.repair.epochs, decay_epochs=group.repair.decay_epochs, seed=group.repair.seed
    )
    return CoDefendRepairer(
        clean,
        cyclegan,
        group.repair.unlearn_epochs,
        profiles[group.device],
        group.cores,
        group.repair.pool_window,
        screening,
        group.repair.d_poison,
        group.repair.d_valid,
        group.repair.filter_generated,
        group.repair.distill,
    )


def _screen_inputs(
    group: GatewayGroup, artefacts: Artefacts, streams: RandomStreams
) -> tuple[torch.Tensor, torch.Tensor, ScreenSettings, torch.Tensor]:
    """STRIP's overlays (or SentiNet's backgrounds) and calibration images for a gateway group, from the
    defenders' clean pool, and the labels of the first `send_clean` calibration images (the D_valid it sends
    with a notice)."""
    from iotbed.defenses.codefend import select_clean_overlays

    pool = artefacts.clean_pool
    if group.sentinet is not None:
        spec: StripScreenSpec | SentinetScreenSpec = group.sentinet
        n_clean, per_frame = group.sentinet.backgrounds, group.sentinet.n_pastes
    else:
        assert group.strip is not None
        spec, n_clean, per_frame = group.strip, group.strip.n_blends, group.strip.n_blends
    picked = select_clean_overlays(pool, min(n_clean, len(pool) - 1), streams.torch_generator("strip", group.name))
    rest = torch.ones(len(pool), dtype=torch.bool)
    rest[picked] = False
    settings = ScreenSettings(spec.frames, per_frame, spec.frr, spec.significance, spec.max_utilisation)
    if group.sentinet is not None:
        from iotbed.defenses.sentinet import SentinetDetector

        cost = SentinetDetector(artefacts.model, pool.images[picked], n_pastes=per_frame).cost
        settings = dataclasses.replace(
            settings, kind="sentinet", flops_per_input=cost.per_input, setup_flops=cost.setup
        )
    return pool.images[picked], pool.images[rest][: spec.calibration], settings, pool.labels[rest][: spec.send_clean]


def build_nodes(
    scenario: Scenario, artefacts: Artefacts, wiring: Wiring, load_model_bytes: Callable[[bytes], nn.Module]
) -> Nodes:
    """Every node of `scenario`, on clients the runtime makes; nothing is started."""
    env, recorder = wiring.env, wiring.recorder
    streams = RandomStreams(scenario.seed)
    built = Nodes()

    def client(node: str, client_id: str, clean_session: bool = True) -> Transport:
        made = wiring.client(node, client_id, clean_session)
        built.clients[client_id] = made
        built.node_of[client_id] = node
        return made

    channel = setup_channel(scenario, artefacts.updates, _initial_blob(scenario, artefacts), artefacts.images)
    keys = channel.keys

    def update_channel(node: str, device: DeviceProfile) -> UpdateChannel:
        verifier = keys.verifier(INITIAL_MODEL_VERSION, channel.initial_blob) if keys is not None else None
        return UpdateChannel(env, node, device, recorder, verifier)

    clean = artefacts.images.numpy()
    built.windows = [attack_window(spec, scenario, artefacts, clean, streams) for spec in scenario.attacks]
    by_camera = camera_windows(scenario, built.windows)
    for group in scenario.nodes.cameras:
        for name in group_nodes(group.name, group.count):
            camera = build_camera(
                env,
                scenario,
                group,
                name,
                len(built.cameras),
                client(name, name),
                artefacts,
                streams,
                recorder,
                by_camera.get(name, []),
            )
            built.cameras.append(camera)
            built.runs[name] = camera.run

    profiles = device_profiles(scenario)
    for group in scenario.nodes.edge_servers:
        threshold = reject_threshold(group, artefacts, streams)
        for i, name in enumerate(group_nodes(group.name, group.count)):
            # One repairer per group (its first node), so a quarantine leads to one repaired model.
            repairer = _repairer(scenario, group, artefacts, profiles) if i == 0 else None
            sign_repaired = None
            if keys is not None and repairer is not None:
                key = keys.repairers[name]
                sign_repaired = lambda update, now, key=key: keys.sign(key, update, now)  # noqa: E731
            edge = EdgeServer(
                env,
                name,
                client(name, name, not (group.persistent_session or group.durable_subscription)),
                edge_config(scenario, group, i),
                edge_classifier(group, name, artefacts, streams),
                profiles[group.device],
                recorder,
                load_model_bytes,
                repairer,
                _model_bytes,
                wiring.offload,
                update_channel(name, profiles[group.device]),
                sign_repaired,
                threshold,
                _encrypted_service(env, name, artefacts, streams),
            )
            built.edges.append(edge)
            built.runs[name] = edge.run

    senders = escalating_edges(scenario)
    for group in scenario.nodes.clouds:
        model, flops = artefacts.cloud_models.get(group.name, (artefacts.model, artefacts.flops_per_image))
        config = CloudConfig(
            escalations_filter(group.name),
            scenario.qos_for_filter(ESCALATIONS_FILTER),
            group.batch.max_size,
            group.batch.max_wait,
            group.cores,
        )
        for name in group_nodes(group.name, group.count):
            classifier = EdgeClassifier(model, INITIAL_MODEL_VERSION, flops, artefacts.images)
            cloud = CloudServer(
                env, name, client(name, name), config, classifier, profiles[group.device], recorder, senders[group.name]
            )
            built.clouds.append(cloud)
            built.runs[name] = cloud.run

    for group in scenario.nodes.reviewers:
        review = ReviewConfig(
            escalations_filter(group.name),
            scenario.qos_for_filter(ESCALATIONS_FILTER),
            group.reviewers,
            ServiceTime(group.service_time.distribution, group.service_time.mean, group.service_time.cv),
            group.accuracy,
            artefacts.num_classes,
        )
        for name in group_nodes(group.name, group.count):
            desk = ReviewDesk(
                env, name, client(name, name), review, recorder, streams.generator("review", name), senders[group.name]
            )
            built.reviewers.append(desk)
            built.runs[name] = desk.run

    relayed = relayed_cameras(wiring.topology, scenario) if any(g.screen for g in scenario.nodes.gateways) else {}
    models_topic = scenario.registry.topic
    for group in scenario.nodes.gateways:
        if group.screen is None:
            continue
        overlays, calibration, settings, valid_labels = _screen_inputs(group, artefacts, streams)
        d_valid = (calibration[: len(valid_labels)], valid_labels) if len(valid_labels) else None
        for name in group_nodes(group.name, group.count):
            gateway = ScreeningGateway(
                env,
                name,
                client(name, name),
                models_topic,
                scenario.qos_for(models_topic),
                settings,
                profiles[group.device],
                artefacts.flops_per_image,
                artefacts.images,
                calibration,
                overlays,
                (INITIAL_MODEL_VERSION, artefacts.model),
                load_model_bytes,
                streams.torch_generator("strip", name),
                recorder,
                wiring.offload,
                channel=update_channel(name, profiles[group.device]),
                notice_key=keys.gateways[name] if keys is not None else None,
                d_valid=d_valid,
            )
            wiring.relay(gateway, relayed.get(name, []))
            built.gateways.append(gateway)
            built.runs[name] = gateway.run

    qos = scenario.qos_for(models_topic)
    if channel.updates or keys is not None:
        own = [u for u in channel.updates if u.publisher is None]
        built.registry = ModelRegistry(
            env,
            "registry",
            client(scenario.registry_node(), "registry"),
            models_topic,
            qos,
            own,
            recorder,
            keys,
            scenario.security.refresh_interval,
            channel.freezes,
            (INITIAL_MODEL_VERSION, blob_digest(channel.initial_blob)),
        )
        built.runs["registry"] = built.registry.run
        # A rogue publisher: another client, on the node named, pushing its update on the models topic.
        for rogue in sorted({u.publisher for u in channel.updates if u.publisher is not None}):
            name = f"rogue@{rogue}"
            mine = [u for u in channel.updates if u.publisher == rogue]
            publisher = ModelRegistry(env, name, client(rogue, name), models_topic, qos, mine, recorder)
            built.publishers.append(publisher)
            built.runs[name] = publisher.run
    for client_id, node, message in channel.attackers:
        attacker = UpdateChannelAttacker(env, client_id, client(node, client_id), message, 1, recorder)
        built.attackers.append(attacker)
        built.runs[client_id] = attacker.run
    return built


def _encrypted_service(
    env: simpy.Environment, name: str, artefacts: Artefacts, streams: RandomStreams
) -> EncryptedService | None:
    he = artefacts.he
    if he is None:
        return None
    params, interactive = he.net.params, isinstance(he.net, InteractiveCnn)
    divisor = (
        he.net.net.divisor if isinstance(he.net, InteractiveCnn) else he.net.divisor
    )  # the cameras decrypt with it

    def compile_model(model: nn.Module) -> EncryptedCnn | InteractiveCnn:
        net = EncryptedCnn(model, params, divisor)  # type: ignore[arg-type]
        return InteractiveCnn(net) if interactive else net

    return EncryptedService(env, compile_model, he.costs, streams.generator("he-masks", name))


def _initial_blob(scenario: Scenario, artefacts: Artefacts) -> bytes:
    """The starting model's bytes, which devices hold signed metadata for; only made when something needs them."""
    rollback = any(a.kind == "rollback" for a in scenario.security.attacks)
    return _model_bytes(artefacts.model, INITIAL_MODEL_VERSION) if scenario.security.signing or rollback else b""


@dataclass
class Deployment:
    """A simulated run: the nodes on a SimPy network with the simulated broker."""

    env: simpy.Environment
    network: Network
    broker: SimBroker
    recorder: TraceRecorder
    nodes: Nodes
    link_groups: list[LinkGroup]
    capture_until_s: float
    monitor: LinkMonitor


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


def _tap_relayed(network: Network) -> Callable[[ScreeningGateway, list[str]], None]:
    def relay(gateway: ScreeningGateway, cameras: list[str]) -> None:
        for direction in network.directions.values():
            if direction.dst == gateway.name:
                direction.taps.append(gateway.tap)

    return relay


def build_deployment(
    scenario: Scenario, artefacts: Artefacts, load_model_bytes: Callable[[bytes], nn.Module]
) -> Deployment:
    """The simulation's runtime: the scenario's network and broker, its nodes on simulated clients, the
    man-in-the-middle hooks on links, the faults and the link monitor, all started."""
    streams = RandomStreams(scenario.seed)
    env = simpy.Environment()
    network = Network(env)
    recorder = TraceRecorder()
    network.drop_listeners.append(recorder.on_packet_dropped)
    add_nodes(network, scenario)
    link_groups = add_links(network, scenario, streams)

    b = scenario.broker
    settings = MqttSettings(
        b.protocol,
        b.retry_interval,
        b.max_retries,
        b.keepalive,
        b.tcp_ip_overhead,
        b.max_inflight,
        b.max_queued,
        transport=b.transport,
        tcp_nodelay=b.tcp_nodelay,
    )
    broker_node = scenario.resolve_node(b.node)
    assert broker_node is not None  # checked by the scenario validator
    broker = SimBroker(env, network, broker_node, settings, recorder.on_retry, recorder.on_give_up)
    broker.undelivered_listeners.append(recorder.on_undelivered)

    def acked(message: Publish) -> None:  # once per QoS 1/2 frame: inlined, not through the recorder
        record = message.record
        if record is not None and record.t_broker_ack < 0:
            record.t_broker_ack = env.now

    def client(node: str, client_id: str, clean_session: bool = True) -> SimMqttClient:
        return SimMqttClient(
            env,
            network,
            node,
            client_id,
            broker,
            clean_session=clean_session,
            on_retry=recorder.on_retry,
            on_give_up=recorder.on_give_up,
            on_not_connected=recorder.on_not_connected,
            on_acked=acked,
        )

    wiring = Wiring(env, recorder, client, _tap_relayed(network), inline(env), network)
    nodes = build_nodes(scenario, artefacts, wiring, load_model_bytes)
    for spec, window in zip(scenario.attacks, nodes.windows):
        if spec.kind == "mitm":
            _install_mitm(spec, window, scenario, network, link_groups, env)
    nodes.start(env)
    start_faults(env, scenario.faults, nodes.clients, SimBrokerControl(broker, b.persistence))
    monitor = LinkMonitor(env, link_groups, scenario.monitor_interval)
    env.process(monitor.run())
    return Deployment(env, network, broker, recorder, nodes, link_groups, scenario.duration, monitor)
