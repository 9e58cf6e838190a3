"""The TCP model (`iotbed.sim.tcp`) against the kernel's TCP, at 0.1%, 1% and 5% loss and two bandwidths.

    sudo .venv/bin/python benchmarks/tcp_validation.py [--seeds 20] [--only NAME ...] [--render]

Each row is one connection carrying messages at a fixed rate over a path of one link each way (10 ms of
propagation each way, a drop-tail queue of 1,000 frames, Bernoulli loss), run once by the kernel (network
namespaces, a relay that serialises and delays frames, nftables dropping; see
`iotbed/emulation/tcp_validation.py`) and by the model with `--seeds` seeds at the kernel run's send times.
Messages: 1,118 bytes (a digits frame with its MQTT headers) at 100 a second (3,000), and 10 KB at 10 a
second at 2 Mbit/s (600) and 20 a second at 20 Mbit/s (1,200): at 5% loss one connection carries only about
3 Mbit/s at this RTT (Mathis et al.), so a higher rate would measure an overloaded socket buffer. Loss hits
data packets; the rows marked "ACKs too" lose ACKs as well, at the same rate.

Per side: messages delivered (all of them, in order, or the row says so), latency percentiles (send call to
the message complete at the receiver), the sender's retransmitted segments (the kernel's tcpi_total_retrans;
the model's TcpStats.retransmissions) and RTOs, and the mean congestion window at each write. The model's
figures are medians over its seeds, with the central 95% of them in brackets: the range one run's figure
scatters over. Results go to benchmarks/results/tcp_validation.{md,json}, the JSON after each row (a rerun
with --only replaces those rows); --render rewrites the .md from the .json. Needs root, iproute2, nftables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iotbed.emulation import tcp_validation as tv  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "tcp_validation.json"
MD_PATH = RESULTS / "tcp_validation.md"
DELAY_S = 0.010
QUEUE = 1000


def rows() -> dict[str, tuple[tv.PathSpec, tv.Workload]]:
    """Every row of the table, by name."""
    out: dict[str, tuple[tv.PathSpec, tv.Workload]] = {}
    for ack_loss, losses in ((False, (0.001, 0.01, 0.05)), (True, (0.01, 0.05))):
        for bandwidth in (2e6, 20e6):
            for loss in losses:
                name = f"1118B-{bandwidth / 1e6:g}M-{loss:g}{'-acks' if ack_loss else ''}"
                path = tv.PathSpec(bandwidth, DELAY_S, loss, QUEUE, ack_loss)
                out[name] = (path, tv.Workload(message_bytes=1118, rate_hz=100.0, count=3000))
    for bandwidth, rate, count in ((2e6, 10.0, 600), (20e6, 20.0, 1200)):
        for loss in (0.001, 0.01, 0.05):
            path = tv.PathSpec(bandwidth, DELAY_S, loss, QUEUE, False)
            out[f"10KB-{bandwidth / 1e6:g}M-{loss:g}"] = (path, tv.Workload(10_240, rate, count))
    return out


def measure(name: str, path: tv.PathSpec, workload: tv.Workload, seeds: int) -> dict[str, Any]:
    started = time.monotonic()
    comparison = tv.compare(path, workload, seeds=seeds)
    summary = comparison.summary()
    summary["name"] = name
    summary["wall_s"] = round(time.monotonic() - started, 1)
    kernel, sim = summary["kernel"], summary["sim"]
    print(
        f"{name}: p50 {kernel['p50_ms']} / {sim['p50_ms']}, p95 {kernel['p95_ms']} / {sim['p95_ms']}, "
        f"p99 {kernel['p99_ms']} / {sim['p99_ms']} {sim['p99_band_ms']}, "
        f"rtx {kernel['retransmissions']} / {sim['retransmissions']} ({summary['wall_s']} s)",
        flush=True,
    )
    return summary


def _ms(value: float) -> str:
    return f"{value:.1f}"


def _band(side: dict[str, Any], q: int) -> str:
    low, high = side[f"p{q}_band_ms"]
    return f"{_ms(side[f'p{q}_ms'])} [{_ms(low)}-{_ms(high)}]"


def render(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [
        "# The TCP model against the kernel's TCP",
        "",
        f"Produced by `benchmarks/tcp_validation.py` (`make tcp-validation`) on {env['date']}. Host: Linux "
        f"{env['kernel']} (CONFIG_HZ={env['hz']}), {env['cpus']} cores, Python {env['python']}; the model "
        f"with {data['seeds']} seeds per row.",
        "",
        "Kernel: CUBIC, Nagle on, SACK and timestamps, sysctl defaults, over veth pairs through a relay that "
        "gives each frame its transmission time at the bandwidth and 10 ms of propagation (the model's link, "
        "frame by frame; this kernel has no netem), loss by nftables `numgen random` after the link. Model: "
        "`iotbed.sim.tcp` over two `LinkDirection`s with the same bandwidth, delay, queue (1,000) and "
        "`BernoulliLoss`, messages written at the kernel run's send times. Latency: the send call to the whole "
        "message at the receiver, in ms. Kernel figures are one run; the model's are the median over its seeds "
        "[central 95%]. Retransmissions: segments sent again by the sender (the model's: mean over seeds); RTOs: "
        "retransmission timeouts; cwnd: mean congestion window (segments) at each write.",
        "",
        "| row | bandwidth | loss | messages | delivered k / m | p50 kernel | p50 model | p95 kernel "
        "| p95 model | p99 kernel | p99 model | retrans. k / m | RTOs k / m | cwnd k / m |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"].values():
        path, work, k, m = row["path"], row["workload"], row["kernel"], row["sim"]
        loss = f"{path['loss'] * 100:g}%" + (" (ACKs too)" if path["ack_loss"] else "")
        messages = f"{work['message_bytes']:,} B x {work['count']:,} at {work['rate_hz']:g}/s"
        delivered = f"{k['delivered']:,}{'' if k['in_order'] else ' (order!)'} / {m['delivered']:,}"
        lines.append(
            f"| {row['name']} | {path['bandwidth_bps'] / 1e6:g} Mbit/s | {loss} | {messages} | {delivered} "
            f"| {_ms(k['p50_ms'])} | {_band(m, 50)} | {_ms(k['p95_ms'])} | {_band(m, 95)} "
            f"| {_ms(k['p99_ms'])} | {_band(m, 99)} | {k['retransmissions']} / {m['retransmissions']:g} "
            f"| {k['counters']['TCPTimeouts']} / {m['counters']['timeouts']:g} "
            f"| {k['counters']['cwnd_mean']:.1f} / {m['counters']['cwnd_mean']:.1f} |"
        )
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "## Where the model and the kernel differ, and why",
    "",
    "Mechanisms found in a one-off investigation of some of these rows, with a log of every frame through "
    "the relay and the kernel's `tcp:tcp_probe`, `tcp:tcp_retransmit_skb`, `tcp:tcp_cong_state_set` and "
    "`timer:timer_start` tracepoints (not part of the harness).",
    "",
    "- **Where they agree.** At 0.1% (p50, p95, p99) and in p50 at 1% the two agree to 0.2-0.5 ms (2.4 ms "
    "for the p99 of 600 10 KB messages, inside the model's scatter), except 10 KB at 20 Mbit/s (below); the "
    "kernel's figures include the relay's and the receiver's wake-ups (0.1-0.3 ms per pass). Delivered: "
    "every message, once, in order, on both sides, in every row.",
    "- **Repairs after a SACK take the kernel 5-15 ms longer (p95/p99 at 1%).** Linux's RACK takes its RTT "
    "(`rack.rtt_us`) from the last segment an ACK delivered; the model, as RFC 8985 says, from the most "
    "recently sent one. When one ACK both acknowledges cumulatively a segment the receiver had held for its "
    "delayed ACK and SACKs one sent after the hole, Linux's RTT includes the ACK delay: its reordering timer "
    "comes out 10-15 ms long (in one traced repair: 4 jiffies, where the model retransmits at once), and the repair often waits "
    "for the next ACK, one message interval later. The timer is also `usecs_to_jiffies(remaining + 2 ms)` "
    "and fires on a tick (4 ms at HZ=250), where the model's is exact.",
    "- **Since the model grows its window as CUBIC does (Reno-friendly region included), paces recovery with "
    "PRR and latches 'cwnd-limited' for a round trip (tcp_cwnd_validate), the 5% rows without ACK loss agree "
    "far better.** Before those three (the table of 2026-12-03 18:19, against another kernel run of each row), "
    "the model's p50/p95/p99 were 26/75/134 ms against the kernel's 50/185/278 (1,118 B at 2 Mbit/s), "
    "21/51/80 against 21/86/155 (1,118 B at 20 Mbit/s) and 61/141/171 against 77/243/550 (10 KB at 2 "
    "Mbit/s); now 39/171/250 against 43/173/256, 21/62/127 against 21/76/114 and 72/172/288 against "
    "83/199/324, and the mean window at each write is within 0.3 segment of the kernel's. Summed over every "
    "row of |log(model / kernel)| of p50, p95 and p99: 13.0 before, 9.0 now. The 1% rows agree as before or "
    "better (p95 of 1,118 B at 2 Mbit/s: 38 against 36, was 32 against 43).",
    "- **Where the model is now the slower: 5% loss with ACKs lost too, and 10 KB at 20 Mbit/s at 5%.** With "
    "ACK loss the model's p95 is 411 ms against the kernel's 128 (2 Mbit/s; 117 against 193 before) and 168 "
    "against 100 (20 Mbit/s), with more RTOs at 2 Mbit/s (2.5 a run against 2); for 10 KB at 20 Mbit/s, "
    "674 against 289 (was 144 against 267), 2.9 RTOs a run against 2. In a model-only ablation (nominal "
    "schedule, 10 seeds; not part of the harness) each of CUBIC and PRR alone lands near the kernel on the "
    "ACK-loss rows (p95 210 and 131 ms at 2 Mbit/s) and together they overshoot (226). A likely cause, not "
    "traced: the model's ACK names one SACKed segment, so a lost ACK loses its SACK information where "
    "Linux's next ACK repeats up to three blocks; PRR then hears of fewer deliveries and sends less.",
    "- **10 KB at 20 Mbit/s, 0.1%:** the kernel's window grows past the model's (mean 14.1 against 9.8 at each "
    "write in this run; 11.0 in the earlier one), so its p95 stays at one message time where the model's "
    "last segment of a message sometimes waits a round trip (30.7 ms). Not investigated.",
    "- **Lost ACKs at 1%** leave the figures as they were without ACK loss, on both sides.",
]


def environment() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "hz": tv.kernel_hz(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="runs of the model per row")
    parser.add_argument("--only", nargs="*", default=None, help="rows to (re)run, by name")
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the saved .json")
    args = parser.parse_args()
    data: dict[str, Any] = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"rows": {}}
    if not args.render:
        reason = tv.kernel_unavailable()
        if reason is not None:
            raise SystemExit(reason)
        table = rows()
        names = args.only if args.only else list(table)
        unknown = sorted(set(names) - set(table))
        if unknown:
            raise SystemExit(f"no such rows: {unknown}; rows are {list(table)}")
        data.update(environment=environment(), seeds=args.seeds)
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in names:
            data["rows"][name] = measure(name, *table[name], args.seeds)
            data["rows"] = {n: data["rows"][n] for n in table if n in data["rows"]}  # the table's order
            JSON_PATH.write_text(json.dumps(data, indent=1) + "\n")
            MD_PATH.write_text(render(data))
    MD_PATH.write_text(render(data))
    print(f"wrote {MD_PATH.relative_to(ROOT)} and {JSON_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
