"""Two runs of one scenario side by side: the headline figures, their differences and ratios, and, for a
simulated and an emulated run, what the two model differently (`explain`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iotbed.broker.realtime import DEFAULT_POLL_S
from iotbed.errors import IotbedError

METRICS = (
    "frames.captured",
    "frames.delivered",
    "frames.delivery_ratio",
    "frames.retries",
    "frames.duplicates",
    "frames.dropped_total",
    "throughput.frames_per_s",
    "throughput.goodput_mbps",
    "latency_ms.mean",
    "latency_ms.p50",
    "latency_ms.p95",
    "latency_ms.p99",
    "bandwidth.bytes_per_frame_mean",
    "accuracy.overall",
    "accuracy.clean",
    "accuracy.attacked",
    "broker.queue_drops",
)
# Per backdoored version (the `backdoor` and `detection` sections), where either run has one.
BACKDOOR_METRICS = (
    "adopted_s",
    "quarantined_s",
    "time_to_detect_s",
    "repaired_adopted_s",
    "time_to_repair_s",
    "frames_won_by_the_backdoor",
)


PRIVACY_METRICS = (
    "frames_evaluated",
    "agreement_with_plaintext",
    "bytes.up_per_frame",
    "bytes.down_per_frame",
    "latency_ms_p50.encrypt",
    "latency_ms_p50.uplink",
    "latency_ms_p50.edge_and_downlink",
    "latency_ms_p50.decrypt",
)


SELECTIVE_METRICS = (
    "coverage",
    "selective_risk",
    "system_accuracy",
    "escalated.resolved",
    "escalated.accuracy",
    "escalated.system_accuracy",
    "escalated.bytes_per_s",
)
RESOLVER_METRICS = ("resolved", "accuracy", "latency_ms.p50", "latency_ms.p99")
REVIEWER_METRICS = ("reviewed", "utilisation", "mean_wait_s", "max_queue")


def _escalated_via(summary: dict[str, Any]) -> list[str]:
    return list(summary.get("selective", {}).get("escalated", {}).get("by_resolver", {}))


def _load(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise IotbedError(
            f"{folder}: no summary.json; give two folders written by `iotbed run` or `iotbed emulate`"
        ) from None
    except ValueError as exc:
        raise IotbedError(f"{path}: not valid JSON ({exc})") from None


def _get(summary: dict[str, Any], dotted: str) -> float | None:
    value: Any = summary
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metrics(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    versions = sorted({*first.get("backdoor", {}), *second.get("backdoor", {})}, key=int)
    extra = [f"backdoor.{v}.{m}" for v in versions for m in BACKDOOR_METRICS]
    extra += [f"detection.by_version.{v}.auroc" for v in versions]
    labels = sorted({*first.get("mitm", {}), *second.get("mitm", {})})
    extra += [f"accuracy.by_attack.{label}.accuracy" for label in labels]
    reasons = sorted({*first.get("security", {}).get("refused", {}), *second.get("security", {}).get("refused", {})})
    extra += [f"security.refused.{reason}" for reason in reasons]
    if "privacy" in first or "privacy" in second:
        extra += [f"privacy.{m}" for m in PRIVACY_METRICS]
    if "selective" in first or "selective" in second:
        extra += [f"selective.{m}" for m in SELECTIVE_METRICS]
        resolvers = sorted(
            {*_escalated_via(first), *_escalated_via(second)},
        )
        extra += [f"selective.escalated.by_resolver.{g}.{m}" for g in resolvers for m in RESOLVER_METRICS]
    desks = sorted({*first.get("reviewers", {}), *second.get("reviewers", {})})
    extra += [f"reviewers.{d}.{m}" for d in desks for m in REVIEWER_METRICS]
    return [*METRICS, *extra]


def compare_runs(a: str | Path, b: str | Path) -> list[dict[str, Any]]:
    first, second = _load(a), _load(b)
    rows: list[dict[str, Any]] = []
    for metric in _metrics(first, second):
        x, y = _get(first, metric), _get(second, metric)
        rows.append(
            {
                "metric": metric,
                "a": x,
                "b": y,
                "diff": None if x is None or y is None else y - x,
                "ratio": None if x in (None, 0) or y is None else y / x,  # type: ignore[operator]
            }
        )
    return rows


def _transport_notes(
    simulated: dict[str, Any], live: dict[str, Any], shaping: dict[str, Any], kernel: bool
) -> list[str]:
    """How the two runs carried MQTT and repaired losses, and where that makes them differ."""
    transport = simulated.get("shaping", {}).get("transport", "udp")
    sim_tcp = simulated.get("tcp", {})
    sim_resent = sum(
        int(sim_tcp.get(d, {}).get("retransmissions", 0)) for d in ("client_to_broker", "broker_to_client")
    )
    notes = []
    if transport != "tcp":
        notes.append(
            "the simulation carried MQTT as over UDP (broker.transport udp): a lost packet was resent by MQTT after "
            "retry_interval. Live runs always use TCP, which repairs a loss within a round trip or an RTO and "
            "never resends at the MQTT level: run the simulation with broker.transport=tcp to compare like with like."
        )
    if kernel and not shaping.get("netem"):
        kernel_tcp = shaping.get("kernel_tcp", {})
        live_resent = sum(int(side.get("RetransSegs", 0)) for side in kernel_tcp.values())
        notes.append(
            "live, loss was applied in the kernel (nftables, both directions) and repaired by the kernel's TCP "
            "(CUBIC, PRR, RACK with its own RTT sample); the simulation's TCP model grows its window as Reno and "
            "times repairs exactly, which benchmarks/results/tcp_validation.md measures against the kernel (close at "
            "1% loss, the kernel slower in the tail at 5%). The path's delay is added in process before the kernel, "
            "so the kernel's RTO and reordering timers see a shorter round trip than the simulation's."
            + (f" TCP segments resent: {live_resent} live, {sim_resent} simulated." if kernel_tcp else "")
        )
    elif kernel:
        notes.append(
            "in the kernel, netem's loss hits TCP segments and the kernel's TCP resends them: MQTT resends nothing."
        )
    else:
        notes.append(
            "only what cameras publish is shaped"
            + (" (through the same TCP model as the simulation's)" if shaping.get("transport") == "tcp" else "")
            + "; MQTT's acknowledgements and the broker-to-subscriber leg cross loopback unshaped, so nothing on "
            "them is delayed or lost as in the simulation."
        )
    return notes


def explain(a: str | Path, b: str | Path) -> list[str]:
    """Why a simulated and an emulated run of one scenario may differ, from what the emulated run recorded
    about itself (its shaping and how well it kept up with the wall clock). Empty for two runs of one mode."""
    first, second = _load(a), _load(b)
    modes = {first.get("mode"), second.get("mode")}
    if modes != {"simulated", "emulated"}:
        return []
    live = first if first.get("mode") == "emulated" else second
    shaping = live.get("shaping", {})
    kernel = str(shaping.get("mode", "")).startswith("kernel")
    notes = [
        "live nodes talk to the broker directly: each node's simulated path is one shaped hop (bottleneck "
        "bandwidth, summed delay, jitter, the first lossy link's loss); gateways and routers forward nothing, so "
        + (
            "nodes of one group behind one shared link share its rate in the kernel, but not its queue per hop."
            if kernel
            else "queueing at a link several cameras share is not reproduced."
        ),
        "live latencies include paho, Mosquitto and the bridge that hands messages to the simulation thread "
        f"(polled every {DEFAULT_POLL_S * 1e3:g} ms); a bare paho pair on loopback takes 0.2-0.5 ms.",
        "live clients connect before the run's clock starts; simulated ones connect at time 0 over their links, "
        "so a lost CONNECT can delay a simulated camera's first frames.",
    ]
    simulated = first if live is second else second
    notes += _transport_notes(simulated, live, shaping, kernel)
    realtime = live.get("realtime", {})
    lag = realtime.get("lag_ms", {})
    if realtime and not realtime.get("kept_up", True):
        notes.append(
            f"the live run fell behind the wall clock (lag p99 {lag.get('p99_ms')} ms, max "
            f"{lag.get('max_ms', 0):.0f} ms): its frames left late and its latencies include that."
        )
    elif lag.get("p99_ms") is not None:
        notes.append(f"the live run kept up with the wall clock (lag p99 {lag['p99_ms']} ms).")
    if live.get("backdoor"):
        notes.append(
            "live, STRIP screens and the CoDefend repair run for real on threads: a verdict or a repaired model "
            "is ready when the device's modelled time has passed and the host's computation is done, so where "
            "this machine is slower than the modelled device they come later than in the simulation; a screen "
            "whose count test sits at its threshold can go the other way and move detection by one screening "
            "period."
        )
        for version, section in live["backdoor"].items():
            repair = section.get("repair") or {}
            if repair.get("wall_seconds", 0) > repair.get("sim_seconds", float("inf")):
                notes.append(
                    f"the repair of version {version} took {repair['wall_seconds']:.1f} s on this host against "
                    f"{repair['sim_seconds']:.1f} s modelled for the edge's device: the live repair was published "
                    "that much later."
                )
    if live.get("security"):
        notes.append(
            "live, the update channel's metadata expiry and renewals are timed on the wall clock: a message "
            "that arrives within a few milliseconds of an expiry can be taken in one run and refused as "
            "`expired` in the other."
        )
        taken = {a["attack"]: a.get("taken_by") for a in simulated.get("security", {}).get("attacks", [])}
        for attack in live["security"].get("attacks", []):
            if attack["attack"] in taken and attack.get("taken_by") != taken[attack["attack"]]:
                notes.append(
                    f"{attack['attack']} was taken by {attack.get('taken_by') or 'no node'} live and by "
                    f"{taken[attack['attack']] or 'no node'} in the simulation."
                )
    if live.get("privacy"):
        notes.append(
            "live, every frame is encrypted, evaluated and decrypted on this host in wall-clock time while the "
            "nodes wait the modelled device time as well: the host's seconds show as lag, not in the simulated "
            "figures; ciphertext sizes differ by a few bytes per frame (SEAL compresses each one)."
        )
    for label, mitm in live.get("mitm", {}).items():
        if not mitm.get("read_the_stream", True):
            notes.append(
                f"the live man in the middle {label} could not read its clients' stream (TLS): it changed no "
                "frame, where the simulated one changes frames on the link."
            )
        else:
            notes.append(
                f"the live man in the middle {label} is a proxy that draws its fraction per frame it sees, and "
                "frames travel as 8-bit pixels: which frames it changes differs from the simulated draw."
            )
    broker = live.get("broker", {})
    if broker.get("queue_drops") is None:
        notes.append("the live broker's $SYS counters were not readable: its queue drops are unknown.")
    return notes
