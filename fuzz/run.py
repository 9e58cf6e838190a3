"""`make fuzz`: feed every parser a client or a user can reach --n generated or mutated inputs and count
what happens. Each parser runs in its own forked worker under an address-space cap and a per-input time
limit; crashing and hanging inputs land in fuzz/findings/<parser>/<sha1>.bin with the exception beside them.

    .venv/bin/python fuzz/run.py [--n 10000] [--seed 0] [--parsers frame,quarantine] [--jobs 2]
    .venv/bin/python fuzz/run.py --replay fuzz/findings/frame/<sha1>.bin   # run one saved input again

Exit status 1 if any input crashed or hung a parser, 2 if the fuzzer itself failed to make inputs, else 0.
Findings accumulate across runs (named by content): each stays a regression input after its fix.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this file is started

from targets import TARGETS  # noqa: E402
from worker import ACCEPTED, CRASH, GEN_ERROR, HANG, REFUSED, Job, vm_kib, work  # noqa: E402

HERE = Path(__file__).resolve().parent
GiB = 1 << 30


@dataclass
class Tally:
    """One parser's counts over all its workers (a worker killed by the watchdog is replaced)."""

    tried: int = 0
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys((ACCEPTED, REFUSED, CRASH, HANG, GEN_ERROR), 0)
    )
    peak_rss_kib: int = 0
    base_rss_kib: int = 0
    slowest_s: float = 0.0
    wall_s: float = 0.0
    restarts: int = 0
    findings: list[dict[str, Any]] = field(default_factory=list)
    gen_error_example: str = ""


