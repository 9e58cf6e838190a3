"""A scenario's nodes as real MQTT clients: the nodes `iotbed.deployment.build_nodes` makes, on
`MqttTransport`s under one `WallClockEnvironment`.

`build_live` supplies the live runtime's wiring (a paho client per node and client id, gateways that
subscribe to the frames of the cameras behind them, heavy computation on threads) and builds the nodes,
but starts none; `start` starts the nodes of some clients (all of them in a one-process run; a worker's
share when the run is spread over worker processes) and the faults that act on those clients. Nothing
opens a socket before `start`, so a deployment built in one process can be forked into workers that each
start their own share.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import simpy
import torch

from iotbed.attacks.network import AttackWindow
from iotbed.broker.client_pool import close_all, connect_ahead
from iotbed.broker.mosquitto import MosquittoBroker
from iotbed.broker.mqtt_transport import MqttTransport
from iotbed.broker.realtime import RealtimeBridge
from iotbed.broker.wire import WireCodec
from iotbed.deployment import Artefacts, Nodes, Wiring, build_nodes, start_faults
from iotbed.emulation.paths import NodePaths, same_loss
from iotbed.emulation.shaper import LinkShaper
from iotbed.naming import group_nodes, group_of
from iotbed.nodes.camera import Camera
from iotbed.nodes.edge_server import EdgeServer
from iotbed.nodes.gateway import ScreeningGateway
from iotbed.run_tables import NodeTables
from iotbed.runner import load_model_bytes
from iotbed.scenario import FaultSpec, Scenario
from iotbed.sim.clock import WallClockEnvironment
from iotbed.sim.offload import ThreadOffload
from iotbed.sim.rng import RandomStreams
from iotbed.sim.topology import build_topology
from iotbed.sim.trace import TraceRecorder
from iotbed.tabulate import tables_from

# A CoDefend repair of the shipped scenario takes about 80 s on 2 cores; one still running at the end is
# waited for this long at most.
UNFINISHED_WORK_WAIT_S = 600.0


@dataclass(frozen=True)
class Endpoint:
    """Where one client connects, and from which local address ("" : any)."""

    host: str
    port: int
    bind_address: str = ""


@dataclass
class LiveDeployment:
    env: WallClockEnvironment
    bridge: RealtimeBridge
    recorder: TraceRecorder
    nodes: Nodes
    transports: dict[str, MqttTransport]  # by client id
    shapers: dict[str, LinkShaper]
    faults: list[FaultSpec]
    offload: ThreadOffload
    artefacts: Artefacts  # what the nodes were built from, for measuring their models after the run

    @property
    def cameras(self) -> list[Camera]:
        return self.nodes.cameras

    @property
    def edges(self) -> list[EdgeServer]:
        return self.nodes.edges

    @property
    def gateways(self) -> list[ScreeningGateway]:
        return self.nodes.gateways

    @property
    def windows(self) -> list[AttackWindow]:
        return self.nodes.windows

    @property
    def node_of(self) -> dict[str, str]:
        """Client id -> the node it runs on (the registry and rogue publishers share a node with another)."""
        return self.nodes.node_of

    def start(self, clients: Iterable[str], broker: MosquittoBroker | None = None) -> None:
        """Connect `clients` (before the run's clock starts), then start their nodes and the faults on them;
        with `broker`, also the broker's faults."""
        chosen = set(clients)
        connect_ahead([t for c, t in self.transports.items() if c in chosen])
        self.nodes.start(self.env, chosen)
        start_faults(self.env, self.faults, dict(self.transports), broker, chosen)

    def close(self) -> None:
        """Disconnect every client, then wait for screens and repairs still computing (their results come
        after the run's end and are not used)."""
        close_all(list(self.transports.values()))
        if self.offload.running():
            print(
                f"waiting for {self.offload.running()} screen(s) or repair(s) still computing at the run's end",
                file=sys.stderr,
            )
            left = self.offload.finish(UNFINISHED_WORK_WAIT_S)
            if left:
                print(f"{left} still running after {UNFINISHED_WORK_WAIT_S:.0f} s; left behind", file=sys.stderr)


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
    `shape_in_process`: cameras shape what they publish here, and every client's connection handshake waits
    out its path's delays (off when the kernel's netem shapes every packet).
    `logins`: user -> password, one user per node (and `registry`), as `iotbed broker start --auth` makes them;
    a client logs in as its own client id where that is a user, else as its node (a rogue publisher on a
    camera has only the camera's credentials)."""
    streams = RandomStreams(scenario.seed)
    env = WallClockEnvironment(factor=1.0, strict=False)  # timestamps from the wall clock
    bridge = RealtimeBridge(env)
    recorder = TraceRecorder()
    pixels_u8 = (artefacts.images * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    codec = WireCodec(
        lambda f: pixels_u8[f.image_index],
        frame_shape=tuple(int(x) for x in artefacts.images.shape[1:]),
        # Signed updates are checked before anything loads them; unsigned ones are loaded once in the codec,
        # so that a node's loader never meets one it refuses.
        check_model=not scenario.security.signing,
        encrypted=_encrypted_limits(artefacts),
    )
    b = scenario.broker
    transports: dict[str, MqttTransport] = {}
    shapers: dict[str, LinkShaper] = {}
    cameras = {n for g in scenario.nodes.cameras for n in group_nodes(g.name, g.count)}

    def login(client_id: str, node: str) -> tuple[str | None, str | None]:
        for user in (client_id, node):
            if logins and user in logins:
                return user, logins[user]
        return username, password

    def client(node: str, client_id: str, clean_session: bool = True) -> MqttTransport:
        shaper = None
        if shape_in_process and client_id in cameras:  # what a camera publishes crosses its shaped path
            shaper = shapers[client_id] = _shaper(env, client_id, paths[client_id], scenario, streams)
        user, secret = login(client_id, node)
        where = endpoint(node)
        path = paths.get(node) if shape_in_process else None  # else the kernel delays the handshake itself
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
            tcp_nodelay=b.tcp_nodelay,
            # A (re)connection crosses the node's path, as in simulation: after a broker restart a camera
            # far from the broker is back later than an edge server beside it.
            handshake_delays_s=(path.up.delay_s, path.down.delay_s) if path is not None else (0.0, 0.0),
        )
        transports[client_id] = made
        return made

    topic_of = {g.name: g.topic for g in scenario.nodes.cameras}

    def relay(gateway: ScreeningGateway, relayed: list[str]) -> None:
        # No packet crosses a live gateway: it subscribes to the frames of the cameras behind it.
        topics = [topic_of[group_of(c)].replace("{name}", c) for c in relayed]
        gateway.frame_topics = tuple((t, scenario.qos_for(t)) for t in topics)

    topology, _ = build_topology(scenario)
    offload = ThreadOffload(env, bridge)
    wiring = Wiring(env, recorder, client, relay, offload, topology)
    nodes = build_nodes(scenario, artefacts, wiring, load_model_bytes)
    return LiveDeployment(env, bridge, recorder, nodes, transports, shapers, list(scenario.faults), offload, artefacts)


def _encrypted_limits(artefacts: Artefacts) -> tuple[int, int] | None:
    """(ciphertexts per frame, bytes per ciphertext) where cameras encrypt their frames."""
    if artefacts.he is None:
        return None
    from iotbed.privacy.ckks import ciphertext_size_bound

    return artefacts.he.net.channels, ciphertext_size_bound(artefacts.he.net.params)


def live_tables(live: LiveDeployment, clients: Iterable[str], end_s: float) -> NodeTables:
    """What the nodes of `clients` recorded, after `close`: `tables_from`'s tables with the shaped links of
    those cameras and the counters of those MQTT clients."""
    chosen = set(clients)
    tables = tables_from(live.nodes, live.recorder, live.artefacts, chosen)
    tables.links = [shaper_row(name, s, end_s) for name, s in live.shapers.items() if name in chosen]
    tables.clients = [{"client": c, **t.stats.as_dict()} for c, t in live.transports.items() if c in chosen]
    return tables


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


def shaped_link(name: str) -> str:
    """The name in links.csv of the shaped path of what camera `name` publishes."""
    return f"{name}->broker (shaped path)"


def shaper_row(name: str, shaper: LinkShaper, duration_s: float) -> dict[str, Any]:
    s = shaper.stats
    rate = shaper.bucket.rate if shaper.bucket is not None else math.inf
    return {
        "link": shaped_link(name),
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


def broker_report(url: str, clients: list[dict[str, Any]]) -> dict[str, Any]:
    """What the MQTT clients counted (`live_tables`' client rows), summed."""
    totals: dict[str, Any] = {"url": url, "clients": len(clients)}
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
        totals[key] = int(sum(c[key] for c in clients))
    refusals: dict[str, int] = {}
    malformed: dict[str, int] = {}
    for c in clients:
        for reason, n in c["refusal_reasons"].items():
            refusals[reason] = refusals.get(reason, 0) + n
        for reason, n in c["malformed_reasons"].items():
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
        if record.t_broker_ack >= 0 and record.t_edge < 0 and not record.drop_reason:
            record.drop_reason = "broker_undelivered"
            lost += 1
    return lost


def offered_frames_per_s(scenario: Scenario) -> float:
    return float(sum(g.count * g.fps for g in scenario.nodes.cameras))
