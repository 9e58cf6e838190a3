"""Sweeps: grids and replications, local workers and Dask giving the same runs, resume, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import SCENARIOS

from iotbed.sweep import load_sweep, plan, points, replication_seeds, run_sweep

# Columns that depend only on the simulation (wall times differ from run to run).
DETERMINISTIC = [
    "frames.captured",
    "frames.delivered",
    "frames.retries",
    "latency_ms.mean",
    "latency_ms.p99",
    "bandwidth.wire_bytes_per_frame_mean",
    "accuracy.clean",
]


def write_sweep(folder: Path, replications: int = 2, extra: str = "", loss: str = "[0.0, 0.05]") -> Path:
    path = folder / "sweep.yaml"
    path.write_text(f"""
name: tiny
scenario: {SCENARIOS / "quickstart.yaml"}
seed: 5
replications: {replications}
grid:
  links.0.loss: {loss}
set:
  duration: 3s
{extra}
""")
    return path


def test_points_cross_the_grid_and_zip_the_zip(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, extra="zip:\n  nodes.cameras.0.count: [2, 4]\n  nodes.cameras.0.fps: [1, 2]\n")
    spec, scenario = load_sweep(path)
    assert points(spec) == [
        {"links.0.loss": 0.0, "nodes.cameras.0.count": 2, "nodes.cameras.0.fps": 1},
        {"links.0.loss": 0.0, "nodes.cameras.0.count": 4, "nodes.cameras.0.fps": 2},
        {"links.0.loss": 0.05, "nodes.cameras.0.count": 2, "nodes.cameras.0.fps": 1},
        {"links.0.loss": 0.05, "nodes.cameras.0.count": 4, "nodes.cameras.0.fps": 2},
    ]
    runs = plan(spec, scenario, tmp_path / "out")
    assert len(runs) == 8
    seeds = replication_seeds(5, 2)
    assert len(set(seeds)) == 2
    assert [r.seed for r in runs if r.point == 3] == seeds  # replication r has one seed at every point


def test_bad_sweep_files_are_explained(tmp_path: Path) -> None:
    from iotbed.errors import ScenarioError

    path = write_sweep(tmp_path, extra="zip:\n  a: [1, 2]\n  b: [1]\n")
    with pytest.raises(ScenarioError, match="one length"):
        load_sweep(path)
    path.write_text("name: x\nscenario: missing.yaml\n")
    with pytest.raises(ScenarioError, match="not found"):
        load_sweep(path)
    # The scenario loader's bounds hold for sweep files too: duplicate keys, alias bombs, nesting.
    path.write_text("name: x\nscenario: a.yaml\nscenario: b.yaml\n")
    with pytest.raises(ScenarioError, match=r":3:1: duplicate key `scenario`"):
        load_sweep(path)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdef", "bcdefg")
    )
    path.write_text(bomb)
    with pytest.raises(ScenarioError, match="alias"):
        load_sweep(path)


def test_local_workers_and_dask_give_the_same_runs(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    sweep = write_sweep(tmp_path)
    local = run_sweep(sweep, tmp_path / "local", workers=2, progress=False).records
    assert list(local["status"]) == ["ok"] * 4
    assert local.loc[local["param.links.0.loss"] == 0.05, "frames.delivery_ratio"].max() == 1.0  # QoS 1
    # Changed for TCP, the default transport (was `frames.retries > 0`): TCP repairs the loss, so it shows as
    # TCP retransmissions, not MQTT retries.
    assert (local.loc[local["param.links.0.loss"] == 0.05, "tcp.client_to_broker.retransmissions"] > 0).all()
    summary = pd.read_csv(tmp_path / "local" / "sweep_summary.csv")
    assert list(summary["runs_ok"]) == [2, 2]
    row = summary.iloc[1]
    assert row["latency_ms.p99.ci95_low"] <= row["latency_ms.p99.mean"] <= row["latency_ms.p99.ci95_high"]

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        dask = run_sweep(sweep, tmp_path / "dask", cluster=cluster.scheduler_address, progress=False).records
    pd.testing.assert_frame_equal(local[["run_id", "seed", *DETERMINISTIC]], dask[["run_id", "seed", *DETERMINISTIC]])


def test_one_failing_run_does_not_stop_the_sweep(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, replications=1, loss="[0.0, 2.0]")  # a loss rate of 2 is not a probability
    records = run_sweep(sweep, tmp_path / "out", workers=1, progress=False).records
    assert list(records["status"]) == ["ok", "failed"]
    assert "rate" in records.loc[1, "error"]
    assert (tmp_path / "out" / "runs" / "p001-r00" / "error.txt").is_file()


def test_a_killed_sweep_resumes_without_repeating_finished_runs(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, replications=3)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "iotbed.cli", "sweep", str(sweep), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and len(list(out.glob("runs/*/summary.json"))) < 2:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert 2 <= len(finished) < 6, "the sweep should have been killed half-way"

    result = run_sweep(sweep, out, workers=1, progress=False)
    assert sorted(result.executed) == sorted(set(result.records["run_id"]) - set(finished))
    assert list(result.records["status"]) == ["ok"] * 6
    for run_id, mtime in finished.items():  # finished runs were not run again
        assert (out / "runs" / run_id / "summary.json").stat().st_mtime_ns == mtime
