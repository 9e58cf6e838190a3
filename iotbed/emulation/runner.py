"""`iotbed emulate`: the scenario's nodes as real paho-mqtt clients against a real broker, in wall-clock time.

The node code is the simulator's (`Camera`, `EdgeServer`, `ModelRegistry`) under a
`simpy.rt.RealtimeEnvironment`; only the transport differs. Frames carry real pixels on the wire.

Links: each camera shapes what it publishes with the path the simulator would route it over, from the
camera to the broker's node: the bottleneck bandwidth, the sum of propagation delays, the root-sum-square
of the jitters, and the loss model of the lossiest link. The path from the broker to subscribers and
MQTT's own acknowledgements are not shaped (they cross loopback), and gateways, which only forward, run
no client. So the emulated latency lacks the broker-to-edge leg the simulator charges when the broker
is not on the edge server; the summary says `mode: emulated` so the two are never mixed up.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import simpy
import simpy.rt
import torch
from tqdm import tqdm

from iotbed.analysis.summary import summarise
from iotbed.broker.mosquitto import MosquittoBroker
from iotbed.broker.mqtt_transport import MqttTransport, RealtimeBridge
from iotbed.broker.wire import WireCodec
from iotbed.deployment import (_add_links, attack_window, build_camera, camera_windows, device_profiles, edge_classifier,
                               edge_config)  # fmt: skip
from iotbed.emulation.shaper import LinkShaper
from iotbed.errors import IotbedError
from iotbed.nodes.camera import Camera
from iotbed.nodes.edge_server import EdgeServer
from iotbed.nodes.registry import ModelRegistry
from iotbed.runner import (DRAIN_S, RunResult, load_model_bytes, one_torch_thread, output_dir, prepare,
                           reference_column, setup_summary, write_outputs)  # fmt: skip
from iotbed.scenario import Scenario
from iotbed.sim.links import BernoulliLoss, GilbertElliottLoss, LinkDirection, LossModel, NoLoss
from iotbed.sim.network import Network
from iotbed.sim.rng import RandomStreams
from iotbed.sim.trace import TraceRecorder


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise IotbedError(f"--broker {url}: use mqtt://HOST:PORT (or mqtts:// for TLS)")
    if not parsed.hostname:
        raise IotbedError(f"--broker {url}: no host; use mqtt://HOST:PORT")
    tls = parsed.scheme in ("mqtts", "ssl")
    return BrokerAddress(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)


@dataclass(frozen=True)
class PathShape:
    rate_bytes_s: float
    delay_s: float
    jitter_s: float
    lossiest: LinkDirection | None
    queue: int


def path_shape(route: tuple[LinkDirection, ...]) -> PathShape:
    lossy = [d for d in route if not isinstance(d.loss, NoLoss)]
    return PathShape(
        rate_bytes_s=min(d.transmitter.bandwidth_bps for d in route) / 8 if route else math.inf,
        delay_s=sum(d.latency_s for d in route),
        jitter_s=math.sqrt(sum(d.jitter_s**2 for d in route)),
        lossiest=lossy[0] if lossy else None,
        queue=min((d.transmitter.capacity for d in route), default=10_000),
    )


def emulate(scenario: Scenario, broker_url: str, *, username: str | None = None, password: str | None = None,
            logins: dict[str, str] | None = None, tls_ca: str | None = None, broker_control: MosquittoBroker | None = None, out_dir: str | Path | None = None, write: bool = True, force: bool = False,
            progress: bool = True) -> RunResult:  # fmt: skip
    address = parse_broker_url(broker_url)
    if any(g.strip is not None for g in scenario.nodes.gateways) or any(e.repair is not None for e in scenario.nodes.edge_servers):
        raise IotbedError("the STRIP screen on gateways and the CoDefend repair run in simulation only in this version; "
                          "remove `strip:` and `repair:` for `iotbed emulate`, or use `iotbed run`")  # fmt: skip
    if any(u.publisher is not None for u in scenario.registry.updates):
        raise IotbedError("rogue publishers (`publisher:` on an update) run in simulation only in this version; "
                          "against a live broker, `iotbed broker start --auth` refuses them by ACL")  # fmt: skip
    if any(a.kind == "mitm" for a in scenario.attacks):
        raise IotbedError("mitm attacks act on simulated links; `iotbed emulate` runs compromised_camera attacks "
                          "only: remove the mitm entries or use `iotbed run`")  # fmt: skip
    for fault in scenario.faults:
        if fault.kind == "broker_restart" and broker_control is None:
            raise IotbedError("broker_restart faults need a broker iotbed controls: run with `--broker local`")
    target = output_dir(scenario, out_dir, force) if write else None
    wall_start = time.perf_counter()
    resolved, artefacts, model_info = prepare(scenario, progress=progress)
    streams = RandomStreams(resolved.seed)
    env = simpy.rt.RealtimeEnvironment(factor=1.0, strict=False)
    bridge = RealtimeBridge(env)
    recorder = TraceRecorder()
    pixels_u8 = (artefacts.images * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    codec = WireCodec(lambda frame: pixels_u8[frame.image_index])
    b = resolved.broker
    broker_node = resolved.resolve_node(b.node)
    assert broker_node is not None

    # The simulated topology, only to know each camera's path to the broker.
    topology = Network(simpy.Environment())
    for group, count in resolved.group_counts().items():
        for i in range(count):
            topology.add_node(f"{group}-{i}")
    _add_links(topology, resolved, streams)

    transports: list[MqttTransport] = []

    def transport(client_id: str, shaper: LinkShaper | None = None, clean_session: bool = True) -> MqttTransport:
        # Per-client logins (one user per node, as `iotbed broker start --auth` makes them) win over a shared one.
        user, secret = (client_id, logins[client_id]) if logins and client_id in logins else (username, password)
        t = MqttTransport(env, client_id, address.host, address.port, protocol=b.protocol, keepalive_s=int(b.keepalive),
                          clean_session=clean_session, username=user, password=secret, tls_ca=tls_ca,
                          tls=address.tls or None,
                          codec=codec, shaper=shaper, bridge=bridge, tcp_ip_overhead=b.tcp_ip_overhead)  # fmt: skip
        transports.append(t)
        return t

    shapers: dict[str, LinkShaper] = {}
    clean = artefacts.images.numpy()
    windows = [attack_window(spec, resolved, artefacts, clean, streams) for spec in resolved.attacks]
    by_camera = camera_windows(resolved, windows)
    cameras: list[Camera] = []
    for group in resolved.nodes.cameras:
        for i in range(group.count):
            name = f"{group.name}-{i}"
            shape = path_shape(topology.route(name, broker_node))
            rng = streams.generator("shaper", name)
            loss = same_loss(shape.lossiest.loss, rng) if shape.lossiest is not None else None
            shaper = LinkShaper(env, rng, name=name, rate_bytes_s=shape.rate_bytes_s if math.isfinite(shape.rate_bytes_s) else None,
                                delay_s=shape.delay_s, jitter_s=shape.jitter_s, loss=loss, queue_limit=shape.queue,
                                retry_interval_s=b.retry_interval, max_retries=b.max_retries)  # fmt: skip
            shapers[name] = shaper
            camera = build_camera(env, resolved, group, name, len(cameras), transport(name, shaper), artefacts, streams,
                                  recorder, by_camera.get(name, []))  # fmt: skip
            cameras.append(camera)
            env.process(camera.run())

    profiles = device_profiles(resolved)
    models_topic = resolved.registry.topic
    edges = []
    for group in resolved.nodes.edge_servers:
        for i in range(group.count):
            name = f"{group.name}-{i}"
            edge = EdgeServer(env, name, transport(name, clean_session=not group.persistent_session),
                              edge_config(resolved, group), edge_classifier(group, name, artefacts, streams),
                              profiles[group.device], recorder, load_model_bytes)  # fmt: skip
            edges.append(edge)
            env.process(edge.run())
    if artefacts.updates:
        registry = ModelRegistry(env, "registry", transport("registry"), models_topic, resolved.qos_for(models_topic),
                                 list(artefacts.updates), recorder)  # fmt: skip
        env.process(registry.run())

    by_node = {t.client_id: t for t in transports}
    for fault in resolved.faults:
        if fault.kind == "node_crash":
            env.process(crash_node(env, by_node[fault.node], fault.at, fault.down))  # type: ignore[index]
        elif broker_control is not None:
            env.process(restart_broker(env, broker_control, fault.at, fault.down))
    end = resolved.duration + DRAIN_S
    env.sync()  # wall-clock zero is now, after models and clients are ready
    try:
        with one_torch_thread(), tqdm(total=100, desc=f"{resolved.name} (live)", disable=not progress, file=sys.stderr,
                                      bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]") as bar:  # fmt: skip
            for step in range(1, 101):
                env.run(until=end * step / 100)
                bar.set_postfix_str(f"{env.now:.1f}/{end:.1f} s, {len(recorder.records)} frames", refresh=False)
                bar.update(1)
    finally:
        for t in transports:
            t.close()

    table = recorder.to_table()
    links = [shaper_row(name, s, end) for name, s in shapers.items()]
    summary = summarise(table, scenario_name=resolved.name, seed=resolved.seed, duration_s=resolved.duration,
                        sim_end_s=end, wall_time_s=time.perf_counter() - wall_start, model_info=model_info,
                        links=links, edges=edges, broker=broker_report(broker_url, transports),
                        model_events=recorder.model_events, mode="emulated", cameras=len(cameras),
                        reference=reference_column(table, artefacts),
                        setup=setup_summary(resolved, cameras, edges, windows))  # fmt: skip
    if target is not None:
        write_outputs(target, resolved, table, summary, links, [], recorder)
    return RunResult(resolved, summary, table, target)


def crash_node(env: simpy.Environment, transport: MqttTransport, at_s: float, down_s: float):  # type: ignore[no-untyped-def]
    """The node's MQTT client vanishes at `at_s` (its TCP connection torn down, no DISCONNECT) and connects
    again `down_s` later, with the same client id."""
    yield env.timeout(at_s)
    transport.crash()
    yield env.timeout(down_s)
    transport.rejoin()


def restart_broker(env: simpy.Environment, broker: MosquittoBroker, at_s: float, down_s: float):  # type: ignore[no-untyped-def]
    """Stop the broker (SIGTERM: it saves its database) at `at_s` and start it again `down_s` later."""
    yield env.timeout(at_s)
    broker.stop()
    yield env.timeout(down_s)
    broker.start()


def same_loss(model: LossModel, rng: np.random.Generator) -> LossModel:
    """The link's loss model with the same parameters, drawing from the shaper's own stream."""
    if isinstance(model, BernoulliLoss):
        return BernoulliLoss(model.rate, rng)
    if isinstance(model, GilbertElliottLoss):
        return GilbertElliottLoss(model.p, model.r, model.loss_good, model.loss_bad, rng)
    return NoLoss()


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


def broker_report(url: str, transports: list[MqttTransport]) -> dict[str, Any]:
    totals: dict[str, Any] = {"url": url, "clients": len(transports)}
    for key in ("published", "delivered", "duplicates", "malformed", "reconnects", "connection_losses",
                "dropped_not_connected", "refusals"):  # fmt: skip
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
