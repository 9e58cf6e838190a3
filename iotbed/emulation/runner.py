"""`iotbed emulate`: the scenario's nodes as real paho-mqtt clients against a real broker, in wall-clock time.

The node code is the simulator's (`Camera`, `EdgeServer`, `ModelRegistry`) under a
`simpy.rt.RealtimeEnvironment`; only the transport differs (`iotbed.emulation.live`). Frames carry real
pixels on the wire.

Links. Gateways and routers run no client: each node talks to the broker directly over the path the
simulator would route it on, collapsed into one shaped hop (`iotbed.emulation.paths`). By default each
camera shapes what it publishes in process (`shaper.path_shaper`: transmission time at the bottleneck
bandwidth, summed delay, jitter, and the path's loss as the scenario's `broker.transport` has it: through
the TCP model, which repairs a loss and holds the messages behind it, for `tcp`; as a lost or MQTT-resent
message for `udp`); the broker-to-subscriber leg and MQTT's acknowledgements cross loopback unshaped. With
`netns=True` (root) the kernel shapes real packets both ways instead: every node group in its own network
namespace, the broker in another, joined by veth pairs with HTB and netem per node, or, on a kernel without
netem, HTB, nftables loss that the real TCP repairs, and the in-process timing of what cameras publish
(`iotbed.emulation.netns`). The summary's `shaping` says which mechanism applies for rate, delay, jitter and
loss.

Scale. One process runs every client up to `workers.PROCESS_CAPACITY_FPS`; `workers="auto"` spreads a
larger run over worker processes, or `workers=N` asks for N (`iotbed.emulation.workers`). Each process
measures how far it fell behind the wall clock; the summary's `realtime` section reports it, so a run that
could not keep up says so.

The broker's own counters come from `$SYS` (`iotbed.emulation.monitor`): what it dropped from full queues
and how many messages it held. The summary says `mode: emulated`, so simulated and emulated runs are never
mixed up; `iotbed compare` sets them side by side.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from iotbed.analysis.summary import summarise
from iotbed.attacks.network import join_labels
from iotbed.broker.mosquitto import BrokerConfig, MosquittoBroker
from iotbed.broker.packets import publish_size, tcp_ip_size
from iotbed.broker.realtime import LagMeter
from iotbed.deployment import Artefacts, camera_codec
from iotbed.emulation import netns as kernel
from iotbed.emulation.live import (
    Endpoint,
    LiveDeployment,
    broker_report,
    build_live,
    live_tables,
    mark_broker_undelivered,
    offered_frames_per_s,
)
from iotbed.emulation.mitm import FrameTamper, MqttTamperProxy
from iotbed.emulation.monitor import BrokerMonitor
from iotbed.emulation.paths import NodePaths, node_paths, nodes_behind
from iotbed.emulation.shaper import path_shaper
from iotbed.emulation.workers import (
    Shard,
    ShardResult,
    auto_workers,
    merge,
    plan_shards,
    progress_steps,
    run_sharded,
)
from iotbed.errors import UsageError
from iotbed.naming import group_nodes
from iotbed.nodes.camera import frame_payload_bytes
from iotbed.runner import (
    DRAIN_S,
    RunResult,
    attack_outputs,
    one_torch_thread,
    output_dir,
    prepare,
    privacy_summary,
    reference_column,
    setup_summary,
    write_outputs,
)
from iotbed.scenario import Scenario
from iotbed.sim.rng import RandomStreams
from iotbed.tabulate import run_tables_from

# A process that stays within this of the wall clock at its 99th percentile kept up: its frames left when
# they were due, to within what the network itself adds at these loads.
KEPT_UP_P99_MS = 10.0


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise UsageError(f"--broker {url}: use mqtt://HOST:PORT (or mqtts:// for TLS), or `local`")
    if not parsed.hostname:
        raise UsageError(f"--broker {url}: no host; use mqtt://HOST:PORT")
    tls = parsed.scheme in ("mqtts", "ssl")
    return BrokerAddress(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)


def _check(scenario: Scenario, broker_url: str, broker_control: MosquittoBroker | None, netns: bool) -> None:
    if netns and any(a.kind == "mitm" for a in scenario.attacks):
        raise UsageError(
            "a live mitm attack is a proxy on the loopback interface, which --netns clients do not reach: "
            "run the mitm scenario without --netns, or remove its `mitm` entries"
        )
    local = broker_url == "local"
    if netns and not local:
        raise UsageError("--netns runs its own broker inside the emulated network: use `--broker local`")
    if netns:
        kernel.check_available()  # before data and models are prepared, which can take minutes
        paths = node_paths(scenario, _client_nodes(scenario, with_registry=False))
        bursty = kernel.bursty_loss_nodes(paths)
        if bursty and not kernel.netem_available():
            kernel.refuse_bursty_loss(bursty, paths)
    if not local:
        parse_broker_url(broker_url)
    for fault in scenario.faults:
        if fault.kind == "broker_restart" and broker_control is None and not local:
            raise UsageError("broker_restart faults need a broker iotbed controls: run with `--broker local`")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A `kill` of the run unwinds like Ctrl-C, so namespaces, workers and the broker are cleaned up."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def emulate(
    scenario: Scenario,
    broker_url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    logins: dict[str, str] | None = None,
    tls_ca: str | None = None,
    broker_control: MosquittoBroker | None = None,
    workers: int | str = "auto",
    netns: bool = False,
    out_dir: str | Path | None = None,
    write: bool = True,
    force: bool = False,
    progress: bool = True,
) -> RunResult:
    """Run `scenario` live. `broker_url` is `mqtt[s]://HOST:PORT`, or `local` for a Mosquitto started for
    this run (with the scenario's queue limits; restarted by `broker_restart` faults). `broker_control` is a
    broker the caller started, for its faults. `workers`: `auto`, or how many processes to spread the
    clients over. `netns`: shape in the kernel (root; needs `local`)."""
    _check(scenario, broker_url, broker_control, netns)
    if workers != "auto" and (not isinstance(workers, int) or workers < 1):
        raise UsageError(f"--workers {workers}: give a number of processes (1 or more) or `auto`")
    target = output_dir(scenario, out_dir, force) if write else None
    wall_start = time.perf_counter()
    resolved, artefacts, model_info = prepare(scenario, progress=progress)
    nodes = _client_nodes(resolved, bool(artefacts.updates))
    paths = node_paths(resolved, nodes)
    end = resolved.duration + DRAIN_S
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_as_interrupt())
        lab = (
            stack.enter_context(
                kernel.NetnsLab(kernel.by_group(paths, nodes), message_bytes=_largest_frame(resolved, artefacts))
            )
            if netns
            else None
        )
        broker = broker_control
        url = broker_url
        if broker_url == "local":
            broker = stack.enter_context(_local_broker(stack, resolved, lab))
            url = broker.url
        address = parse_broker_url(url)
        if lab is not None:
            endpoint = _netns_endpoint(lab)
        else:
            endpoint = lambda node: Endpoint(address.host, address.port)  # noqa: E731
        attackers = _start_mitm(stack, resolved, nodes, address)
        endpoint = _through_proxies(endpoint, attackers)
        # The kernel's netem does everything; without it, what cameras publish is timed here as well.
        live = build_live(
            resolved,
            artefacts,
            endpoint,
            paths,
            shape_in_process=lab is None or not lab.netem,
            logins=logins,
            username=username,
            password=password,
            tls_ca=tls_ca,
            tls=address.tls,
        )
        _path_shapers(live, paths, resolved, kernel_loss=lab is not None)
        for attacker in attackers:
            window = live.windows[attacker.index]
            attacker.tamper = FrameTamper(window, live.env.wall_now)
            attacker.proxy.tamper = attacker.tamper
        offered = offered_frames_per_s(resolved)
        n_workers = (
            auto_workers(offered, len(live.transports), len(live.cameras)) if workers == "auto" else int(workers)
        )
        namespaces = {c: lab.namespace_of(node).namespace for c, node in live.node_of.items()} if lab else None
        shards = plan_shards(live, n_workers, namespaces)
        user, secret = ("monitor", logins["monitor"]) if logins and "monitor" in logins else (username, password)
        monitor = BrokerMonitor(
            address.host, address.port, username=user, password=secret, tls=address.tls, tls_ca=tls_ca
        )
        try:
            with _progress(resolved.name, end, progress) as advance:
                lags, results = _execute(live, shards, end, broker, monitor, lab, advance)
        finally:
            monitor.stop()
        kernel_rows = lab.class_stats() if lab is not None else []
        shaping_report = (
            lab.describe(counters=True) if lab is not None else in_process_shaping(resolved.broker.transport)
        )

    # Split over workers, each sent its nodes' tables; this process adds its own (the mitm proxies' counts).
    if results is None:
        nodes, renumbered = live_tables(live, live.transports, end), None
    else:
        nodes, renumbered = merge(live, results, own=live_tables(live, (), end))
    mitm_report = _mark_tampered(live, attackers, renumbered, address.tls)
    undelivered = mark_broker_undelivered(live.recorder)
    report = broker_report(url, nodes.clients)
    counted = monitor.report()
    report.update(
        queue_drops=counted["dropped"],
        stored_max_increase=counted["stored_max_increase"],
        sys_counters=counted["available"],
        acknowledged_not_delivered=undelivered,
    )
    tables = run_tables_from(nodes, trace=live.recorder.to_table(), broker=report, artefacts=artefacts)
    summary = summarise(
        tables,
        scenario_name=resolved.name,
        seed=resolved.seed,
        duration_s=resolved.duration,
        sim_end_s=end,
        wall_time_s=time.perf_counter() - wall_start,
        model_info=model_info,
        mode="emulated",
        cameras=len(live.cameras),
        reference=reference_column(tables.trace, artefacts),
        setup=setup_summary(resolved, live.cameras, live.edges, tables),
    )
    summary["realtime"] = realtime_report(lags, offered, shards)
    if mitm_report:
        summary["mitm"] = mitm_report
    summary["shaping"] = shaping_report
    sections, extra = attack_outputs(tables, resolved)
    summary.update(sections)
    if artefacts.he is not None:
        summary["privacy"] = privacy_summary(tables.trace, artefacts, live.cameras, live.edges)
    if kernel_rows:
        extra["kernel_links.csv"] = kernel_rows
    if target is not None:
        write_outputs(target, resolved, tables, summary, [], extra)
    return RunResult(resolved, summary, tables.trace, target)


def _path_shapers(live: LiveDeployment, paths: dict[str, NodePaths], scenario: Scenario, kernel_loss: bool) -> None:
    """Give each shaped camera the shaper of its path for the scenario's transport (`shaper.path_shaper`):
    over TCP its loss goes through the TCP model; `kernel_loss` (--netns without netem): the kernel drops real
    packets, so the shaper only times messages."""
    streams = RandomStreams(scenario.seed)
    b = scenario.broker
    for name in list(live.shapers):
        shaper = path_shaper(
            live.env,
            name,
            paths[name],
            streams.generator("shaper", name),
            streams.generator("shaper", name, "back"),
            transport=b.transport,
            retry_interval_s=b.retry_interval,
            max_retries=b.max_retries,
            tcp_ip_overhead=b.tcp_ip_overhead,
            tcp_nodelay=b.tcp_nodelay,
            kernel_loss=kernel_loss,
        )
        live.shapers[name] = shaper
        live.transports[name].shaper = shaper


def in_process_shaping(transport: str) -> dict[str, Any]:
    """The summary's `shaping` for a run without --netns: what the in-process shaper does, and what it leaves
    unshaped."""
    if transport == "tcp":
        loss = (
            "in process, through the TCP model (iotbed.sim.tcp) of each camera's connection: a lost segment, or a "
            "lost ACK on the path back, is repaired as Linux's TCP does (RACK, tail loss probe, fast retransmit, "
            "RTO) and the messages behind it wait (in-order delivery); MQTT resends nothing"
        )
        rate = "in process, per camera: each TCP segment of what it publishes serialised at the path's bottleneck"
    else:
        loss = (
            "in process, per message: a lost QoS 0 message is gone, a lost QoS 1/2 one is resent by MQTT after "
            "retry_interval (transport udp, as in simulation)"
        )
        rate = "in process, per camera: each message it publishes serialised at the path's bottleneck"
    return {
        "mode": "in process",
        "transport": transport,
        "rate": rate,
        "delay": "in process, on what cameras publish (the path's summed propagation delay)",
        "jitter": "in process, on what cameras publish (normal, truncated at zero)",
        "loss": loss,
        "not_shaped": "MQTT's acknowledgements (PUBACK, PUBREC, ...), the broker-to-subscriber leg (what edge "
        "servers receive) and what edge servers, gateways and the registry send cross loopback unshaped"
        + ("; the TCP model's own ACKs cross the path back (its delay, jitter and loss)" if transport == "tcp" else ""),
    }


@dataclass
class Attacker:
    """A live `mitm` attack: its proxy, the nodes that connect through it, and its tamper function."""

    index: int  # of the attack in the scenario's `attacks:`
    label: str
    proxy: MqttTamperProxy
    nodes: list[str]
    tamper: FrameTamper | None = None


def _start_mitm(
    stack: contextlib.ExitStack, scenario: Scenario, nodes: list[str], address: BrokerAddress
) -> list[Attacker]:
    """A tampering proxy on the loopback interface for every `mitm` attack, before the broker; the clients
    whose path crosses the attacked link connect to it instead of to the broker."""
    attackers = []
    taken: dict[str, str] = {}
    for index, spec in enumerate(scenario.attacks):
        if spec.kind != "mitm":
            continue
        behind = nodes_behind(scenario, nodes, spec)
        for node in behind:
            if node in taken:
                raise UsageError(
                    f"attacks.{index}: {node}'s path crosses the links of two mitm attacks ({taken[node]} and "
                    f"{spec.label}); a live run puts one proxy on a client's path: attack one of the links"
                )
            taken[node] = spec.label
        proxy = stack.enter_context(MqttTamperProxy((address.host, address.port)).start())
        attackers.append(Attacker(index, spec.label, proxy, behind))
    return attackers


def _through_proxies(endpoint: Any, attackers: list[Attacker]) -> Any:
    proxied = {node: a.proxy for a in attackers for node in a.nodes}

    def where(node: str) -> Endpoint:
        proxy = proxied.get(node)
        return Endpoint(proxy.host, proxy.port) if proxy is not None else endpoint(node)

    return where


def _mark_tampered(
    live: LiveDeployment, attackers: list[Attacker], renumbered: dict[int, int] | None, tls: bool
) -> dict[str, Any]:
    """Label the frames each proxy changed in the trace; what each attacker saw and did."""
    records = live.recorder.records
    report: dict[str, Any] = {}
    for attacker in attackers:
        assert attacker.tamper is not None
        ids = attacker.tamper.tampered_ids()
        for frame_id in ids:
            index = renumbered.get(frame_id) if renumbered is not None else frame_id
            if index is not None and 0 <= index < len(records):
                records[index].attack = join_labels(records[index].attack, attacker.label)
        stats = attacker.proxy.stats
        report[attacker.label] = {
            "nodes": attacker.nodes,
            "connections": stats.connections,
            "unreadable_connections": stats.unreadable_connections,
            "publishes_seen": stats.publishes_seen,
            "frames_seen": attacker.tamper.frames_seen,
            "frames_tampered": len(ids),
            "tls": tls,
            "read_the_stream": stats.connections > stats.unreadable_connections,
        }
    return report


def _client_nodes(scenario: Scenario, with_registry: bool) -> list[str]:
    """The nodes that run MQTT clients: cameras, edge servers, screening gateways, and the registry's node
    (rogue publishers run on camera nodes)."""
    groups = [
        *scenario.nodes.cameras,
        *scenario.nodes.edge_servers,
        *scenario.nodes.clouds,
        *scenario.nodes.reviewers,
        *(g for g in scenario.nodes.gateways if g.screen),
    ]
    nodes = [node for g in groups for node in group_nodes(g.name, g.count)]
    if with_registry and scenario.registry_node() not in nodes:
        nodes.append(scenario.registry_node())
    return nodes


def _largest_frame(scenario: Scenario, artefacts: Artefacts) -> int:
    """The most bytes a frame takes on the wire (its PUBLISH with TCP/IP headers): sizes the kernel's queues."""
    shape = tuple(int(x) for x in artefacts.images.shape[1:])
    sizes = [0]
    for group in scenario.nodes.cameras:
        topic = group.topic.replace("{name}", f"{group.name}-{group.count - 1}")  # the longest of the group's
        payload = frame_payload_bytes(shape, camera_codec(group))  # type: ignore[arg-type]
        sizes.append(tcp_ip_size(publish_size(topic, payload, scenario.qos_for(topic), scenario.broker.protocol)))
    return max(sizes)


def _execute(
    live: LiveDeployment,
    shards: list[Shard],
    end: float,
    broker: MosquittoBroker | None,
    monitor: BrokerMonitor,
    lab: kernel.NetnsLab | None,
    advance: Any,
) -> tuple[dict[int, LagMeter], list[ShardResult] | None]:
    """Run every shard, here or in forked workers; each process's lag behind the wall clock, by shard, and
    the workers' results (None: everything ran in this process)."""
    if len(shards) == 1 and lab is None:
        monitor.start()
        _run_here(live, broker, end, advance)
        return {0: live.bridge.lag}, None

    def parent_side() -> None:  # after the fork: nothing of this may be inherited by the workers
        monitor.start()
        live.start([], broker)  # the broker's faults run here, on the parent's clock

    results = run_sharded(
        live, shards, end, enter=kernel.enter if lab else None, parent_env_hook=parent_side, on_progress=advance
    )
    return {r.index: r.lag for r in results}, results


def _local_broker(stack: contextlib.ExitStack, scenario: Scenario, lab: kernel.NetnsLab | None) -> MosquittoBroker:
    b = scenario.broker
    run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="iotbed-broker-")))
    limits = {
        "max_queued_messages": b.max_queued,
        "max_inflight_messages": b.max_inflight,
        "persistence": b.persistence,
        "tcp_nodelay": b.tcp_nodelay,
    }
    if lab is None:
        return MosquittoBroker(run_dir, BrokerConfig(**limits))
    return MosquittoBroker(
        run_dir,
        BrokerConfig(host="0.0.0.0", port=kernel.BROKER_PORT, netns=lab.broker_ns, **limits),
        reach_host=lab.broker_address,
    )


