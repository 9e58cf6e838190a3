"""A scenario's nodes as real MQTT clients: the simulator's `Camera`, `EdgeServer` and `ModelRegistry` on
`MqttTransport`s under one `simpy.rt.RealtimeEnvironment`.

`build_live` makes every node and transport of the scenario but starts none; `start` starts the nodes of
some clients (all of them in a one-process run; a worker's share when the run is spread over worker
processes) and the faults that act on those clients. Nothing opens a socket before `start`, so a
deployment built in one process can be forked into workers that each start their own share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import simpy
import simpy.rt
import torch

from iotbed.attacks.network import AttackWindow
from iotbed.broker.mosquitto import MosquittoBroker
from iotbed.broker.mqtt_transport import MqttTransport, RealtimeBridge, close_all, connect_ahead
from iotbed.broker.wire import WireCodec
from iotbed.deployment import (
    Artefacts,
    attack_window,
    build_camera,
    camera_windows,
    device_profiles,
    edge_classifier,
    edge_config,
)
from iotbed.emulation.paths import NodePaths, same_loss
from iotbed.emulation.shaper import LinkShaper
from iotbed.nodes.camera import Camera
from iotbed.nodes.edge_server import EdgeServer
from iotbed.nodes.registry import ModelRegistry
from iotbed.runner import load_model_bytes
from iotbed.scenario import FaultSpec, Scenario
from iotbed.sim.clock import WallClockEnvironment
from iotbed.sim.rng import RandomStreams
from iotbed.sim.trace import TraceRecorder


@dataclass(frozen=True)
class Endpoint:
    """Where one client connects, and from which local address ("" : any)."""

    host: str
    port: int
    bind_address: str = ""


@dataclass
class LiveDeployment:
    env: simpy.rt.RealtimeEnvironment
    bridge: RealtimeBridge
    recorder: TraceRecorder
    transports: dict[str, MqttTransport]  # by client id
    node_of: dict[str, str]  # client id -> the node it runs on (the registry runs on a node of its own)
    cameras: list[Camera]
    edges: list[EdgeServer]
    registry: ModelRegistry | None
    shapers: dict[str, LinkShaper]
    windows: list[AttackWindow]
    faults: list[FaultSpec]
    _runs: dict[str, Callable[[], Generator[simpy.Event, object, None]]] = field(default_factory=dict)

    def start(self, clients: Iterable[str], broker: MosquittoBroker | None = None) -> None:
        """Connect `clients` (before the run's clock starts), then start their nodes and the faults on them;
        with `broker`, also the broker's faults."""
        chosen = set(clients)
        connect_ahead([t for c, t in self.transports.items() if c in chosen])
        for client_id, run in self._runs.items():
            if client_id in chosen:
                self.env.process(run())
        for fault in self.faults:
            if fault.kind == "broker_restart":
                if broker is not None:
                    self.env.process(restart_broker(self.env, broker, fault.at, fault.down))
            elif fault.node in chosen:
                self.env.process(node_fault(self.env, self.transports[fault.node], fault))  # type: ignore[index]

    def close(self) -> None:
        close_all(list(self.transports.values()))


def build_live(
    scenario: Scenario,
    artefacts: Artefacts,
    endpoint: Callable[[str], Endpoint],
    paths: dict[str, NodePaths],
    *,
    shape_in_process: bool = True,
    logins: dict[str, str] | None = None,
    username: str | None = None,
    password: str | None = None,
    tls_ca: str | None = None,
    tls: bool = False,
) -> LiveDeployment:
    """Every node of `scenario` on its own transport; `endpoint(node)` says where a node's clients connect.
    `shape_in_process`: cameras shape what they publish here (off when the kernel's netem shapes every packet)."""
    streams = RandomStreams(scenario.seed)
    env = WallClockEnvironment(factor=1.0, strict=False)  # timestamps from the wall clock
    bridge = RealtimeBridge(env)
    recorder = TraceRecorder()
    pixels_u8 = (artefacts.images * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    codec = WireCodec(lambda frame: pixels_u8[frame.image_index])
    b = scenario.broker
    transports: dict[str, MqttTransport] = {}
    node_of: dict[str, str] = {}

    def transport(
        client_id: str, node: str, shaper: LinkShaper | None = None, clean_session: bool = True
    ) -> MqttTransport:
        # Per-client logins (one user per node, as `iotbed broker start --auth` makes them) win over a shared one.
        user, secret = (client_id, logins[client_id]) if logins and client_id in logins else (username, password)
        where = endpoint(node)
        made = MqttTransport(
            env,
            client_id,
            where.host,
            where.port,
            protocol=b.protocol,
            keepalive_s=int(b.keepalive),
            clean_session=clean_session,
            username=user,
            password=secret,
            tls_ca=tls_ca,
            tls=tls or None,
            codec=codec,
            shaper=shaper,
            bridge=bridge,
            tcp_ip_overhead=b.tcp_ip_overhead,
            bind_address=where.bind_address,
            max_inflight=b.max_inflight,
        )
        transports[client_id] = made
        node_of[client_id] = node
        return made

    live = LiveDeployment(env, bridge, recorder, transports, node_of, [], [], None, {}, [], list(scenario.faults))
    clean = artefacts.images.numpy()
    live.windows = [attack_window(spec, scenario, artefacts, clean, streams) for spec in scenario.attacks]
    by_camera = camera_windows(scenario, live.windows)
    for group in scenario.nodes.cameras:
        for i in range(group.count):
            name = f"{group.name}-{i}"
            shaper = _shaper(env, name, paths[name], scenario, streams) if shape_in_process else None
            if shaper is not None:
                live.shapers[name] = shaper
            camera = build_camera(
                env,
                scenario,
                group,
                name,
                len(live.cameras),
                transport(name, name, shaper),
                artefacts,
                streams,
                recorder,
                by_camera.get(name, []),
            )
            live.cameras.append(camera)
            live._runs[name] = camera.run

    profiles = device_profiles(scenario)
    for group in scenario.nodes.edge_servers:
        for i in range(group.count):
            name = f"{group.name}-{i}"
            edge = EdgeServer(
                env,
                name,
                transport(name, name, clean_session=not group.persistent_session),
                edge_config(scenario, group),
                edge_classifier(group, name, artefacts, streams),
                profiles[group.device],
                recorder,
                load_model_bytes,
            )
            live.edges.append(edge)
            live._runs[name] = edge.run
    if artefacts.updates:
        topic = scenario.registry.topic
        live.registry = ModelRegistry(
            env,
            "registry",
            transport("registry", scenario.registry_node()),
            topic,
            scenario.qos_for(topic),
            list(artefacts.updates),
            recorder,
        )
        live._runs["registry"] = live.registry.run
    return live


def _shaper(
    env: simpy.Environment, name: str, paths: NodePaths, scenario: Scenario, streams: RandomStreams
) -> LinkShaper:
    """The in-process shaper of what a camera publishes: its path to the broker (transmission time at the
    bottleneck bandwidth, delay, jitter, loss, queue)."""
    up = paths.up
    rng = streams.generator("shaper", name)
    b = scenario.broker
    rate = up.rate_bytes_s if math.isfinite(up.rate_bytes_s) else None
    return LinkShaper(
        env,
        rng,
        name=name,
        rate_bytes_s=rate,
        delay_s=up.delay_s,
        jitter_s=up.jitter_s,
        loss=same_loss(up.loss, rng),
        queue_limit=up.queue,
        retry_interval_s=b.retry_interval,
        max_retries=b.max_retries,
    )


def node_fault(env: simpy.Environment, transport: MqttTransport, fault: FaultSpec):  # type: ignore[no-untyped-def]
    """`node_crash`: the node's MQTT client vanishes at `at` (its TCP connection torn down, no DISCONNECT) and
    connects again `down` later with the same client id. `slow_subscriber`: it reads slowly for `down`."""
    yield env.timeout(fault.at)
    if fault.kind == "slow_subscriber":
        transport.slow_down(fault.rate, fault.down)  # type: ignore[arg-type]
        return
    transport.crash()
    yield env.timeout(fault.down)
    transport.rejoin()


def restart_broker(env: simpy.Environment, broker: MosquittoBroker, at_s: float, down_s: float):  # type: ignore[no-untyped-def]
    """Stop the broker (SIGTERM: it saves its database) at `at_s` and start it again `down_s` later."""
    yield env.timeout(at_s)
    broker.stop()
    yield env.timeout(down_s)
    broker.start()


def shaper_row(name: str, shaper: LinkShaper, duration_s: float) -> dict[str, Any]:
    s = shaper.stats
    rate = shaper.bucket.rate if shaper.bucket is not None else math.inf
    return {
        "link": f"{name}->broker (shaped path)",
        "group": "camera->broker",
        "bandwidth_bps": rate * 8,
        "packets_sent": s.submitted,
        "bytes_sent": s.bytes_admitted,
        "packets_delivered": s.sent,
        "dropped_queue_full": s.dropped_queue_full,
        "dropped_loss": s.losses,
        "utilisation": s.bytes_admitted / rate / duration_s if math.isfinite(rate) else 0.0,
        "max_queue_packets": s.max_backlog,
    }


def broker_report(url: str, transports: Iterable[MqttTransport]) -> dict[str, Any]:
    transports = list(transports)
    totals: dict[str, Any] = {"url": url, "clients": len(transports)}
    for key in (
        "published",
        "delivered",
        "duplicates",
        "malformed",
        "reconnects",
        "connection_losses",
        "dropped_not_connected",
        "refusals",
    ):
        totals[key] = int(sum(getattr(t.stats, key) for t in transports))
    refusals: dict[str, int] = {}
    malformed: dict[str, int] = {}
    for t in transports:
        for reason, n in t.stats.refusal_reasons().items():
            refusals[reason] = refusals.get(reason, 0) + n
        for reason, n in t.stats.malformed_reasons.items():
            malformed[reason] = malformed.get(reason, 0) + n
    totals["refusal_reasons"] = refusals
    totals["malformed_reasons"] = malformed
    return totals


def mark_broker_undelivered(recorder: TraceRecorder) -> int:
    """QoS 1/2 frames the broker acknowledged that no edge server had got by the end of the run (dropped
    from a full queue in front of a slow subscriber, expired, or still queued): marked `broker_undelivered`
    in the trace. Their count."""
    lost = 0
    for record in recorder.records:
        if record.t_broker >= 0 and record.t_edge < 0 and not record.drop_reason:
            record.drop_reason = "broker_undelivered"
            lost += 1
    return lost


def offered_frames_per_s(scenario: Scenario) -> float:
    return float(sum(g.count * g.fps for g in scenario.nodes.cameras))
