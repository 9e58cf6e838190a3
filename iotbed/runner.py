"""Run a scenario in simulation: prepare data and models, build the deployment, advance the clock, and
write the results (`scenario.resolved.yaml`, `trace.parquet`, `summary.json`, `links.csv`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from iotbed.analysis.summary import broker_stats, link_rows, summarise
from iotbed.deployment import Artefacts, Deployment, build_deployment
from iotbed.errors import IotbedError
from iotbed.nodes.payloads import ModelUpdate
from iotbed.nodes.registry import ScheduledUpdate
from iotbed.scenario import Scenario, TrainSpec, resolved_yaml
from iotbed.sim.trace import TraceRecorder

# Frames still travelling when cameras stop get this long to arrive before the run ends.
DRAIN_S = 5.0


@dataclass
class RunResult:
    scenario: Scenario
    summary: dict[str, Any]
    trace_table: pa.Table
    out_dir: Path | None

    @property
    def trace(self) -> pd.DataFrame:
        return self.trace_table.to_pandas()


def _train_config(spec: TrainSpec, arch: str, dataset_name: str):  # type: ignore[no-untyped-def]
    from iotbed.models import default_train_config

    base = default_train_config(arch, dataset_name)
    return dataclasses.replace(base, **{k: v for k, v in spec.model_dump().items() if v is not None})


def prepare(scenario: Scenario, *, progress: bool = True) -> tuple[Scenario, Artefacts, dict[str, Any]]:
    """Load the dataset and train (or fetch from the cache) the models; returns the scenario with every
    training setting filled in, the artefacts, and what to report about the model."""
    from iotbed.data import load_splits
    from iotbed.models import count_flops, get_or_train, model_to_bytes

    ds = scenario.dataset
    splits = load_splits(ds.name, ds.path, seed=ds.split_seed, image_size=ds.image_size)
    arch = scenario.model.arch
    config = _train_config(scenario.model.train, arch, ds.name)
    trained = get_or_train(arch, splits.train, config, test_ds=splits.test, progress=progress)
    filled_train = TrainSpec(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                             optimizer=config.optimizer, seed=config.seed)  # fmt: skip
    updates = []
    for i, update in enumerate(scenario.registry.updates):
        update_config = _train_config(update.train, arch, ds.name)
        updated = get_or_train(arch, splits.train, update_config, test_ds=splits.test, progress=progress)
        blob = model_to_bytes(updated.model, {"version": str(i + 2)})
        updates.append(ScheduledUpdate(update.at, ModelUpdate(i + 2, blob)))
    resolved = scenario.model_copy(update={"model": scenario.model.model_copy(update={"train": filled_train})})
    image_shape = tuple(int(x) for x in splits.test.images.shape[1:])
    flops = count_flops(trained.model, (1, *image_shape))
    # Cameras send 8-bit pixels; the edge classifies exactly those, in simulation as on a real broker.
    captured = (splits.test.images * 255.0).round() / 255.0
    artefacts = Artefacts(captured, splits.test.labels.numpy(), trained.model, float(flops), tuple(updates))
    model_info = {
        "arch": trained.arch,
        "cache_key": trained.key,
        "test_accuracy": trained.test_accuracy,
        "flops_per_image": flops,
        "dataset": ds.name,
        "train_images": len(splits.train),
        "test_images": len(splits.test),
    }
    return resolved, artefacts, model_info


def load_model_bytes(blob: bytes) -> torch.nn.Module:
    from iotbed.models import model_from_bytes

    return model_from_bytes(blob)[0]


def simulate(deployment: Deployment, until_s: float, progress: bool, label: str) -> None:
    """Advance the clock to `until_s` in steps, with a progress bar in simulated seconds."""
    env = deployment.env
    steps = 100
    with tqdm(total=steps, desc=label, disable=not progress, file=sys.stderr,
              bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]") as bar:  # fmt: skip
        for i in range(1, steps + 1):
            env.run(until=until_s * i / steps)
            bar.set_postfix_str(f"{env.now:.1f}/{until_s:.1f} sim-s, {len(deployment.recorder.records)} frames",
                                refresh=False)  # fmt: skip
            bar.update(1)


def run(scenario: Scenario, out_dir: str | Path | None = None, *, progress: bool = True, write: bool = True,
        force: bool = False, on_status: Callable[[str], None] | None = None) -> RunResult:  # fmt: skip
    """Run `scenario` in simulation and return its summary and trace; with `write`, also write the files."""
    wall_start = time.perf_counter()
    target = output_dir(scenario, out_dir, force) if write else None
    resolved, artefacts, model_info = prepare(scenario, progress=progress)
    if on_status is not None:
        on_status(f"model {model_info['arch']}: test accuracy {model_info['test_accuracy']:.4f}")
    deployment = build_deployment(resolved, artefacts, load_model_bytes)
    sim_end = resolved.duration + DRAIN_S
    simulate(deployment, sim_end, progress, resolved.name)
    table = deployment.recorder.to_table()
    summary = summarise(table, scenario_name=resolved.name, seed=resolved.seed, duration_s=resolved.duration,
                        sim_end_s=sim_end, wall_time_s=time.perf_counter() - wall_start, model_info=model_info,
                        links=link_rows(deployment, sim_end), edges=deployment.edges,
                        broker=broker_stats(deployment), model_events=deployment.recorder.model_events)  # fmt: skip
    if target is not None:
        write_outputs(target, resolved, table, summary, link_rows(deployment, sim_end), deployment.monitor.rows,
                      deployment.recorder)  # fmt: skip
    return RunResult(resolved, summary, table, target)


def output_dir(scenario: Scenario, out_dir: str | Path | None, force: bool) -> Path:
    if out_dir is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path("runs") / f"{scenario.name}-{stamp}"
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise IotbedError(f"--out {path}: exists and is not a folder; choose another path")
    if path.exists() and any(path.iterdir()) and not force:
        raise IotbedError(f"--out {path}: the folder already holds results; choose a new folder or pass --force to replace them")
    return path


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    # Write beside the target and rename, so an interrupted run never leaves a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(target: Path, scenario: Scenario, table: pa.Table, summary: dict[str, Any],
                  links: list[dict[str, Any]], link_series: list[dict[str, Any]], recorder: TraceRecorder) -> None:  # fmt: skip
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IotbedError(f"--out {target}: cannot create the folder ({exc})") from None
    _atomic_write(target / "scenario.resolved.yaml", lambda p: p.write_text(resolved_yaml(scenario), encoding="utf-8"))
    _atomic_write(target / "trace.parquet", lambda p: pq.write_table(table, p, compression="zstd"))
    _atomic_write(target / "links.csv", lambda p: pd.DataFrame(links).to_csv(p, index=False))
    _atomic_write(target / "links_timeseries.csv", lambda p: pd.DataFrame(link_series).to_csv(p, index=False))
    _atomic_write(target / "model_events.csv", lambda p: recorder.model_events_table().to_pandas().to_csv(p, index=False))
    # summary.json last: its presence marks a complete run (sweeps resume on it)
    _atomic_write(target / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"))
