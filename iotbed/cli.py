"""The `iotbed` command: a thin layer over `iotbed.load_scenario`, `iotbed.run` and the data/model APIs.

User mistakes (exit 2) and other user-facing problems print one clear message, never a traceback.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from iotbed.errors import IotbedError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

out = Console()
err = Console(stderr=True)


def _user_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except IotbedError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted; files already written are complete, nothing half-written was kept")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="iotbed")
def main() -> None:
    """iotbed: simulate IoT camera deployments over MQTT and measure deep-learning inference under attack."""
    # `kill -USR1 <pid>` prints every thread's stack to stderr: how to see where a stuck run is stuck.
    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (ValueError, OSError, AttributeError):  # stderr is no file (a test's captured output): no dumps
            pass


def _load(scenario: str, seed: int | None, overrides: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from iotbed.scenario import load_scenario

    sets = list(overrides)
    if seed is not None:
        sets.append(f"seed={seed}")
    return load_scenario(scenario, sets)


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), help="results folder [default: runs/<name>-<timestamp>/]"
)
@click.option("--seed", type=int, help="override the scenario's seed")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="override one value, e.g. --set duration=30s"
)
@click.option("--force", is_flag=True, help="replace results already in --out")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON instead of a table")
@_user_errors
def run(
    scenario: str,
    out_dir: str | None,
    seed: int | None,
    overrides: tuple[str, ...],
    force: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Run SCENARIO in simulation; write the trace, the summary and the resolved scenario."""
    from iotbed.runner import run as run_scenario

    loaded = _load(scenario, seed, overrides)
    result = run_scenario(
        loaded,
        out_dir,
        progress=not quiet,
        force=force,
        on_status=None if quiet else lambda m: err.print(m, highlight=False),
    )
    if as_json:
        click.echo(json.dumps(result.summary, indent=2))
    else:
        print_summary(result.summary)
    if result.out_dir is not None:
        err.print(
            f"results: {result.out_dir}/ (summary.json, trace.parquet, scenario.resolved.yaml, links.csv)",
            highlight=False,
        )


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def print_summary(summary: dict[str, Any]) -> None:
    frames, latency, accuracy = summary["frames"], summary["latency_ms"], summary["accuracy"]
    table = Table(
        title=f"{summary['scenario']} (seed {summary['seed']}, {summary['sim_time_s']:g} s simulated, "
        f"{summary['wall_time_s']:.1f} s wall)",
        show_header=True,
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    dropped = ", ".join(f"{k} {v}" for k, v in frames["dropped"].items()) or "none"
    rows = [
        ("frames captured / delivered", f"{frames['captured']} / {frames['delivered']}"),
        ("frames dropped", dropped),
        ("frames in flight at the end", str(frames["in_flight"])),
        ("MQTT resends / duplicates", f"{frames['retries']} / {frames['duplicates']}"),
        *(
            [
                (
                    "TCP retransmissions to / from the broker",
                    f"{tcp['client_to_broker']['retransmissions']} / {tcp['broker_to_client']['retransmissions']}",
                )
            ]
            if (tcp := summary.get("tcp"))
            else []
        ),
        ("throughput (frames/s)", _fmt(summary["throughput"]["frames_per_s"], ".2f")),
        ("goodput (Mbit/s)", _fmt(summary["throughput"]["goodput_mbps"], ".3f")),
        ("latency mean / p50 (ms)", f"{_fmt(latency['mean'], '.2f')} / {_fmt(latency['p50'], '.2f')}"),
        ("latency p95 / p99 (ms)", f"{_fmt(latency['p95'], '.2f')} / {_fmt(latency['p99'], '.2f')}"),
        ("bytes per frame (camera publish)", _fmt(summary["bandwidth"]["bytes_per_frame_mean"], ".1f")),
        ("bytes per frame (all links)", _fmt(summary["bandwidth"]["wire_bytes_per_frame_mean"], ".1f")),
        ("bandwidth per camera (kbit/s)", _fmt(summary["bandwidth"].get("per_camera_kbps"), ".1f")),
        ("accuracy overall / clean", f"{_fmt(accuracy['overall'], '.4f')} / {_fmt(accuracy['clean'], '.4f')}"),
        ("accuracy attacked", _fmt(accuracy["attacked"], ".4f")),
    ]
    for group, codec in summary.get("codecs", {}).items():
        if codec["kind"] == "pixel_drop":
            rows.append(
                (f"pixel drop {group}: real / nominal rate", f"{codec['real_rate']:.4f} / {codec['nominal_rate']:g}")
            )
            rows.append(
                (f"pixel drop {group}: payload / raw bytes", f"{codec['payload_bytes']} / {codec['raw_payload_bytes']}")
            )
    reference = accuracy.get("undefended_reference", {})
    if summary.get("attacks"):
        rows.append(
            (
                "undefended reference: clean / attacked",
                f"{_fmt(reference.get('clean'), '.4f')} / {_fmt(reference.get('attacked'), '.4f')}",
            )
        )
    for prefix, breakdown in (("  ", "by_attack"), ("condition ", "by_condition")):
        for label, entry in accuracy.get(breakdown, {}).items():
            rows.append(
                (
                    f"{prefix}{label}: n, acc. (undefended)",
                    f"{entry['delivered']}, {_fmt(entry['accuracy'], '.4f')} "
                    f"({_fmt(entry['undefended_reference'], '.4f')})",
                )
            )
    selective = summary.get("selective")
    if selective:
        rows.append(
            (
                "reject option: coverage / selective risk",
                f"{_fmt(selective['coverage'], '.4f')} / {_fmt(selective['selective_risk'], '.4f')}",
            )
        )
        rows.append(("  system accuracy (abstaining serves nothing)", _fmt(selective["system_accuracy"], ".4f")))
        escalated = selective.get("escalated")
        if escalated:
            rows.append(
                (
                    "  escalated: resolved / accuracy / p50 ms",
                    f"{escalated['resolved']} of {escalated['rejected']} / {_fmt(escalated['accuracy'], '.4f')} / "
                    f"{_fmt(escalated['latency_ms']['p50'], '.1f')}",
                )
            )
            for group, path in escalated.get("by_resolver", {}).items():
                lat = path["latency_ms"]
                rows.append(
                    (
                        f"  via {group}: resolved / accuracy / p50 / p99 ms",
                        f"{path['resolved']} / {_fmt(path['accuracy'], '.4f')} / {_fmt(lat['p50'], '.1f')} / "
                        f"{_fmt(lat['p99'], '.1f')}",
                    )
                )
            rows.append(
                ("  escalated traffic (kbit/s, headers included)", _fmt(escalated.get("bytes_per_s", 0) * 8e-3, ".1f"))
            )
            rows.append(("  system accuracy with escalation", _fmt(escalated["system_accuracy"], ".4f")))
    detection = summary.get("edge_detection")
    if detection:
        rows.append(("edge detector (Defed): clean frames flagged", _fmt(detection["clean"]["flag_rate"], ".4f")))
        for label, entry in detection["by_attack"].items():
            auroc = (entry.get("report") or {}).get("auroc")
            rows.append((f"  {label}: flagged / AUROC", f"{_fmt(entry['flag_rate'], '.4f')} / {_fmt(auroc, '.4f')}"))
    for desk, entry in summary.get("reviewers", {}).items():
        rows.append(
            (
                f"reviewers {desk}: reviewed / utilisation / mean wait s / max queue",
                f"{entry['reviewed']} / {_fmt(entry['utilisation'], '.2f')} / {_fmt(entry['mean_wait_s'], '.2f')} / "
                f"{entry['max_queue']}",
            )
        )
    security = summary.get("security")
    if security:
        refused = ", ".join(f"{k} {v}" for k, v in security["refused"].items()) or "none"
        rows.append((f"update channel ({'signed' if security['signing'] else 'unsigned'}): refused", refused))
        taken = [a["attack"] for a in security["attacks"] if a.get("taken_by")]
        rows.append(("  attacks taken / stale devices", f"{', '.join(taken) or 'none'} / {len(security['stale'])}"))
    privacy = summary.get("privacy")
    if privacy:
        size, lat = privacy["bytes"], privacy["latency_ms_p50"]
        rows.append(
            (
                f"{privacy['mode']} (CKKS): frames encrypted / evaluated / decrypted",
                f"{privacy['frames_encrypted']} / {privacy['frames_evaluated']} / {privacy['results_decrypted']}",
            )
        )
        rows.append(
            (
                "  accuracy encrypted / plaintext / agreement",
                f"{_fmt(privacy['accuracy_encrypted'], '.4f')} / {_fmt(privacy['accuracy_plaintext_same_frames'], '.4f')}"
                f" / {_fmt(privacy['agreement_with_plaintext'], '.4f')}",
            )
        )
        rows.append(
            (
                "  bytes up / down per frame, context",
                f"{_fmt(size['up_per_frame'], '.0f')} / {_fmt(size['down_per_frame'], '.0f')}, "
                f"{_fmt(size['context_per_camera'], '.0f')}",
            )
        )
        rows.append(
            (
                "  p50 ms: encrypt / uplink / edge+down / decrypt",
                " / ".join(_fmt(lat[k], ".0f") for k in ("encrypt", "uplink", "edge_and_downlink", "decrypt")),
            )
        )
        if privacy.get("round_trips_per_frame") is not None:
            rows.append(
                (
                    "  ReLU round trips / their bytes per frame",
                    f"{privacy['round_trips_per_frame']:.1f} / {_fmt(size['rounds_per_frame'], '.0f')}",
                )
            )
        ready = [v for v in privacy["cameras_ready_s"].values() if v is not None]
        rows.append(("  cameras ready to send (s), latest", _fmt(max(ready) if ready else None, ".2f")))
    broker = summary.get("broker", {})
    if broker.get("queue_drops"):
        rows.append(("broker: messages dropped from full queues", str(broker["queue_drops"])))
    realtime = summary.get("realtime")
    if realtime:
        rows.append(
            ("live: processes / lag p99 (ms)", f"{realtime['workers']} / {_fmt(realtime['lag_ms']['p99_ms'], '.2f')}")
        )
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
@click.option("--resolved", is_flag=True, help="print the scenario with every default filled in")
@_user_errors
def validate(scenario: str, overrides: tuple[str, ...], resolved: bool) -> None:
    """Check a scenario file; exit 2 with file:line errors if it is not valid."""
    from iotbed.scenario import resolved_yaml

    loaded = _load(scenario, None, overrides)
    if resolved:
        click.echo(resolved_yaml(loaded), nl=False)
    else:
        nodes = sum(loaded.group_counts().values())
        err.print(f"{scenario}: valid ({nodes} nodes, {len(loaded.links)} link groups, {loaded.duration:g} s)")


@main.command()
@_user_errors
def schema() -> None:
    """Print the scenario JSON Schema (point your editor's YAML plugin at it)."""
    from iotbed.scenario import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.group()
def datasets() -> None:
    """Datasets cameras can capture from."""


@datasets.command("list")
@_user_errors
def datasets_list() -> None:
    """The datasets iotbed reads, and the layout each expects."""
    from iotbed.data import list_datasets

    table = Table(show_header=True)
    for column in ("name", "images", "classes", "needs path", "description / layout"):
        table.add_column(column)
    for info in list_datasets():
        c, h, w = info.image_shape
        table.add_row(
            info.name,
            f"{c}x{h}x{w}",
            str(info.num_classes or "from folders"),
            "yes" if info.needs_path else "no",
            f"{info.description}\n[dim]{info.layout}[/]",
        )
    out.print(table)


@datasets.command("show")
@click.argument("name")
@click.option("--path", type=click.Path(), help="the dataset's folder (for datasets that need one)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the train/test split")
@_user_errors
def datasets_show(name: str, path: str | None, seed: int) -> None:
    """Load a dataset and describe its splits and classes."""
    from iotbed.data import describe

    click.echo(json.dumps(describe(name, path, seed=seed), indent=2, default=str))


@main.group()
def models() -> None:
    """Train and inspect classifiers (cached as safetensors)."""


@models.command("train")
@click.option("--dataset", "dataset_name", default="digits", show_default=True)
@click.option("--path", type=click.Path(), help="the dataset's folder (for datasets that need one)")
@click.option("--arch", default="lenet5", show_default=True)
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the split and the training")
@click.option("--output", type=click.Path(dir_okay=False), help="also save the weights to this .safetensors file")
@click.option("--quiet", is_flag=True)
@_user_errors
def models_train(
    dataset_name: str,
    path: str | None,
    arch: str,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    output: str | None,
    quiet: bool,
) -> None:
    """Train ARCH on a dataset, or fetch it from the cache when it was trained before with the same settings."""
    import dataclasses

    from iotbed.data import load_splits
    from iotbed.models import default_train_config, get_or_train, save_model

    splits = load_splits(dataset_name, path, seed=seed)
    config = default_train_config(arch, dataset_name)
    changes = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr}.items() if v is not None}
    config = dataclasses.replace(config, seed=seed, **changes)
    trained = get_or_train(arch, splits.train, config, test_ds=splits.test, progress=not quiet)
    state = "trained now" if trained.trained_now else "from the cache"
    click.echo(f"{trained.arch} on {dataset_name}: test accuracy {trained.test_accuracy:.4f} ({state})")
    click.echo(f"weights: {trained.path}")
    if output:
        saved = save_model(Path(output), trained.model, {"dataset": dataset_name, "cache_key": trained.key})
        click.echo(f"saved: {saved}")