def _netns_endpoint(lab: kernel.NetnsLab) -> Any:
    def endpoint(node: str) -> Endpoint:
        net = lab.namespace_of(node)
        return Endpoint(net.hub_address, kernel.BROKER_PORT, net.addresses[node])

    return endpoint


@contextlib.contextmanager
def _progress(name: str, end: float, show: bool) -> Iterator[Any]:
    with tqdm(
        total=round(end, 1),
        desc=f"{name} (live)",
        unit="s",
        disable=not show,
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s {postfix} [{elapsed}<{remaining}]",
    ) as bar:

        def advance(now: float, frames: int) -> None:
            bar.set_postfix_str(f"{frames} frames", refresh=False)
            bar.update(round(min(now, end), 1) - bar.n)  # redraws at most every 0.1 s

        yield advance


def _run_here(live: LiveDeployment, broker: MosquittoBroker | None, end: float, advance: Any) -> None:
    """Every client in this process."""
    live.start(live.transports, broker)
    env = live.env
    env.sync()  # wall-clock zero is now, after models and clients are ready
    try:
        with one_torch_thread():
            for until in progress_steps(end):
                env.run(until=until)
                advance(env.now, len(live.recorder.records))
    finally:
        live.close()


def realtime_report(lags: dict[int, LagMeter], offered_fps: float, shards: list[Shard]) -> dict[str, Any]:
    total = LagMeter()
    for meter in lags.values():
        total.merge(meter)
    overall = total.report()
    p99 = overall["p99_ms"]
    return {
        "workers": len(shards),
        "offered_frames_per_s": offered_fps,
        "lag_ms": overall,
        "by_worker": {str(i): {"clients": len(shards[i].clients), **m.report()} for i, m in sorted(lags.items())},
        "kept_up": p99 is not None and p99 <= KEPT_UP_P99_MS,
        "kept_up_p99_ms": KEPT_UP_P99_MS,
    }
