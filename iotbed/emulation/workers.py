"""Spreading a live run's clients over worker processes, and putting their results back together.

One Python process runs every paho network thread and the SimPy thread under one interpreter lock. Past a
load (`PROCESS_CAPACITY_FPS`, measured by `benchmarks/run.py emulate_workers`) it falls behind the wall
clock and frames wait in it, not in the network. Then the run is split into shards: the edge servers and
the registry in one worker, the cameras dealt round robin over the others. In `--netns` runs every node
group is a shard of its own (a worker enters its group's network namespace before it opens a socket).

The parent builds the whole deployment once, forks one worker per shard (each inherits the data, the
model and the nodes, and starts only its own), and hands them one shared start instant on the system's
monotonic clock, so simulated time 0 is the same wall-clock instant in every worker and timestamps from
different workers can be subtracted. Each worker sends back its share: the records of the frames it
captured (camera workers number them `k * shards + shard`) or the edge's side of the frames it received
(keyed by the frame id that travelled in the frame's header), the tables of its nodes (`live_tables`:
edge tallies, screens, repairs, its clients' counters, and the offline scores of the models it holds, so
no model travels) and its lag behind the wall clock. The parent joins the frame records, concatenates the
tables and numbers the frames anew, so the summary and the files are made as for a one-process run.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from iotbed.broker.realtime import LagMeter
from iotbed.emulation.live import UNFINISHED_WORK_WAIT_S, LiveDeployment, live_tables, shaped_link
from iotbed.errors import IotbedError, UsageError
from iotbed.run_tables import NodeTables
from iotbed.runner import one_torch_thread
from iotbed.sim.trace import EDGE_FIELDS, KEY_OWNER_FIELDS, FrameRecord

# Frames per second one process carries through Mosquitto while keeping its lag behind the wall clock
# small (`benchmarks/run.py emulate_workers`, 2-core machine); `--workers auto` splits runs above it.
PROCESS_CAPACITY_FPS = 1500.0
# Clients one process can hold: paho's network loop waits in select(), which takes no file descriptor above
# 1023, and every client holds three (its socket and a socket pair to wake its loop).
MAX_CLIENTS_PER_PROCESS = 250
START_MARGIN_S = 0.3  # from "go" to simulated time 0: every worker has the start instant by then
SILENT_S = 60.0  # a worker that reports nothing for this long has hung
# A worker past the run's end waits for its unfinished screens and repairs, then measures its models.
FINISHING_S = UNFINISHED_WORK_WAIT_S + 300.0


@dataclass(frozen=True)
class Shard:
    index: int
    clients: tuple[str, ...]
    namespace: str | None = None  # a network namespace to enter first (--netns)
    edges: bool = False  # holds edge servers: records arrive keyed by frame id


def plan_shards(live: LiveDeployment, workers: int, namespaces: dict[str, str] | None = None) -> list[Shard]:
    """`namespaces`: client id -> the namespace its node lives in (a --netns run): the clients of each
    namespace in shards of their own, the edge side apart from the cameras. Otherwise `workers` shards: the
    edge servers and the registry in the first, cameras dealt round robin over the rest. No shard holds more
    than `MAX_CLIENTS_PER_PROCESS` clients."""
    edges = {e.name for e in live.edges}
    on_cameras = {c.name for c in live.cameras}
    servers = [c for c in live.transports if c not in on_cameras]  # edges, gateways, registry, rogue publishers
    cameras = [c.name for c in live.cameras]
    if namespaces is not None:
        groups: list[tuple[str | None, list[str], bool]] = []
        for ns in sorted(set(namespaces.values())):
            mine = [c for c in servers if namespaces[c] == ns]
            if mine:
                groups.append((ns, mine, True))
            theirs = [c for c in cameras if namespaces[c] == ns]
            parts = math.ceil(len(theirs) / MAX_CLIENTS_PER_PROCESS)
            groups += [(ns, theirs[k::parts], False) for k in range(parts)]
        return [Shard(i, tuple(clients), ns, server) for i, (ns, clients, server) in enumerate(groups)]
    if workers <= 1:
        everyone = [*servers, *cameras]
        _fits(len(everyone), workers, len(cameras))
        return [Shard(0, tuple(everyone), None, bool(edges))]
    camera_shards = max(1, workers - 1)
    _fits(math.ceil(len(cameras) / camera_shards), workers, len(cameras))
    if len(servers) > MAX_CLIENTS_PER_PROCESS:
        raise UsageError(
            f"{len(servers)} edge servers and the registry do not fit one process (at most "
            f"{MAX_CLIENTS_PER_PROCESS} clients); live runs take fewer edge servers"
        )
    shards = [Shard(0, tuple(servers), None, True)] if servers else []
    for k in range(camera_shards):
        chosen = tuple(cameras[k::camera_shards])
        if chosen:
            shards.append(Shard(len(shards), chosen))
    return shards


def _fits(clients: int, workers: int, cameras: int) -> None:
    if clients > MAX_CLIENTS_PER_PROCESS:
        needed = 1 + math.ceil(cameras / MAX_CLIENTS_PER_PROCESS)
        raise UsageError(
            f"--workers {workers} puts {clients} MQTT clients in one process; one process holds at most "
            f"{MAX_CLIENTS_PER_PROCESS} (paho waits in select(), which stops at 1,024 file "
            f"descriptors): use --workers {needed} or --workers auto"
        )


def auto_workers(offered_fps: float, clients: int, cameras: int, cpus: int | None = None) -> int:
    """One process up to `PROCESS_CAPACITY_FPS` and `MAX_CLIENTS_PER_PROCESS` clients; above either, the edge
    side in one worker and enough camera workers for the load (at most one per CPU) and for the clients."""
    cpus = cpus or os.cpu_count() or 1
    by_clients = 1 if clients <= MAX_CLIENTS_PER_PROCESS else 1 + math.ceil(cameras / MAX_CLIENTS_PER_PROCESS)
    by_load = 1
    if offered_fps > PROCESS_CAPACITY_FPS and cpus >= 2:
        by_load = int(min(cpus, 1 + math.ceil(offered_fps / PROCESS_CAPACITY_FPS)))
    return max(by_load, by_clients)


@dataclass
class ShardResult:
    index: int
    # Frame records, column by column: 200,000 of them pickle and unpickle in 40% less time than as objects.
    columns: dict[str, list[Any]]
    edge_side: bool
    tables: NodeTables
    lag: LagMeter


@dataclass
class ShardRun:
    shard: Shard
    process: Any
    conn: Connection
    sim_now: float = 0.0
    frames: int = 0
    finishing: bool = False  # past the run's end, measuring its models
    result: ShardResult | None = None


def _columns(records: list[FrameRecord]) -> dict[str, list[Any]]:
    return {name: [getattr(r, name) for r in records] for name in FrameRecord.__slots__}


def _worker(
    live: LiveDeployment, shard: Shard, shards: int, end_s: float, conn: Connection, enter: Callable[[str], None] | None
) -> None:
    """A forked worker: enter the namespace, start this shard's nodes, wait for the start instant, run."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        if shard.namespace is not None and enter is not None:
            enter(shard.namespace)
        recorder = live.recorder
        if shard.edges:
            recorder.take_arrivals()
        recorder.first_id, recorder.id_step = shard.index, shards
        live.start(shard.clients)
        conn.send(("ready", shard.index))
        _, start_at = conn.recv()
        env = live.env
        env.real_start = start_at  # simulated 0 is this monotonic instant in every worker
        with one_torch_thread():
            for until in progress_steps(end_s):
                env.run(until=until)
                conn.send(("progress", shard.index, env.now, len(recorder.records)))
        conn.send(("finishing", shard.index))
        live.close()
        # One torch thread, as during the run: a forked child that starts torch's thread pool can hang in it.
        with one_torch_thread():
            tables = live_tables(live, shard.clients, end_s)
        conn.send(
            ("result", ShardResult(shard.index, _columns(recorder.frames()), shard.edges, tables, live.bridge.lag))
        )
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        # A problem the user can act on travels as its message; anything else with its traceback.
        text = str(exc) if isinstance(exc, IotbedError) else traceback.format_exc()
        try:
            conn.send(("error", shard.index, text))
        except OSError:
            pass
    finally:
        conn.close()