@models.command("list")
@_user_errors
def models_list() -> None:
    """Trained models in the cache."""
    from iotbed.models import resolve_cache_dir

    folder = resolve_cache_dir() / "models"
    table = Table(show_header=True)
    for column in ("key", "arch", "dataset", "test accuracy", "file"):
        table.add_column(column)
    for info_path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            continue
        accuracy = info.get("test_accuracy")
        table.add_row(
            info_path.stem[:12],
            str(info.get("arch", "?")),
            str(info.get("dataset", "?")),
            "-" if accuracy is None else f"{accuracy:.4f}",
            str(info_path.with_suffix(".safetensors")),
        )
    out.print(table)
    err.print(f"cache: {folder}")


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False))
@click.option(
    "--broker",
    "broker_url",
    required=True,
    metavar="mqtt://HOST:PORT",
    help="the broker to run against, or `local` for a Mosquitto started (and restarted by faults) for this run",
)
@click.option(
    "--username",
    help="one user name for every client (a broker that binds client ids to users, as `iotbed broker start --auth` makes it, needs --credentials instead)",
)
@click.option("--password", help="its password")
@click.option(
    "--credentials", type=click.Path(dir_okay=False), help="per-client credentials (from `iotbed broker start --auth`)"
)
@click.option("--tls-ca", type=click.Path(dir_okay=False), help="CA certificate of a TLS broker")
@click.option("--duration", help="override the scenario's duration, e.g. 30s")
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="processes to spread the clients over; auto: one, or more when the load needs them",
)
@click.option(
    "--netns",
    is_flag=True,
    help="shape real packets in the kernel: node groups in network namespaces, tc per node (root; --broker local)",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
@click.option("--force", is_flag=True)
@click.option("--quiet", is_flag=True)
@_user_errors
def emulate(
    scenario: str,
    broker_url: str,
    username: str | None,
    password: str | None,
    credentials: str | None,
    tls_ca: str | None,
    duration: str | None,
    workers: str,
    netns: bool,
    out_dir: str | None,
    seed: int | None,
    overrides: tuple[str, ...],
    force: bool,
    quiet: bool,
) -> None:
    """Run SCENARIO's nodes as real MQTT clients against a broker, in wall-clock time."""
    from iotbed.emulation.runner import emulate as run_live

    sets = [*overrides, *([f"duration={duration}"] if duration else [])]
    loaded = _load(scenario, seed, tuple(sets))
    if workers != "auto" and (not workers.isdigit() or int(workers) < 1):
        raise UsageError(f"--workers {workers}: give a number of processes (1 or more) or `auto`")
    logins = None
    if credentials:
        try:
            logins = json.loads(Path(credentials).read_text(encoding="utf-8"))["clients"]
        except (OSError, ValueError, KeyError) as exc:
            raise IotbedError(
                f"--credentials {credentials}: not a credentials file from `iotbed broker start --auth` ({exc})"
            ) from None
    result = run_live(
        loaded,
        broker_url,
        username=username,
        password=password,
        logins=logins,
        tls_ca=tls_ca,
        workers=workers if workers == "auto" else int(workers),
        netns=netns,
        out_dir=out_dir,
        force=force,
        progress=not quiet,
    )
    print_summary(result.summary)
    realtime = result.summary["realtime"]
    if not realtime["kept_up"]:
        lag = realtime["lag_ms"]
        err.print(
            f"[yellow]warning:[/] the emulation fell behind the wall clock (lag p99 {lag['p99_ms']:.1f} ms, max "
            f"{lag['max_ms']:.0f} ms on {realtime['workers']} process(es)): frames left later than due and the "
            f"latencies include that; use more --workers or a lighter scenario",
            highlight=False,
        )
    for label, mitm in result.summary.get("mitm", {}).items():
        read = "read and changed" if mitm["read_the_stream"] else "could not read (TLS) and changed"
        err.print(
            f"mitm {label}: a proxy on the path of {', '.join(mitm['nodes']) or 'no node'}; it {read} "
            f"{mitm['frames_tampered']} of the frames it saw",
            highlight=False,
        )
    if result.out_dir is not None:
        err.print(f"results: {result.out_dir}/", highlight=False)


@main.group()
def broker() -> None:
    """A local Mosquitto for live runs (Debian's `mosquitto` package)."""


@broker.command("start")
@click.option("--port", type=int, help="[default: a free port]")
@click.option(
    "--auth",
    "scenario_for_auth",
    type=click.Path(dir_okay=False),
    metavar="SCENARIO",
    help="require passwords and an ACL by node role, with one user per client of SCENARIO (each node, each rogue"
    " publisher), each user bound to the client id that is its name",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="with --auth: the scenario's overrides, as the run will give them (the ACL follows them)",
)
@click.option("--tls", is_flag=True, help="listen with TLS, with a generated CA")
@click.option("--dir", "run_dir", type=click.Path(file_okay=False), default=".cache/broker", show_default=True)
@_user_errors
def broker_start(
    port: int | None, scenario_for_auth: str | None, overrides: tuple[str, ...], tls: bool, run_dir: str
) -> None:
    """Start a broker in the background; `iotbed broker stop` stops it."""
    import secrets

    from iotbed.broker.broker_auth import BrokerUser
    from iotbed.broker.mosquitto import BrokerConfig, scenario_client_roles, scenario_extra_rules, start_detached

    users = []
    if scenario_for_auth:
        # One user per client id (each node, each extra client such as a rogue publisher, the registry and
        # the $SYS monitor); the broker binds each user to the client id that is its name.
        loaded = _load(scenario_for_auth, None, overrides)
        roles, extra = scenario_client_roles(loaded), scenario_extra_rules(loaded)
        users = [
            BrokerUser(client_id, secrets.token_urlsafe(12), role, extra_rules=extra.get(client_id, ()))
            for client_id, role in roles.items()
        ]
    started = start_detached(run_dir, BrokerConfig(port=port, users=tuple(users), tls=tls, persistence=True))
    scheme = "mqtts" if tls else "mqtt"
    click.echo(f"broker running: {scheme}://{started.host}:{started.port} (pid {started.pid}, files in {run_dir})")
    if users:
        path = Path(run_dir) / "credentials.json"
        path.write_text(json.dumps({"clients": {u.username: u.password for u in users}}, indent=2))
        path.chmod(0o600)
        click.echo(f"credentials: {path} (pass it to `iotbed emulate --credentials`)")
    if started.ca_file:
        click.echo(f"CA certificate: {started.ca_file} (pass it as --tls-ca)")
    click.echo(f"stop it with: iotbed broker stop --dir {run_dir}")


@broker.command("stop")
@click.option("--dir", "run_dir", type=click.Path(file_okay=False), default=".cache/broker", show_default=True)
@_user_errors
def broker_stop(run_dir: str) -> None:
    """Stop the broker `iotbed broker start` left running."""
    from iotbed.broker.mosquitto import stop_detached

    click.echo("broker stopped" if stop_detached(run_dir) else f"no broker from {run_dir} was running")


@main.command()
@click.argument("run_a", type=click.Path(file_okay=False))
@click.argument("run_b", type=click.Path(file_okay=False))
@_user_errors
def compare(run_a: str, run_b: str) -> None:
    """Two runs of one scenario side by side (say, simulated and emulated), with the differences."""
    from iotbed.analysis.compare import compare_runs, explain

    table = Table(show_header=True, title=f"{run_a} vs {run_b}")
    for column in ("metric", "A", "B", "B - A", "B / A"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in compare_runs(run_a, run_b):
        table.add_row(row["metric"], _fmt(row["a"]), _fmt(row["b"]), _fmt(row["diff"]), _fmt(row["ratio"], ".3f"))
    out.print(table)
    notes = explain(run_a, run_b)
    if notes:
        out.print("Where simulation and emulation differ by construction:", highlight=False)
        for note in notes:
            out.print(f"- {note}", highlight=False, soft_wrap=True)


@main.command()
@click.argument("sweep_file", metavar="SWEEP", type=click.Path(dir_okay=False))
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="local worker processes")
@click.option("--cluster", metavar="tcp://SCHEDULER:8786", help="run on a Dask distributed cluster instead")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="sweep folder [default: runs/sweep-<name>/]")
@click.option("--quiet", is_flag=True)
@_user_errors
def sweep(sweep_file: str, workers: int, cluster: str | None, out_dir: str | None, quiet: bool) -> None:
    """Run every point and replication of a sweep; rerun to resume an interrupted one."""
    from iotbed.sweep import run_sweep

    result = run_sweep(sweep_file, out_dir, workers=workers, cluster=cluster, progress=not quiet)
    failed = int((result.records["status"] != "ok").sum())
    ran = len(result.executed)
    err.print(
        f"{len(result.records)} runs ({ran} run now, {len(result.records) - ran} already done, {failed} failed); "
        f"results: {result.out_dir}/sweep.csv, sweep_summary.csv",
        highlight=False,
    )
    for figure in result.figures:
        err.print(f"figure: {figure}", highlight=False)