@dataclass
class Running:
    job: Job
    proc: Any
    conn: Connection
    current: Any
    started: Any
    bar: tqdm
    began: float
    last_index: int = -1
    done: bool = False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000, help="inputs per parser (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="drives every generated input (default 0)")
    p.add_argument("--parsers", default=",".join(TARGETS), help=f"comma-separated, from: {', '.join(TARGETS)}")
    p.add_argument("--jobs", type=int, default=min(len(TARGETS), os.cpu_count() or 1), help="workers at once")
    p.add_argument("--time-limit", type=float, default=2.0, help="seconds per input before it counts as a hang")
    p.add_argument("--mem-limit-gib", type=float, default=2.0, help="address space a worker may add after setup")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    p.add_argument("--findings", type=Path, default=HERE / "findings")
    p.add_argument("--replay", type=Path, help="run one saved input (fuzz/findings/<parser>/<sha1>.bin) and exit")
    args = p.parse_args(argv)
    args.parsers = [s.strip() for s in args.parsers.split(",") if s.strip()]
    unknown = [s for s in args.parsers if s not in TARGETS]
    if unknown:
        p.error(f"unknown parser(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    if args.n < 1 or args.jobs < 1 or args.time_limit <= 0 or args.mem_limit_gib <= 0:
        p.error("--n, --jobs, --time-limit and --mem-limit-gib must be positive")
    return args


def replay(path: Path) -> int:
    parser = path.parent.name
    if parser not in TARGETS:
        print(f"{path}: the folder name should be a parser ({', '.join(TARGETS)})", file=sys.stderr)
        return 2
    harness = TARGETS[parser].setup()
    t0 = time.monotonic()
    try:
        harness.call(path.read_bytes())
        print(f"{parser}: accepted in {time.monotonic() - t0:.3f} s")
        return 0
    except harness.refusal as exc:
        print(f"{parser}: refused cleanly in {time.monotonic() - t0:.3f} s: {exc}"[:2000])
        return 0
    except Exception:
        traceback.print_exc()
        return 1


def start(job: Job, bar: tqdm) -> Running:
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    current, started = ctx.Value("q", job.start, lock=False), ctx.Value("d", -1.0, lock=False)
    proc = ctx.Process(target=work, args=(job, child_end, current, started), name=f"fuzz-{job.parser}", daemon=True)
    proc.start()
    child_end.close()
    return Running(job, proc, parent_end, current, started, bar, time.monotonic(), job.start - 1)


def handle(msg: tuple[str, Any], run: Running, tally: Tally) -> None:
    kind, body = msg
    if kind == "input":
        index, outcome, elapsed, hwm = body
        tally.tried += outcome != GEN_ERROR
        tally.counts[outcome] += 1
        tally.slowest_s = max(tally.slowest_s, elapsed)
        tally.peak_rss_kib = max(tally.peak_rss_kib, hwm)
        run.last_index = index
        run.bar.update(1)
        if outcome in (CRASH, HANG):
            run.bar.set_postfix_str(f"crash {tally.counts[CRASH]} hang {tally.counts[HANG]}", refresh=False)
    elif kind == "gen_error":
        tally.gen_error_example = tally.gen_error_example or body
    elif kind == "finding":
        tally.findings.append(body)
    elif kind == "ready":
        tally.base_rss_kib = max(tally.base_rss_kib, body["base_rss_kib"])
    elif kind == "done":
        tally.peak_rss_kib = max(tally.peak_rss_kib, body["peak_rss_kib"])
        run.done = True


def replace_dead(run: Running, tally: Tally, outcome: str, text: str) -> Job | None:
    """Count the input a worker died on and make the job that goes on after it (None if it was the last)."""
    index = run.last_index + 1
    tally.tried += 1
    tally.counts[outcome] += 1
    tally.restarts += 1
    run.bar.update(1)
    job = run.job
    if index + 1 >= job.stop:
        # nobody left to regenerate it: the parent does it (setup imports torch here, but only at the very end)
        from worker import input_rng, save_finding

        data = TARGETS[job.parser].setup().generate(input_rng(job.seed, job.parser, index))
        tally.findings.append(
            save_finding(job, index, data, outcome, text)
            | {"exc": text.splitlines()[0], "where": "worker ended by the parent"}
        )
        return None
    return Job(**{**job.__dict__, "start": index + 1, "dead_input": (index, outcome, text)})


def fuzz(args: argparse.Namespace) -> dict[str, Tally]:
    tallies = {name: Tally() for name in args.parsers}
    bars = {
        name: tqdm(total=args.n, desc=f"{name:<12}", position=i, unit="in", dynamic_ncols=True, file=sys.stderr)
        for i, name in enumerate(args.parsers)
    }
    mem = int(args.mem_limit_gib * GiB)
    pending = [Job(n, args.seed, 0, args.n, args.time_limit, mem, str(args.findings)) for n in args.parsers]
    running: dict[str, Running] = {}
    # C code cannot be interrupted by SIGALRM: past this the watchdog kills the worker and counts a hang
    hard_limit = max(2 * args.time_limit, args.time_limit + 5)
    while pending or running:
        while pending and len(running) < args.jobs:
            job = pending.pop(0)
            if job.dead_input is None:
                bars[job.parser].reset()  # rate and ETA count from the worker's start, not from the run's
            running[job.parser] = start(job, bars[job.parser])
        for conn in wait([r.conn for r in running.values()], timeout=0.2):
            run = next(r for r in running.values() if r.conn is conn)
            try:
                while conn.poll():
                    handle(conn.recv(), run, tallies[run.job.parser])
            except (EOFError, OSError):
                pass  # the worker is gone; the liveness check below decides what that means
        now = time.monotonic()
        for name, run in list(running.items()):
            tally = tallies[name]
            tally.peak_rss_kib = max(tally.peak_rss_kib, vm_kib("VmHWM", str(run.proc.pid)))
            t0 = run.started.value
            if run.done or not run.proc.is_alive():
                if not run.done:  # drain what it sent before dying, then blame the next input
                    while run.conn.poll(0.05):
                        try:
                            handle(run.conn.recv(), run, tally)
                        except (EOFError, OSError):
                            break
                run.proc.join(5)
                run.conn.close()
                tally.wall_s += now - run.began
                del running[name]
                if run.done:
                    run.bar.close()  # its rate and time stop here, not when the last parser ends
                else:
                    code = run.proc.exitcode
                    why = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
                    nxt = replace_dead(run, tally, CRASH, f"crash: the worker died ({why}) on this input\n")
                    if nxt:
                        pending.insert(0, nxt)
            elif t0 > 0 and now - t0 > hard_limit:
                run.proc.kill()
                run.proc.join(5)
                run.conn.close()
                tally.wall_s += now - run.began
                del running[name]
                text = f"hang: no return after {now - t0:.1f} s (limit {args.time_limit:g} s); the worker was killed\n"
                run.last_index = run.current.value - 1
                nxt = replace_dead(run, tally, HANG, text)
                if nxt:
                    pending.insert(0, nxt)
    for bar in bars.values():
        bar.close()
    return tallies


def report(args: argparse.Namespace, tallies: dict[str, Tally], wall_s: float) -> dict[str, Any]:
    header = ("parser", "tried", "accepted", "refused", "crashes", "hangs", "peak RSS", "slowest", "time")
    rows = [
        (
            name,
            str(t.tried),
            str(t.counts[ACCEPTED]),
            str(t.counts[REFUSED]),
            str(t.counts[CRASH]),
            str(t.counts[HANG]),
            f"{t.peak_rss_kib / 1024:.0f} MiB",
            f"{t.slowest_s:.2f} s",
            f"{t.wall_s:.0f} s",
        )
        for name, t in tallies.items()
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    line = "  ".join
    print(line(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        print(line(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(
        f"\nseed {args.seed}, {args.n} inputs per parser, {args.jobs} worker(s) at once, {wall_s:.0f} s in all. "
        f"Limits per input: {args.time_limit:g} s (hang); per worker: {args.mem_limit_gib:g} GiB of address space "
        "above its size after setup (RLIMIT_AS; an allocation past it is a MemoryError, counted as a crash). "
        "Refused = the parser's documented error: "
        + ", ".join(f"{n} -> {TARGETS[n].refusal_name}" for n in tallies)
        + ". Peak RSS includes the ~400 MiB of torch and the seeds."
    )
    results: dict[str, Any] = {
        "seed": args.seed,
        "n": args.n,
        "time_limit_s": args.time_limit,
        "mem_limit_bytes_above_setup": int(args.mem_limit_gib * GiB),
        "wall_s": round(wall_s, 1),
        "parsers": {},
    }
    for name, t in tallies.items():
        groups: dict[str, dict[str, Any]] = {}
        for f in t.findings:
            key = f"{f['outcome']}: {f['exc'].split(':')[0]} at {f['where']}"
            g = groups.setdefault(key, {"count": 0, "example": f"{name}/{f['sha1']}.bin", "message": f["exc"]})
            g["count"] += 1
        results["parsers"][name] = {
            "entry": TARGETS[name].entry,
            "refusal": TARGETS[name].refusal_name,
            "tried": t.tried,
            **t.counts,
            "peak_rss_mib": round(t.peak_rss_kib / 1024, 1),
            "base_rss_mib": round(t.base_rss_kib / 1024, 1),
            "slowest_input_s": round(t.slowest_s, 3),
            "wall_s": round(t.wall_s, 1),
            "worker_restarts": t.restarts,
            "generator_errors": t.counts[GEN_ERROR],
            "finding_groups": groups,
        }
        if t.counts[GEN_ERROR]:
            print(f"  {name}: the FUZZER failed to make {t.counts[GEN_ERROR]} inputs (skipped):\n{t.gen_error_example}")
        for key, g in groups.items():
            print(f"  {name}: {g['count']} x {key}\n      e.g. findings/{g['example']}: {g['message'][:200]}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replay:
        return replay(args.replay)
    t0 = time.monotonic()
    tallies = fuzz(args)
    results = report(args, tallies, time.monotonic() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}; findings: {args.findings}/<parser>/<sha1>.bin (+ .txt)")
    bad = sum(t.counts[CRASH] + t.counts[HANG] for t in tallies.values())
    broken = sum(t.counts[GEN_ERROR] for t in tallies.values())
    return 1 if bad else 2 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