def run_sharded(
    live: LiveDeployment,
    shards: list[Shard],
    end_s: float,
    *,
    enter: Callable[[str], None] | None = None,
    parent_env_hook: Callable[[], None] | None = None,
    on_progress: Callable[[float, int], None] | None = None,
) -> list[ShardResult]:
    """Fork a worker per shard, start them together, wait for their results. `parent_env_hook` starts what
    the parent itself runs on its copy of the environment (the broker's faults) before the start instant."""
    ctx = multiprocessing.get_context("fork")
    runs: list[ShardRun] = []
    try:
        for shard in shards:
            parent_conn, child_conn = ctx.Pipe()
            process = ctx.Process(
                target=_worker,
                args=(live, shard, len(shards), end_s, child_conn, enter),
                name=f"iotbed-shard-{shard.index}",
                daemon=True,
            )
            process.start()
            child_conn.close()
            runs.append(ShardRun(shard, process, parent_conn))
        for run in runs:
            _expect(run, "ready", timeout_s=120.0)
        start_at = time.monotonic() + START_MARGIN_S
        for run in runs:
            run.conn.send(("go", start_at))
        env = live.env
        env.real_start = start_at
        if parent_env_hook is not None:
            parent_env_hook()
        _follow(runs, env, end_s, on_progress)
    except BaseException:
        for run in runs:
            if run.process.is_alive():
                run.process.terminate()
        raise
    finally:
        for run in runs:
            run.process.join(timeout=10)
            if run.process.is_alive():
                run.process.kill()
                run.process.join()
            run.conn.close()
    return [run.result for run in runs if run.result is not None]