@main.command()
@click.argument("kind")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="[default: FOLDER/figures/]")
@click.option("--x", "x_param", metavar="PARAM", help="sweep parameter for the x axis (dotted path)")
@click.option("--format", "formats", multiple=True, type=click.Choice(["png", "svg", "pdf"]), default=("png", "svg"))
@_user_errors
def plot(kind: str, folder: str, out_dir: str | None, x_param: str | None, formats: tuple[str, ...]) -> None:
    """Draw KIND from a run or sweep FOLDER: latency, throughput; bandwidth_vs_robustness and robustness from a
    sweep; strip_entropy, roc and backdoor from a screened run; selective and conditions from a run with the
    reject option or camera conditions."""
    from iotbed.analysis.plots import plot as draw

    for path in draw(kind, folder, out_dir, tuple(formats), x_param):
        click.echo(path)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", "out_file", type=click.Path(dir_okay=False), help="[default: FOLDER/report.html]")
@_user_errors
def report(folder: str, out_file: str | None) -> None:
    """Write one self-contained report.html for a run or sweep FOLDER."""
    from iotbed.analysis.report import write_report

    click.echo(write_report(folder, out_file))


@main.group()
def probe() -> None:
    """Security probes of trained models: what a model leaks through its outputs alone, and how its predictions
    hold up under transformed inputs."""


