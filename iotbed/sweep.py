"""Sweeps: one base scenario run over a grid of parameters and replications, locally or on Dask.

A sweep file names the base scenario, parameters by dotted path (a `grid` is crossed, a `zip` is varied
together) and a number of replications. Replication r of every point gets the same seed, spawned from
the sweep seed with `SeedSequence.spawn`, so points are compared on common random numbers. Each run keeps
its own folder; a run is complete once its `summary.json` exists, so an interrupted sweep resumes with
what is missing. One failing run is recorded with its error and does not stop the others.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import Field, ValidationError, model_validator
from tqdm import tqdm

from iotbed.errors import IotbedError, ScenarioError
from iotbed.scenario import Strict, load_scenario
from iotbed.scenario.loading import load_yaml


class SweepSpec(Strict):
    name: str
    scenario: str = Field(description="the base scenario file, relative to the sweep file")
    seed: int = 0
    replications: int = Field(1, ge=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted path -> values, crossed")
    zip: dict[str, list[Any]] = Field(default_factory=dict, description="dotted path -> values, varied together")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted path -> value, for every run")
    plots: list[str] = Field(
        default_factory=list,
        description="figures drawn into the sweep folder when it ends, e.g. bandwidth_vs_robustness",
    )

    @model_validator(mode="after")
    def _shapes(self) -> SweepSpec:
        for path, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{path} has no values")
        lengths = {len(v) for v in self.zip.values()}
        if len(lengths) > 1:
            raise ValueError(f"zip lists must have one length; got {sorted(lengths)}")
        if lengths == {0}:
            raise ValueError("zip lists are empty")
        from iotbed.analysis.plots import PLOTS

        for kind in self.plots:
            if kind not in PLOTS:
                raise ValueError(f"plots: unknown kind {kind!r}; kinds: {', '.join(PLOTS)}")
        shared = set(self.grid) & set(self.zip) | (set(self.grid) | set(self.zip)) & set(self.set)
        if shared:
            raise ValueError(f"{', '.join(sorted(shared))} appear in more than one of grid, zip and set")
        return self


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    point: int
    replication: int
    seed: int
    params: dict[str, Any]
    scenario_path: str
    overrides: tuple[str, ...]
    out_dir: str


def _override(path: str, value: Any) -> str:
    # YAML flow style keeps mappings and lists as one `--set` value, read back by the scenario loader.
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"{path}={text.removesuffix('...').strip()}"


def load_sweep(path: str | Path) -> tuple[SweepSpec, Path]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such sweep file") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not UTF-8 text; save the sweep file as UTF-8") from None
    _, data = load_yaml(text, str(path))  # the scenario loader's bounds: depth, aliases, size, duplicate keys
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise ScenarioError(f"{path}: the sweep is not valid: {problems}") from None
    scenario = (path.parent / spec.scenario).resolve()
    if not scenario.is_file():
        raise ScenarioError(f"{path}: scenario `{spec.scenario}` not found (looked for {scenario})")
    return spec, scenario


def replication_seeds(seed: int, replications: int) -> list[int]:
    return [
        int(child.generate_state(1, dtype=np.uint32)[0]) for child in np.random.SeedSequence(seed).spawn(replications)
    ]


def points(spec: SweepSpec) -> list[dict[str, Any]]:
    grid_paths = list(spec.grid)
    grid_rows = [dict(zip(grid_paths, values)) for values in itertools.product(*spec.grid.values())] or [{}]
    zip_paths = list(spec.zip)
    zip_rows = [dict(zip(zip_paths, values)) for values in zip(*spec.zip.values())] or [{}]
    return [{**g, **z} for g in grid_rows for z in zip_rows]


def plan(spec: SweepSpec, scenario: Path, out_dir: Path) -> list[RunSpec]:
    runs = []
    seeds = replication_seeds(spec.seed, spec.replications)
    fixed = [_override(path, value) for path, value in spec.set.items()]
    for p, params in enumerate(points(spec)):
        for r, seed in enumerate(seeds):
            run_id = f"p{p:03d}-r{r:02d}"
            overrides = (*fixed, *(_override(k, v) for k, v in params.items()), f"seed={seed}")
            runs.append(RunSpec(run_id, p, r, seed, params, str(scenario), overrides, str(out_dir / "runs" / run_id)))
    return runs


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out[prefix] = value


def summary_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary flattened to `section.key` columns (lists such as model events are left out)."""
    flat: dict[str, Any] = {}
    _flatten("", summary, flat)
    return flat


def execute(run: RunSpec) -> dict[str, Any]:
    """Run one point in this process; never raises, so one failure cannot stop a sweep."""
    from iotbed.runner import run as run_scenario

    record: dict[str, Any] = {
        "run_id": run.run_id,
        "point": run.point,
        "replication": run.replication,
        "seed": run.seed,
        **{f"param.{k}": _cell(v) for k, v in run.params.items()},
    }
    out = Path(run.out_dir)
    try:
        scenario = load_scenario(run.scenario_path, run.overrides)
        result = run_scenario(scenario, out, progress=False, force=True)
        record.update({"status": "ok", "error": ""}, **summary_record(result.summary))
    except Exception as exc:  # noqa: BLE001 - a sweep records every failure and goes on
        out.mkdir(parents=True, exist_ok=True)
        detail = str(exc) if isinstance(exc, IotbedError) else traceback.format_exc()
        (out / "error.txt").write_text(detail, encoding="utf-8")
        message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        record.update({"status": "failed", "error": message or type(exc).__name__})
    return record