def progress_steps(end_s: float, most_s: float = 1.0) -> list[float]:
    """Where a run pauses to report progress: every 1% of it, and at least once a second."""
    n = max(100, math.ceil(end_s / most_s))
    return [end_s * k / n for k in range(1, n + 1)]


def _expect(run: ShardRun, kind: str, timeout_s: float) -> Any:
    try:
        if not run.conn.poll(timeout_s):
            raise IotbedError(f"worker {run.shard.index} did not report `{kind}` within {timeout_s:.0f} s")
        message = run.conn.recv()
    except (EOFError, OSError):
        run.process.join(timeout=5)
        raise IotbedError(
            f"worker {run.shard.index} ended before it was {kind} (exit code {run.process.exitcode})"
        ) from None
    if message[0] == "error":
        raise IotbedError(f"worker {run.shard.index}: {message[2]}")
    return message


def _follow(runs: list[ShardRun], env: Any, end_s: float, on_progress: Callable[[float, int], None] | None) -> None:
    """Run the parent's environment (broker faults) in step with the workers and collect what they send."""
    pending = {run.conn: run for run in runs}
    heard = [time.monotonic()]  # when a worker last said anything: one silent for a minute has hung

    def drain(timeout: float) -> None:
        for conn in wait(list(pending), timeout=timeout):
            heard[0] = time.monotonic()
            run = pending[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                del pending[conn]
                run.process.join(timeout=5)
                raise IotbedError(
                    f"worker {run.shard.index} ended without a result (exit code {run.process.exitcode})"
                ) from None
            if message[0] == "progress":
                run.sim_now, run.frames = message[2], message[3]
            elif message[0] == "finishing":
                run.finishing = True
            elif message[0] == "result":
                run.result = message[1]
                del pending[conn]
            elif message[0] == "error":
                raise IotbedError(f"worker {run.shard.index}: {message[2]}")
        if on_progress is not None:
            on_progress(min(r.sim_now for r in runs), sum(r.frames for r in runs if not r.shard.edges))

    step = 0.05
    while env.now < end_s:
        env.run(until=min(end_s, env.now + step))
        drain(0)
    while pending:  # workers that fell behind the wall clock finish later than the parent
        silent_s = FINISHING_S if any(r.finishing for r in pending.values()) else SILENT_S
        if time.monotonic() - heard[0] > silent_s:
            raise IotbedError(
                f"worker(s) {sorted(r.shard.index for r in pending.values())} sent nothing for "
                f"{silent_s:.0f} s after the run's end; they were stopped"
            )
        drain(0.2)


def merge(
    live: LiveDeployment, results: list[ShardResult], own: NodeTables | None = None
) -> tuple[NodeTables, dict[int, int]]:
    """Put the workers' shares together: frame records (camera side and edge side, joined on the frame id
    that travelled) into the parent's recorder, numbered anew in capture order; their tables, with `own`
    (what this process itself recorded), concatenated in node order, the screened frames renumbered.
    Returns the tables and the old id -> new id map."""
    captured: list[FrameRecord] = []
    arrivals: dict[int, dict[str, Any]] = {}
    ordered = sorted(results, key=lambda r: r.index)
    for result in ordered:
        cols = result.columns
        n = len(cols["frame_id"])
        if result.edge_side:
            for k in range(n):
                fid = cols["frame_id"][k]
                side = {name: cols[name][k] for name in EDGE_FIELDS}
                seen = arrivals.get(fid)
                if seen is not None:  # several edge servers got it (no shared subscription): as within one
                    duplicates = seen["duplicates"] + side["duplicates"]  # process, the later one's verdict stands
                    if side["t_edge"] < seen["t_edge"]:
                        side = seen
                    side["duplicates"] = duplicates
                arrivals[fid] = side
        else:
            for k in range(n):
                record = FrameRecord.__new__(FrameRecord)
                for name in FrameRecord.__slots__:
                    setattr(record, name, cols[name][k])
                captured.append(record)
    index = {c.name: c.index for c in live.cameras}
    captured.sort(key=lambda r: (r.t_capture, index.get(r.camera, 0), r.frame_id))
    renumbered: dict[int, int] = {}
    for new_id, record in enumerate(captured):
        side = arrivals.get(record.frame_id)
        if side is not None:
            for name, value in side.items():
                if not (record.encrypted and name in KEY_OWNER_FIELDS):
                    setattr(record, name, value)
        renumbered[record.frame_id] = new_id
        record.frame_id = new_id
    live.recorder.records = captured
    tables = NodeTables.concat([own or NodeTables(), *(r.tables for r in ordered)])
    _in_node_order(live, tables)
    tables.screened = [dataclasses.replace(f, frame_id=renumbered.get(f.frame_id, -1)) for f in tables.screened]
    return tables, renumbered


def _in_node_order(live: LiveDeployment, tables: NodeTables) -> None:
    """Sort merged rows as one process lists them: by node in the order the nodes were built (the sort is
    stable, so each node's own rows keep their order); model events by time."""
    rank = {client: i for i, client in enumerate(live.transports)}
    links = {shaped_link(name): i for i, name in enumerate(live.shapers)}
    tables.edges.sort(key=lambda e: rank[e.name])
    tables.screens.sort(key=lambda s: rank[s.gateway])
    tables.screened.sort(key=lambda f: rank[f.gateway])
    tables.calibration.sort(key=lambda c: rank[c.gateway])
    tables.repairs.sort(key=lambda r: rank[r.edge])
    tables.clients.sort(key=lambda c: rank[c["client"]])
    tables.links.sort(key=lambda row: links[row["link"]])
    tables.model_events.sort(key=lambda e: (e.time_s, e.node))