def _probe_options(kind: str, seed_help: str) -> Callable[[F], F]:
    """The options every probe takes: the dataset, the model's architecture, the seed, the results folder."""

    def decorate(func: F) -> F:
        options = [
            click.option("--dataset", "dataset_name", default="digits", show_default=True),
            click.option("--path", type=click.Path(), help="the dataset's folder (for datasets that need one)"),
            click.option("--arch", default="lenet5", show_default=True),
            click.option("--seed", type=int, default=0, show_default=True, help=seed_help),
            click.option(
                "--out",
                "out_dir",
                type=click.Path(file_okay=False),
                help=f"results folder [default: runs/{kind}-<dataset>-<arch>-<timestamp>/]",
            ),
            click.option("--force", is_flag=True, help="replace results already in --out"),
            click.option("--quiet", is_flag=True, help="no progress bars"),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _probe_arch(arch: str, seed: int) -> str:
    from iotbed.errors import ModelError
    from iotbed.models import resolve_arch

    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed {seed}: give a whole number between 0 and 2**32 - 1")
    try:
        return resolve_arch(arch)
    except ModelError as exc:
        raise UsageError(f"--arch: {exc}") from None


def _probe_splits(dataset_name: str, path: str | None, seed: int) -> Any:
    from iotbed.data import load_splits
    from iotbed.errors import DatasetError

    try:
        return load_splits(dataset_name, path, seed=seed)
    except DatasetError as exc:
        raise DatasetError(f"--dataset {dataset_name}: {exc}") from None


def _probe_target(arch: str, dataset_name: str, splits: Any, seed: int, quiet: bool) -> tuple[Any, Any]:
    """(the training config, the trained model) `iotbed models train` gives for this dataset, arch and seed."""
    import dataclasses

    from iotbed.models import default_train_config, get_or_train

    config = dataclasses.replace(default_train_config(arch, dataset_name), seed=seed)
    return config, get_or_train(arch, splits.train, config, test_ds=splits.test, progress=not quiet)


@probe.command("membership")
@click.option("--shadows", type=int, default=4, show_default=True, help="shadow models the attacker trains")
@click.option(
    "--eval-size", type=int, help="members, and as many non-members, to score [default: as many as the splits allow]"
)
@_probe_options("membership", "seed of the split, the target's training and every draw of the attacks")
@_user_errors
def probe_membership(
    dataset_name: str,
    path: str | None,
    arch: str,
    shadows: int,
    eval_size: int | None,
    seed: int,
    out_dir: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Membership inference (loss threshold, shadow models) against --arch trained on --dataset.

    The target is the model `iotbed models train` gives for the same dataset, arch and seed (from the cache)."""
    import time

    from iotbed.analysis import membership
    from iotbed.runner import one_torch_thread

    if shadows < 1:
        raise UsageError(
            f"--shadows {shadows}: the shadow attack needs at least one shadow model; give 1 or more (default 4)"
        )
    if eval_size is not None and eval_size < 1:
        raise UsageError(f"--eval-size {eval_size}: give a number of members to score, 1 or more, or leave it out")
    arch = _probe_arch(arch, seed)
    target_dir = membership.output_dir(out_dir, dataset_name, arch, force=force)
    splits = _probe_splits(dataset_name, path, seed)
    n_train, n_test = len(splits.train), len(splits.test)
    largest = membership.max_eval_size(n_train, n_test)
    if eval_size is not None and eval_size > largest:
        raise UsageError(
            f"--eval-size {eval_size}: at most {largest} with these splits (members come from the {n_train} training "
            f"images, non-members from half of the {n_test} test images); give {largest} or less, or leave it out"
        )
    with one_torch_thread():  # as `iotbed run` trains: faster for these small batches on a shared machine
        start = time.perf_counter()
        config, trained = _probe_target(arch, dataset_name, splits, seed, quiet)
        result = membership.evaluate_membership(
            trained.model,
            arch,
            config,
            splits.train,
            splits.test,
            shadows=shadows,
            n_eval=eval_size,
            seed=seed,
            progress=not quiet,
        )
    payload = {"dataset": dataset_name, "target_cache_key": trained.key, **result.to_dict()}
    markdown = membership.to_markdown(result, title=f"Membership inference: {arch} on {dataset_name}")
    json_path, md_path = membership.write_results(target_dir, payload, markdown)

    table = Table(title=f"membership inference: {arch} on {dataset_name} (seed {seed})", show_header=True)
    for column in ("attack", "AUC", "advantage", "best advantage (upper bound)"):
        table.add_column(column, justify="left" if column == "attack" else "right")
    for name, attack in (("loss threshold", result.loss_attack), ("shadow models", result.shadow_attack)):
        table.add_row(name, f"{attack.auc:.4f}", f"{attack.advantage:.4f}", f"{attack.best_advantage:.4f}")
    out.print(table)
    out.print(
        f"{result.loss_attack.n_members} members vs {result.loss_attack.n_non_members} non-members; no leak would "
        f"give AUC 0.5 ± {result.loss_attack.null_auc_se:.4f}, advantage 0. Target accuracy "
        f"{result.target_train_accuracy:.4f} train / {result.target_test_accuracy:.4f} test; each of the {shadows} "
        f"shadow models trained on {result.shadow_train_size} images, the target on {result.target_train_size}.",
        highlight=False,
        soft_wrap=True,
    )
    err.print(f"results: {json_path}, {md_path} ({time.perf_counter() - start:.1f} s)", highlight=False)


@probe.command("deeptest")
@click.option("--seeds", "n_seeds", type=int, default=100, show_default=True, help="seed images, from the test split")
@click.option("--tries", type=int, default=10, show_default=True, help="tries per image before the search backs up")
@click.option(
    "--threshold",
    type=float,
    default=0.2,
    show_default=True,
    help="a channel is covered when the mean of its min-max scaled map exceeds this",
)
@_probe_options("deeptest", "seed of the split, the model's training, the seed images and every choice of the search")
@_user_errors
def probe_deeptest(
    dataset_name: str,
    path: str | None,
    arch: str,
    n_seeds: int,
    tries: int,
    threshold: float,
    seed: int,
    out_dir: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """DeepTest: coverage-guided transformed images (translation, scale, shear, rotation, contrast, brightness,
    blur) that flip the label --arch gives --dataset's test images.

    The model is the one `iotbed models train` gives for the same dataset, arch and seed (from the cache)."""
    import math
    import time

    from iotbed.analysis import deeptest
    from iotbed.runner import one_torch_thread

    if n_seeds < 1:
        raise UsageError(f"--seeds {n_seeds}: give a number of seed images, 1 or more (default 100)")
    if tries < 1:
        raise UsageError(f"--tries {tries}: give a number of tries per image, 1 or more (default 10)")
    if not (math.isfinite(threshold) and 0 <= threshold < 1):
        raise UsageError(
            f"--threshold {threshold}: give a value in [0, 1) (default 0.2); scaled channel means lie in [0, 1]"
        )
    arch = _probe_arch(arch, seed)
    target_dir = deeptest.output_dir(out_dir, dataset_name, arch, force=force)
    splits = _probe_splits(dataset_name, path, seed)
    if n_seeds > len(splits.test):
        raise UsageError(
            f"--seeds {n_seeds}: the test split of {dataset_name} holds {len(splits.test)} images; "
            f"give {len(splits.test)} or less"
        )
    with one_torch_thread():  # as `iotbed run` trains: faster for these one-image forward passes
        start = time.perf_counter()
        _, trained = _probe_target(arch, dataset_name, splits, seed, quiet)
        result = deeptest.run_deeptest(
            trained.model,
            splits.test,
            arch=arch,
            n_seeds=n_seeds,
            tries=tries,
            threshold=threshold,
            seed=seed,
            progress=not quiet,
        )
    summary = result.to_dict()
    payload = {
        "dataset": dataset_name,
        "target_cache_key": trained.key,
        "target_test_accuracy": trained.test_accuracy,
        **summary,
    }
    paths = deeptest.write_results(
        target_dir, result, payload, splits.test.classes, title=f"DeepTest: {arch} on {dataset_name}"
    )

    table = Table(title=f"DeepTest: {arch} on {dataset_name} (seed {seed})", show_header=True)
    for column in ("transformation", "tries", "kept", "flips", "new flips", "flip rate"):
        table.add_column(column, justify="left" if column == "transformation" else "right")
    for name, stats in summary["per_transformation"].items():
        table.add_row(
            name,
            str(stats["tries"]),
            str(stats["kept"]),
            str(stats["flips"]),
            str(stats["new_flips"]),
            f"{stats['flip_rate']:.3f}",
        )
    out.print(table)
    out.print(
        f"neuron coverage {summary['seed_coverage']:.4f} from the {n_seeds} seeds alone "
        f"({summary['seed_covered_neurons']}/{summary['neurons']} channels), {summary['final_coverage']:.4f} "
        f"with the generated images; generated {summary['generated']}, kept {summary['kept']}; "
        f"{summary['flips']} label flips in {summary['seeds_with_flips']} seeds "
        f"({summary['flips_from_correct_seeds_now_wrong']} turn a correct prediction wrong).",
        highlight=False,
        soft_wrap=True,
    )
    err.print(f"results: {', '.join(str(p) for p in paths)} ({time.perf_counter() - start:.1f} s)", highlight=False)


if __name__ == "__main__":
    main()
