"""The child process that feeds one parser its inputs, under a memory cap and a per-input time limit.

It reports each input's outcome to the parent over a pipe (sent between inputs, never during a parser call,
so a kill by the parent's watchdog cannot leave half a message) and saves crashing and hanging inputs.
"""

from __future__ import annotations

import hashlib
import random
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ACCEPTED, REFUSED, CRASH, HANG = "accepted", "refused", "crash", "hang"
GEN_ERROR = "generator_error"  # the fuzzer failed to make input i; not a parser outcome


class InputTimeout(BaseException):
    """Raised by SIGALRM inside a parser call. A BaseException so a parser's `except Exception` cannot eat it."""


@dataclass(frozen=True)
class Job:
    parser: str
    seed: int
    start: int  # first input index this worker runs (after a restart, the one past the input that killed it)
    stop: int
    time_limit_s: float
    mem_limit_bytes: int
    findings_dir: str
    # an input the previous worker died on: (index, outcome, text), saved by this one (it can regenerate it)
    dead_input: tuple[int, str, str] | None = None


def input_rng(seed: int, parser: str, index: int) -> random.Random:
    # a str seed is hashed with SHA-512 by `random`: the same input on every machine and Python run
    return random.Random(f"{seed}:{parser}:{index}")


def vm_kib(field: str, pid: str = "self") -> int:
    """A /proc/<pid>/status field in KiB (VmSize, VmHWM, ...), 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def save_finding(job: Job, index: int, data: bytes, outcome: str, text: str) -> dict[str, Any]:
    sha = hashlib.sha1(data).hexdigest()
    folder = Path(job.findings_dir) / job.parser
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{sha}.bin").write_bytes(data)
    head = f"parser: {job.parser}\noutcome: {outcome}\nseed: {job.seed}\nindex: {index}\nsize: {len(data)} bytes\n\n"
    (folder / f"{sha}.txt").write_text(head + text)
    return {"sha1": sha, "index": index, "outcome": outcome, "size": len(data)}


def _where(exc: BaseException) -> str:
    """The innermost frame in iotbed code (else the innermost one): groups findings by their cause."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.endswith("fuzz/worker.py")]
    own = [f for f in frames if "/iotbed/" in f.filename] or frames
    if not own:
        return "?"
    f = own[-1]
    return f"{f.filename.split('/iotbed/')[-1] if '/iotbed/' in f.filename else f.filename}:{f.lineno} in {f.name}"


def _on_alarm(signum: int, frame: Any) -> None:
    raise InputTimeout


def work(job: Job, conn: Connection, current: Any, started: Any) -> None:
    """Run inputs job.start..job.stop-1. `current`/`started` (shared values) tell the parent's watchdog which
    input is running and since when, so it can kill a worker stuck in C code that SIGALRM cannot interrupt."""
    import torch

    torch.set_num_threads(1)  # one core per worker; each thread would also reserve address space
    from targets import TARGETS

    harness = TARGETS[job.parser].setup()
    if job.dead_input is not None:
        index, outcome, text = job.dead_input
        data = harness.generate(input_rng(job.seed, job.parser, index))
        info = save_finding(job, index, data, outcome, text)
        conn.send(("finding", info | {"exc": text.splitlines()[0], "where": "worker ended by the parent"}))
    # The cap counts from the worker's size after setup (torch alone maps about 1 GiB): a parser may use
    # mem_limit_bytes more before an allocation fails with MemoryError instead of swapping the machine.
    base_kib = vm_kib("VmSize")
    limit = base_kib * 1024 + job.mem_limit_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send(("ready", {"base_rss_kib": vm_kib("VmRSS"), "base_vm_kib": base_kib}))

    try:
        _loop(job, harness, conn, current, started)
    finally:
        harness.cleanup()
    conn.send(("done", {"peak_rss_kib": vm_kib("VmHWM")}))


def _loop(job: Job, harness: Any, conn: Connection, current: Any, started: Any) -> None:
    for index in range(job.start, job.stop):
        try:
            data = harness.generate(input_rng(job.seed, job.parser, index))
        except Exception:  # a bug in the fuzzer, not in the parser: reported apart, never fed
            conn.send(("gen_error", traceback.format_exc(limit=-3)))
            conn.send(("input", (index, GEN_ERROR, 0.0, vm_kib("VmHWM"))))
            continue
        current.value = index
        t0 = time.monotonic()
        started.value = t0
        exc_text, where = "", ""
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, job.time_limit_s)
                harness.call(data)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            outcome = ACCEPTED
        except InputTimeout as exc:
            outcome, where = HANG, _where(exc)
            exc_text = f"hang: over the {job.time_limit_s:g} s limit, interrupted at {where}\n"
            exc_text += "".join(traceback.format_tb(exc.__traceback__)[-8:])
        except harness.refusal:
            outcome = REFUSED
        except BaseException as exc:  # anything else, MemoryError and RecursionError included, is a crash
            outcome, where = CRASH, _where(exc)
            exc_text = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:2000] + "\n"
            exc_text += "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-12:])
            del exc
        elapsed = time.monotonic() - t0
        started.value = -1.0
        if outcome in (CRASH, HANG):
            info = save_finding(job, index, data, outcome, exc_text)
            conn.send(("finding", info | {"exc": exc_text.splitlines()[0][:300], "where": where}))
        conn.send(("input", (index, outcome, elapsed, vm_kib("VmHWM"))))