def _cell(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


def completed_record(run: RunSpec) -> dict[str, Any] | None:
    summary_path = Path(run.out_dir) / "summary.json"
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {
        "run_id": run.run_id,
        "point": run.point,
        "replication": run.replication,
        "seed": run.seed,
        **{f"param.{k}": _cell(v) for k, v in run.params.items()},
        "status": "ok",
        "error": "",
        **summary_record(summary),
    }


def _worker_init() -> None:
    # One BLAS thread per worker: processes, not threads, share the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _context() -> Any:
    """Fork on Linux: workers start with iotbed, torch and the rest already imported
    (spawning re-imported them, 3.6 s a worker, a fifth of a 16-run sweep). Safe here as in torch's own
    DataLoader workers: each worker runs torch on one thread (`_worker_init`), so no OpenMP pool is used
    across the fork."""
    import multiprocessing

    # Linux only: macOS offers fork, but its system libraries are not fork-safe (Python's default there is spawn).
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _local(runs: list[RunSpec], workers: int) -> Iterator[dict[str, Any]]:
    if workers == 1:
        for run in runs:
            yield execute(run)
        return

    with ProcessPoolExecutor(workers, mp_context=_context(), initializer=_worker_init) as pool:
        pending: set[Future[dict[str, Any]]] = {pool.submit(execute, run) for run in runs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def _dask(runs: list[RunSpec], address: str | None) -> Iterator[dict[str, Any]]:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise IotbedError("--cluster needs Dask: pip install 'dask[distributed]'") from None
    try:
        client = Client(address, timeout="10s") if address else None
    except OSError as exc:
        raise IotbedError(f"--cluster {address}: cannot reach the Dask scheduler ({exc})") from None
    assert client is not None
    try:
        futures = client.map(execute, runs, pure=False)
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.close()


@dataclass
class SweepResult:
    out_dir: Path
    records: pd.DataFrame
    executed: list[str]
    figures: list[Path] = field(default_factory=list)


def _prepare_models(runs: list[RunSpec]) -> None:
    """Train each distinct model once, here, before workers start (they then read it from the cache)."""
    from iotbed.runner import prepare

    seen: set[str] = set()
    for run in runs:
        scenario = load_scenario(run.scenario_path, run.overrides)
        nodes = scenario.nodes
        key = json.dumps(
            [
                scenario.dataset.model_dump(mode="json"),
                scenario.model.model_dump(mode="json"),
                scenario.registry.model_dump(mode="json"),
                # what else `prepare` trains, or what changes the training split (the defenders' clean pool)
                [g.model_dump(mode="json") for g in nodes.clouds],
                [(e.reject, e.repair, e.defed) for e in nodes.edge_servers],
                [(g.strip, g.sentinet) for g in nodes.gateways],
            ],
            sort_keys=True,
            default=lambda spec: spec.model_dump(mode="json"),
        )
        if key not in seen:
            seen.add(key)
            prepare(scenario, progress=True)


def run_sweep(
    path: str | Path,
    out_dir: str | Path | None = None,
    *,
    workers: int = 1,
    cluster: str | None = None,
    progress: bool = True,
) -> SweepResult:
    spec, scenario = load_sweep(path)
    target = Path(out_dir) if out_dir is not None else Path("runs") / f"sweep-{spec.name}"
    target.mkdir(parents=True, exist_ok=True)
    (target / "sweep.resolved.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    runs = plan(spec, scenario, target)
    records = {}
    todo = []
    for run in runs:
        done = completed_record(run)
        if done is not None:
            records[run.run_id] = done
        else:
            todo.append(run)
    _prepare_models([r for r in todo if _loads(r)])  # invalid points fail in `execute`, recorded like any failure
    stream = _dask(todo, cluster) if cluster else _local(todo, workers)
    with tqdm(
        total=len(runs),
        initial=len(runs) - len(todo),
        unit="run",
        desc=spec.name,
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for record in stream:
            records[record["run_id"]] = record
            bar.update(1)
    frame = pd.DataFrame([records[r.run_id] for r in runs])
    write_tables(frame, target)
    figures = draw_plots(spec, target)
    return SweepResult(target, frame, [r.run_id for r in todo], figures)


def draw_plots(spec: SweepSpec, target: Path) -> list[Path]:
    """The sweep's `plots:`, into the sweep folder; a figure that cannot be drawn is reported, not fatal."""
    from iotbed.analysis.plots import plot

    figures: list[Path] = []
    for kind in spec.plots:
        try:
            figures += plot(kind, target, target, ("png", "svg"))
        except IotbedError as exc:
            print(f"plot {kind}: {exc}", file=sys.stderr)
    return figures


def _loads(run: RunSpec) -> bool:
    try:
        load_scenario(run.scenario_path, run.overrides)
        return True
    except ScenarioError:
        return False


def write_tables(frame: pd.DataFrame, target: Path) -> None:
    from iotbed.analysis.stats import aggregate

    frame.to_csv(target / "sweep.csv", index=False)
    frame.to_parquet(target / "sweep.parquet", index=False)
    aggregate(frame).to_csv(target / "sweep_summary.csv", index=False)
