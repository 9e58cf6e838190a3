"""iotbed benchmarks. Each figure is a ratio against a baseline measured in the same run, so a noisy or
slower machine shifts both sides alike. Results go to benchmarks/results/ as JSON and Markdown.

    make bench                      # all benchmarks
    .venv/bin/python benchmarks/run.py sim_throughput smart_city
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import simpy

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from iotbed.deployment import build_deployment  # noqa: E402
from iotbed.runner import DRAIN_S, load_model_bytes, prepare, simulate  # noqa: E402
from iotbed.scenario import load_scenario  # noqa: E402
import iotbed  # noqa: E402


def bare_simpy_seconds(n_events: int) -> float:
    """A bare SimPy loop: one process doing `n_events` timeouts, nothing else."""
    env = simpy.Environment()

    def loop(env: simpy.Environment):  # type: ignore[no-untyped-def]
        for _ in range(n_events):
            yield env.timeout(0.001)

    env.process(loop(env))
    start = time.perf_counter()
    env.run()
    return time.perf_counter() - start


def simulated_frames(scenario_path: Path, overrides: list[str]) -> dict[str, Any]:
    """Simulation only (data and model prepared beforehand), with full tracing, against bare SimPy."""
    scenario = load_scenario(scenario_path, overrides)
    resolved, artefacts, _ = prepare(scenario, progress=False)
    deployment = build_deployment(resolved, artefacts, load_model_bytes)
    start = time.perf_counter()
    simulate(deployment, resolved.duration + DRAIN_S, False, resolved.name)
    table = deployment.recorder.to_table()  # tracing includes building the trace table
    seconds = time.perf_counter() - start
    events = next(deployment.env._eid)  # SimPy numbers every scheduled event
    bare = bare_simpy_seconds(events)
    frames = table.num_rows
    return {
        "scenario": scenario_path.name,
        "overrides": overrides,
        "frames": frames,
        "events": events,
        "events_per_frame": events / frames,
        "wall_s": seconds,
        "frames_per_s": frames / seconds,
        "bare_simpy_wall_s": bare,
        "bare_simpy_events_per_s": events / bare,
        "slowdown_vs_bare_simpy": seconds / bare,
    }


def bench_sim_throughput() -> dict[str, Any]:
    quick = ROOT / "scenarios" / "quickstart.yaml"
    runs = [
        simulated_frames(quick, ["nodes.cameras.0.count=100", "nodes.cameras.0.fps=10", "duration=60s"]),
        simulated_frames(quick, ["nodes.cameras.0.count=100", "nodes.cameras.0.fps=10", "duration=60s",
                                 "broker.qos={frames/#: 0}"]),  # fmt: skip
    ]
    return {"target": "at least 10,000 simulated frames per second on one core", "runs": runs}


def bench_smart_city() -> dict[str, Any]:
    """The whole `iotbed run` of the 1,000-camera scenario, as a user runs it (model from the cache)."""
    path = ROOT / "scenarios" / "smart_city_1000_cameras.yaml"
    scenario = load_scenario(path)
    prepare(scenario, progress=False)  # train once if needed; the timed run then reads the cache
    start = time.perf_counter()
    result = iotbed.run(scenario, RESULTS / "smart_city_run", progress=False, force=True)
    wall = time.perf_counter() - start
    bare = bare_simpy_seconds(result.summary["frames"]["captured"])
    return {
        "target": "under 60 s of wall-clock time on a 2-core machine",
        "frames": result.summary["frames"]["captured"],
        "delivered": result.summary["frames"]["delivered"],
        "wall_s": wall,
        "frames_per_s": result.summary["frames"]["captured"] / wall,
        "bare_simpy_one_timeout_per_frame_s": bare,
        "slowdown_vs_one_bare_timeout_per_frame": wall / bare,
    }


def bench_sweep_speedup() -> dict[str, Any]:
    """The same 16-run sweep on 1 and on 2 local workers, each in a fresh folder."""
    import tempfile

    from iotbed.sweep import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep.yaml"
        sweep.write_text(f"""
name: speedup
scenario: {ROOT / 'scenarios' / 'quickstart.yaml'}
replications: 4
grid:
  links.0.loss: [0.0, 0.01, 0.02, 0.05]
set: {{duration: 60s}}
""")
        times = {}
        for workers in (1, 2):
            start = time.perf_counter()
            result = run_sweep(sweep, Path(tmp) / f"w{workers}", workers=workers, progress=False)
            times[workers] = time.perf_counter() - start
            assert (result.records["status"] == "ok").all()
    return {
        "target": "speed-up of at least 1.7x on 2 workers",
        "runs": 16,
        "wall_s_1_worker": times[1],
        "wall_s_2_workers": times[2],
        "speedup": times[1] / times[2],
    }


BENCHMARKS: dict[str, Callable[[], dict[str, Any]]] = {
    "sim_throughput": bench_sim_throughput,
    "smart_city": bench_smart_city,
    "sweep_speedup": bench_sweep_speedup,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    names = parser.parse_args().names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    for name in names:
        print(f"== {name}", flush=True)
        result = {"benchmark": name, "machine": machine, **BENCHMARKS[name]()}
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
