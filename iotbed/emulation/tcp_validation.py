"""The TCP model (`iotbed.sim.tcp`) against the kernel's TCP, on the same path and the same workload.

What is measured. One TCP connection carries `Workload.count` application messages of `message_bytes` each,
written at `rate_hz` (on a fixed schedule, not back to back), from a sender to a receiver over a path of one
link each way (`PathSpec`: bandwidth, one-way propagation delay, a drop-tail queue, Bernoulli loss). Each
message carries its index and its send time; the receiver parses the stream (length-prefixed messages) and
notes when each message is complete, so a message's latency is its arrival less its send time, both read
from the same host clock (CLOCK_MONOTONIC). Per side (`SideResult`): messages delivered, whether each arrived
exactly once and in order, p50/p95/p99 latency, and the sender's retransmitted segments.

The kernel side (`KernelPath`, root only), three network namespaces in a row:

    iotbed-P-tvNsnd (s0 10.250.0.1) ── veth ── iotbed-P-tvNmid (m0 │relay│ m1) ── veth ── (r0 10.250.0.2) iotbed-P-tvNrcv

- The link, each way: this kernel has no `netem` (and no `fq` or `etf`, which could hold a packet until a
  timestamp a BPF program set), so no qdisc can delay a packet. The middle namespace runs a relay instead: a
  process with an AF_PACKET socket on each veth that gives every frame its transmission time at the link's
  bandwidth behind the frames before it (a FIFO transmitter, Lindley's recursion: the simulator's
  `Transmitter`), holds it for the propagation delay, and sends it on out of the other veth; beyond `queue`
  frames in the transmitter it drops (drop-tail). So both sides put the same link under TCP, packet by
  packet, and a difference in the results is TCP's. (`shaper="htb"` puts an HTB class of the bandwidth on
  s0 and r0 instead, as `iotbed emulate --netns` shapes, and the relay only delays; HTB's token bucket lets a
  packet after an idle spell out at once, where a link takes its transmission time.) The relay runs as
  SCHED_FIFO, as do the sender and the receiver: at nice 19 on a busy host, waiting for a CPU would count as
  network latency (measured: up to 12 ms); the three use well under one per cent of a CPU. The relay
  adds its own wake-up to each frame: typically 0.1 ms, at most about 1 ms seen.
- Loss: nftables (`numgen random mod 1000000 < k drop`) in the prerouting hook of the namespace a packet
  reaches, data at the receiver and ACKs (only with `ack_loss`) at the sender: after the link, as the simulator
  loses a packet after it took its transmission time. Not on the sender's egress: a segment its own output
  hook drops comes back to TCP as a local error (EPERM) and goes again at once, neither lost in the network
  nor counted as a retransmission (measured: 5% dropped there, no retransmission, no added latency). The
  rules go in after the handshake (the simulated handshake is lossless too).
- The sender writes with Nagle on (TCP_NODELAY off, as paho-mqtt and Mosquitto leave it) and CUBIC (set on
  the socket: this host's default, which a new namespace inherits, is BBR). Segments are at most one MSS
  (1448 bytes with timestamps) on the wire: transmit checksumming is off on s0 and r0 (an AF_PACKET relay
  would forward a partial checksum), which turns off TSO, and GSO is capped at one segment.
- Retransmissions: the sender's socket (`TCP_INFO`: tcpi_total_retrans, tcpi_total_rto) and its namespace's
  counters (RetransSegs, TCPLossProbes, TCPFastRetrans, TCPSlowStartRetrans, TCPTimeouts, ...), which count
  this connection alone. Also the drops nftables counted, each way.

The simulated side (`simulate`): a `Network` of two nodes, one `LinkDirection` each way with the same
bandwidth, delay, queue and `BernoulliLoss` (its own seeded generator per direction); a `TcpConnection`
opened with a handshake; the messages written at the kernel run's send times (or the nominal schedule);
`TcpStats` for the retransmissions. Every packet counts 14 bytes of Ethernet framing, as the relay counts
frames. `compare` runs both.

What differs by construction (see also `iotbed.sim.tcp`'s docstring): the kernel's timers tick in jiffies
(CONFIG_HZ, 250 here: 4 ms), so its RTO, probe, reordering and delayed-ACK timers fire up to a tick late
where the model's are exact (and its reordering timer 2 ms after its deadline, which the model leaves out);
its delayed-ACK timeout adapts to the arrival pattern (40 ms at the start, never below); the model's CUBIC
runs on its exact clock without HyStart, and its reordering window does not adapt; and the two sides draw their
losses independently, so they compare as two samples of one distribution, not message by message. What
that does to the figures: benchmarks/results/tcp_validation.md.

Cleanup: `KernelPath` is a context manager; leaving it (also on an exception or Ctrl-C, and on SIGTERM
under `run_kernel`/`compare`, which turn it into an exit) stops its processes and deletes its namespaces,
which deletes their veths, qdiscs and rules. The processes it starts
die with the process that started them (PR_SET_PDEATHSIG). A run killed outright leaves namespaces behind;
the next `KernelPath` (or `iotbed emulate --netns`) deletes those whose process is gone.

This file is also the script the namespaced processes run (`python -P tcp_validation.py relay|sender|
receiver ...`): the part they use needs nothing but the standard library.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import itertools
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "iotbed-"
HEADER = struct.Struct("!IIq")  # a message's total length, its index, its send time (ns, CLOCK_MONOTONIC)
FRAMING_BYTES = 14  # Ethernet header: what a frame adds to an IP packet, on both sides
SND_IP, RCV_IP = "10.250.0.1", "10.250.0.2"
MACS = {"s0": "02:1e:7b:00:00:01", "m0": "02:1e:7b:00:00:02", "m1": "02:1e:7b:00:00:03", "r0": "02:1e:7b:00:00:04"}
PORT = 5001
LOSS_SCALE = 1_000_000  # nftables draws numgen random mod this
LOSS_TABLE = "iotbed_tcpv"

_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_SIOCETHTOOL = 0x8946
_ETHTOOL_STXCSUM = 0x00000017
_PR_SET_PDEATHSIG = 1
_sequence = itertools.count()


class ValidationError(RuntimeError):
    """The kernel side could not be set up or run."""


# --- what is compared --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathSpec:
    """One link each way between the sender and the receiver."""

    bandwidth_bps: float = 10e6
    delay_s: float = 0.010  # one way
    loss: float = 0.01  # per packet, independently
    queue: int = 1000  # frames in a transmitter (queued plus the one being sent); drop-tail beyond
    ack_loss: bool = False  # the reverse direction (ACKs) loses packets too, at the same rate

    def __post_init__(self) -> None:
        if self.bandwidth_bps <= 0 or self.delay_s < 0 or not 0 <= self.loss < 1 or self.queue < 1:
            raise ValueError(f"not a path: {self}")


@dataclass(frozen=True)
class Workload:
    """`count` messages of `message_bytes` (a 16-byte header included), one every 1/`rate_hz` seconds, the
    first `lead_s` after the connection is established."""

    message_bytes: int = 1118
    rate_hz: float = 100.0
    count: int = 2000
    lead_s: float = 0.5

    def __post_init__(self) -> None:
        if self.message_bytes < HEADER.size or self.rate_hz <= 0 or self.count < 1 or self.lead_s < 0:
            raise ValueError(f"not a workload: {self}")


@dataclass
class SideResult:
    """One side's run: what arrived, when, and what the sender resent."""

    side: str  # "kernel" or "sim"
    sent: int
    delivered: int
    in_order: bool  # every message arrived exactly once, in the order written
    latencies_s: list[float]  # per delivered message, in arrival order
    retransmissions: int  # data segments the sender sent again
    counters: dict[str, float] = field(default_factory=dict)  # the breakdown, and what the path dropped
    send_offsets_s: list[float] = field(default_factory=list)  # each write, from the connection's establishment

    def percentile(self, q: float) -> float:
        return _percentile(sorted(self.latencies_s), q)

    def summary(self) -> dict[str, Any]:
        """The figures, in milliseconds, without the per-message lists."""
        return {
            "side": self.side,
            "sent": self.sent,
            "delivered": self.delivered,
            "in_order": self.in_order,
            "p50_ms": round(self.percentile(50) * 1e3, 2),
            "p95_ms": round(self.percentile(95) * 1e3, 2),
            "p99_ms": round(self.percentile(99) * 1e3, 2),
            "mean_ms": round(sum(self.latencies_s) / max(1, len(self.latencies_s)) * 1e3, 2),
            "retransmissions": self.retransmissions,
            "counters": self.counters,
        }


@dataclass
class Comparison:
    """One kernel run and the model's runs (one per seed) at the kernel run's send times."""

    path: PathSpec
    workload: Workload
    kernel: SideResult
    sims: list[SideResult]

    @property
    def sim(self) -> SideResult:
        return self.sims[0]

    def sim_percentile(self, q: float, of: float = 50.0) -> float:
        """The `of`-th percentile, over the seeds, of the model's `q`-th latency percentile."""
        return _percentile(sorted(s.percentile(q) for s in self.sims), of)

    def summary(self) -> dict[str, Any]:
        """The kernel's figures, and the model's as the median over its seeds with the central 95% of them
        (what one run's figure can be expected to scatter over)."""
        sims = self.sims
        sim: dict[str, Any] = {
            "side": "sim",
            "seeds": len(sims),
            "sent": sims[0].sent,
            "delivered": min(s.delivered for s in sims),
            "in_order": all(s.in_order for s in sims),
        }
        for q in (50, 95, 99):
            sim[f"p{q}_ms"] = round(self.sim_percentile(q) * 1e3, 2)
            sim[f"p{q}_band_ms"] = [round(self.sim_percentile(q, of) * 1e3, 2) for of in (2.5, 97.5)]
        sim["retransmissions"] = round(sum(s.retransmissions for s in sims) / len(sims), 1)
        sim["counters"] = {k: round(sum(s.counters[k] for s in sims) / len(sims), 2) for k in sims[0].counters}
        return {
            "path": asdict(self.path),
            "workload": asdict(self.workload),
            "kernel": self.kernel.summary(),
            "sim": sim,
        }


def _percentile(ordered: Sequence[float], q: float) -> float:
    """numpy's default ('linear') percentile of sorted values; NaN for none."""
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _in_order(indices: Sequence[int], count: int) -> bool:
    return list(indices) == list(range(count))


# --- the simulated side --------------------------------------------------------------------------------------


def simulate(
    path: PathSpec, workload: Workload, seed: int = 0, send_offsets_s: Sequence[float] | None = None
) -> SideResult:
    """The workload through `iotbed.sim.tcp.TcpConnection` over a simulated link each way.

    The connection opens with a handshake at time 0 (lossless, as the kernel's, which happens before the
    loss rules go in); message i is written `send_offsets_s[i]` after the opening end is established (the
    kernel run's own write times, so both sides see the same schedule), or at `lead_s + i / rate_hz`."""
    import numpy as np
    import simpy

    from iotbed.sim.links import BernoulliLoss, LinkDirection, NoLoss, Transmitter
    from iotbed.sim.network import Network
    from iotbed.sim.tcp import TcpConnection, TcpSettings

    offsets = (
        list(send_offsets_s)
        if send_offsets_s is not None
        else [workload.lead_s + i / workload.rate_hz for i in range(workload.count)]
    )
    if len(offsets) != workload.count:
        raise ValueError(f"{len(offsets)} send times for {workload.count} messages")
    settings = TcpSettings(framing_bytes=FRAMING_BYTES)
    env = simpy.Environment()
    network = Network(env)
    network.add_node("snd")
    network.add_node("rcv")
    fwd_rng, back_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    forward = LinkDirection(
        "snd->rcv", "snd", "rcv", Transmitter(path.bandwidth_bps, path.queue), path.delay_s, 0.0, NoLoss(), fwd_rng
    )
    backward = LinkDirection(
        "rcv->snd", "rcv", "snd", Transmitter(path.bandwidth_bps, path.queue), path.delay_s, 0.0, NoLoss(), back_rng
    )
    network.add_link(forward, backward)
    arrivals: list[tuple[int, float]] = []
    conn = TcpConnection(network, "snd", "rcv", on_message_b=lambda m: arrivals.append((m, env.now)), settings=settings)
    conn.open()
    # The opening end is established when the SYN-ACK is in: SYN and SYN-ACK each way, serialised and delayed.
    syn_s = (settings.syn_bytes + settings.framing_bytes) * 8 / path.bandwidth_bps
    established = 2 * (path.delay_s + syn_s)
    send_times = [established + offset for offset in offsets]

    def lossy(_: object) -> None:
        if path.loss > 0:
            forward.loss = BernoulliLoss(path.loss, fwd_rng)
            if path.ack_loss:
                backward.loss = BernoulliLoss(path.loss, back_rng)

    env.timeout(max(established, send_times[0] - 1e-6)).callbacks.append(lossy)
    cwnd: list[int] = []

    def write(i: int) -> None:
        conn.a.send(i, workload.message_bytes)
        cwnd.append(conn.a.cwnd)

    for i, at in enumerate(send_times):
        env.timeout(at).callbacks.append(lambda _, i=i: write(i))
    env.run(until=send_times[-1] + 600.0)
    stats = conn.a.stats
    return SideResult(
        side="sim",
        sent=workload.count,
        delivered=len(arrivals),
        in_order=_in_order([m for m, _ in arrivals], workload.count),
        latencies_s=[t - send_times[m] for m, t in arrivals],
        retransmissions=stats.retransmissions,
        counters={
            "retransmits_rto": stats.retransmits_rto,
            "retransmits_fast": stats.retransmits_fast,
            "retransmits_tlp": stats.retransmits_tlp,
            "timeouts": stats.timeouts,
            "fast_recoveries": stats.fast_recoveries,
            "segments_sent": stats.segments_sent,
            "cwnd_mean": round(sum(cwnd) / len(cwnd), 2),
            "dropped_data": forward.stats.dropped_loss,
            "dropped_acks": backward.stats.dropped_loss,
            "dropped_queue": forward.stats.dropped_queue_full + backward.stats.dropped_queue_full,
        },
        send_offsets_s=offsets,
    )


def simulate_many(
    path: PathSpec, workload: Workload, seeds: int, send_offsets_s: Sequence[float] | None = None
) -> list[SideResult]:
    """`simulate` with seeds 0 .. seeds-1: how much one run's figures scatter."""
    return [simulate(path, workload, seed, send_offsets_s) for seed in range(seeds)]


def kernel_hz() -> int | None:
    """The kernel's CONFIG_HZ (its timer tick), from /proc/config.gz or /boot; None if neither says."""
    import gzip

    sources = [("/proc/config.gz", True), (f"/boot/config-{os.uname().release}", False)]
    for name, zipped in sources:
        try:
            if zipped:
                with gzip.open(name, "rt") as config:
                    text = config.read()
            else:
                text = Path(name).read_text()
        except OSError:
            continue
        match = re.search(r"^CONFIG_HZ=(\d+)$", text, re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


# --- the kernel side -----------------------------------------------------------------------------------------


def kernel_unavailable() -> str | None:
    """Why `KernelPath` cannot run here, or None."""
    if os.geteuid() != 0:
        return "the kernel side needs root (network namespaces, nftables)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
        if _tool(tool) is None:
            return f"the kernel side needs `{tool}`: apt-get install -y {package}"
    if not hasattr(socket, "AF_PACKET"):
        return "the kernel side needs AF_PACKET sockets (Linux)"
    return None


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


def _run(args: list[str], what: str, input_text: str | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, input=input_text, timeout=60)
    if result.returncode != 0:
        raise ValidationError(f"{what} failed: `{' '.join(args)}`: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs (of this harness or `iotbed emulate --netns`) whose process is gone."""
    removed = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(re.escape(PREFIX) + r"(\d+)-\w+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            removed.append(name)
    return removed


def namespaces_of(pid: int | None = None) -> list[str]:
    """The namespaces this harness made for process `pid` (this one by default) that still exist."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = f"{PREFIX}{os.getpid() if pid is None else pid}-tv"
    return [line.split()[0] for line in listing.splitlines() if line.startswith(mine)]


class _Role:
    """One of this file's roles, run by the venv's Python in a namespace; lines out on stdout, a JSON last."""

    def __init__(self, namespace: str, args: list[str]) -> None:
        self.name = args[0]
        self._err = tempfile.TemporaryFile()
        command = ["ip", "netns", "exec", namespace, sys.executable, "-P", str(Path(__file__).resolve()), *args]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            bufsize=0,
            preexec_fn=_die_with_parent,
        )
        self._out = b""

    def expect(self, word: str, timeout: float) -> None:
        """Wait for a line `word` from the role."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                raise ValidationError(f"the {self.name} did not say {word!r}: {self._failure()}")
            self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        if line.decode().strip() != word:
            raise ValidationError(f"the {self.name} said {line!r}, not {word!r}: {self._failure()}")

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> dict[str, Any]:
        """Close its stdin, wait for it to end, and return the JSON it printed last."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.stop()
            raise ValidationError(f"the {self.name} did not finish in {timeout:.0f} s") from exc
        lines = (self._out + (out or b"")).decode().strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise ValidationError(f"the {self.name} failed: {self._failure()}")
        return json.loads(lines[-1])  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._err.close()

    def _failure(self) -> str:
        code = self.proc.poll()
        self._err.seek(0)
        err = self._err.read().decode(errors="replace").strip()[-2000:]
        return f"exit status {code}, stderr: {err or '(none)'}"


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class KernelPath:
    """The kernel's TCP over the path, in namespaces (see the module docstring). Use as a context manager;
    `run(workload)` once or more."""

    def __init__(self, path: PathSpec, shaper: str = "relay") -> None:
        if shaper not in ("relay", "htb"):
            raise ValueError("shaper is 'relay' (the relay serialises) or 'htb' (HTB on the veths)")
        self.path = path
        self.shaper = shaper
        tag = f"{PREFIX}{os.getpid()}-tv{next(_sequence)}"
        self.snd, self.mid, self.rcv = f"{tag}snd", f"{tag}mid", f"{tag}rcv"
        self._made: list[str] = []
        self._relay: _Role | None = None
        self._roles: list[_Role] = []
        self.relay_stats: dict[str, Any] = {}

    def __enter__(self) -> KernelPath:
        reason = kernel_unavailable()
        if reason is not None:
            raise ValidationError(reason)
        remove_stale()
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _setup(self) -> None:
        for ns in (self.snd, self.mid, self.rcv):
            _run(["ip", "netns", "add", ns], f"creating namespace {ns}")
            self._made.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"], f"bringing up lo in {ns}")
            sysctls = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw", *sysctls], f"setting sysctls in {ns}")
        for end, ns, peer in (("s0", self.snd, "m0"), ("r0", self.rcv, "m1")):
            _run(
                ["ip", "link", "add", end, "netns", ns, "address", MACS[end], "type", "veth"]
                + ["peer", "name", peer, "netns", self.mid, "address", MACS[peer]],
                f"creating the veth pair {end}-{peer}",
            )
        for ns, dev, ip, other, other_dev in (
            (self.snd, "s0", SND_IP, RCV_IP, "r0"),
            (self.rcv, "r0", RCV_IP, SND_IP, "s0"),
        ):
            batch = [
                f"addr add {ip}/24 dev {dev}",
                f"link set {dev} gso_max_size 1500",
                f"link set {dev} up",
                f"neigh replace {other} lladdr {MACS[other_dev]} dev {dev} nud permanent",  # no ARP on the link
            ]
            _run(["ip", "-n", ns, "-batch", "-"], f"addressing {dev}", "\n".join(batch) + "\n")
        _run(
            ["ip", "-n", self.mid, "-batch", "-"],
            "bringing up the relay's veths",
            "link set m0 up promisc on\nlink set m1 up promisc on\n",
        )
        relay_bw = self.path.bandwidth_bps
        if self.shaper == "htb":
            relay_bw = 0.0  # the relay only delays
            for ns, dev in ((self.snd, "s0"), (self.rcv, "r0")):
                rate = f"{max(8, round(self.path.bandwidth_bps))}bit"
                lines = [
                    f"qdisc add dev {dev} root handle 1: htb default 1",
                    f"class add dev {dev} parent 1: classid 1:1 htb rate {rate} ceil {rate} quantum 1514",
                    f"qdisc add dev {dev} parent 1:1 handle 10: pfifo limit {self.path.queue}",
                ]
                _run(["tc", "-n", ns, "-batch", "-"], f"shaping {dev}", "\n".join(lines) + "\n")
        self._relay = _Role(
            self.mid, ["relay", "m0", "m1", repr(relay_bw), repr(self.path.delay_s), str(self.path.queue)]
        )
        self._relay.expect("ready", 30)

    def _loss_rules(self, ns: str, rate: float) -> None:
        threshold = round(rate * LOSS_SCALE)
        rules = (
            f"table inet {LOSS_TABLE} {{\n chain pre {{\n  type filter hook prerouting priority -300; policy accept;\n"
            f"  meta l4proto tcp numgen random mod {LOSS_SCALE} < {threshold} counter drop\n }}\n}}\n"
        )
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", LOSS_TABLE], capture_output=True)
        if threshold > 0:
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], f"loss rules in {ns}", rules)

    def _dropped(self, ns: str) -> int:
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", LOSS_TABLE],
            capture_output=True,
            text=True,
        ).stdout
        try:
            items = json.loads(out)["nftables"]
        except (ValueError, KeyError):
            return 0
        for item in items:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
        return 0

    def run(self, workload: Workload) -> SideResult:
        """Send the workload over one new connection; the kernel's figures."""
        for ns in (self.snd, self.rcv):
            self._loss_rules(ns, 0.0)
        duration = workload.lead_s + workload.count / workload.rate_hz
        drain_s = 120.0
        receiver = _Role(self.rcv, ["receiver", "r0", str(PORT), str(duration + drain_s + 60)])
        self._roles.append(receiver)
        receiver.expect("ready", 30)
        sender = _Role(
            self.snd,
            ["sender", "s0", RCV_IP, str(PORT), str(workload.count), str(workload.message_bytes)]
            + [repr(workload.rate_hz), repr(workload.lead_s), repr(drain_s)],
        )
        self._roles.append(sender)
        sender.expect("connected", 30)
        self._loss_rules(self.rcv, self.path.loss)
        self._loss_rules(self.snd, self.path.loss if self.path.ack_loss else 0.0)
        sender.say("go\n")
        sent = sender.finish(duration + drain_s + 30)
        received = receiver.finish(60)
        dropped_data, dropped_acks = self._dropped(self.rcv), self._dropped(self.snd)
        for ns in (self.snd, self.rcv):
            self._loss_rules(ns, 0.0)
        records = received["records"]  # [index, send ns, arrival ns]
        stamps = sent["stamps"]
        info, netstat = sent["tcp_info"], sent["netstat"]
        counters: dict[str, float] = {key: netstat.get(key, 0) for key in _NETSTAT_KEYS}
        counters.update({f"tcpi_{key}": value for key, value in info.items() if key != "total_retrans"})
        counters.update(cwnd_mean=sent["cwnd_mean"], dropped_data=dropped_data, dropped_acks=dropped_acks)
        counters["realtime"] = int(sent["realtime"] and received["realtime"])  # 0: wake-ups waited for a CPU
        if sent["congestion"] != "cubic":
            raise ValidationError(f"the sender's socket ran {sent['congestion']}, not cubic")
        return SideResult(
            side="kernel",
            sent=len(stamps),
            delivered=len(records),
            in_order=_in_order([r[0] for r in records], workload.count) and received["leftover"] == 0,
            latencies_s=[(arrival - stamp) / 1e9 for _, stamp, arrival in records],
            retransmissions=int(info["total_retrans"]),
            counters=counters,
            send_offsets_s=[(stamp - sent["connected_ns"]) / 1e9 for stamp in stamps],
        )

    def teardown(self) -> None:
        for role in self._roles:
            role.stop()
        self._roles.clear()
        if self._relay is not None:
            try:
                self.relay_stats = self._relay.finish(5)
            except (ValidationError, ValueError):
                pass
            self._relay.stop()
            self._relay = None
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self._made.clear()


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """In the main thread, SIGTERM raises SystemExit for the duration, so `finally` blocks run."""
    try:
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_kernel(path: PathSpec, workload: Workload, shaper: str = "relay") -> SideResult:
    with _sigterm_as_exit(), KernelPath(path, shaper) as lab:
        result = lab.run(workload)
    result.counters.update({f"relay_{k}": v for k, v in lab.relay_stats.items() if isinstance(v, int | float)})
    return result


def compare(path: PathSpec, workload: Workload, seeds: int = 20, shaper: str = "relay") -> Comparison:
    """The kernel's TCP over the path, then the model over the same path at the kernel run's send times,
    once per seed (a run of the model takes a fraction of a second)."""
    kernel = run_kernel(path, workload, shaper)
    return Comparison(path, workload, kernel, simulate_many(path, workload, seeds, kernel.send_offsets_s))


# --- the processes in the namespaces (standard library only) ------------------------------------------------

_NETSTAT_KEYS = (
    "RetransSegs",
    "TCPLossProbes",
    "TCPLossProbeRecovery",
    "TCPFastRetrans",
    "TCPSlowStartRetrans",
    "TCPTimeouts",
    "TCPLostRetransmit",
    "TCPSackRecovery",
    "TCPSpuriousRTOs",
    "TCPDSACKRecv",
    "DelayedACKs",
)
# struct tcp_info (linux/tcp.h): name -> (offset, format)
_TCP_INFO = {
    "rto_us": (8, "I"),
    "unacked": (24, "I"),
    "rtt_us": (68, "I"),
    "rttvar_us": (72, "I"),
    "snd_cwnd": (80, "I"),
    "total_retrans": (100, "I"),
    "notsent_bytes": (144, "I"),
    "min_rtt_us": (148, "I"),
    "data_segs_out": (156, "I"),
    "dsack_dups": (216, "I"),
    "reord_seen": (220, "I"),
    "total_rto": (240, "H"),
    "total_rto_recoveries": (242, "H"),
    "total_rto_time_ms": (244, "I"),
}


def _realtime() -> bool:
    """SCHED_FIFO for this process, so its wake-ups do not wait behind other work; False where refused."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))
        return True
    except (OSError, AttributeError):
        return False


def _no_tx_checksum(device: str) -> None:
    """ethtool -K DEVICE tx off (also turns TSO off), through the ioctl, in this process's namespace."""
    value = ctypes.create_string_buffer(struct.pack("II", _ETHTOOL_STXCSUM, 0))
    request = struct.pack("16sP16x", device.encode(), ctypes.addressof(value))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, request)


def _tcp_info(sock: socket.socket) -> dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
    return {
        name: struct.unpack_from(fmt, raw, offset)[0]
        for name, (offset, fmt) in _TCP_INFO.items()
        if offset + struct.calcsize(fmt) <= len(raw)
    }


def _netstat() -> dict[str, int]:
    """This namespace's TCP counters (/proc/net/snmp and /proc/net/netstat, as nstat reads them)."""
    counters: dict[str, int] = {}
    for name in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = Path(name).read_text().splitlines()
        for head, values in zip(lines[::2], lines[1::2]):
            prefix, keys = head.split(":", 1)
            if prefix in ("Tcp", "TcpExt"):
                counters.update(zip(keys.split(), map(int, values.split(":", 1)[1].split())))
    return counters


def _role_relay(dev_a: str, dev_b: str, bandwidth_bps: float, delay_s: float, queue: int) -> None:
    """Forward frames between two devices: each waits behind those before it, takes its transmission time
    at `bandwidth_bps` (none at 0), then `delay_s`; beyond `queue` frames in the transmitter it is dropped.
    Runs until stdin closes or SIGTERM; prints its counts."""
    realtime = _realtime()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    socks = {}
    for dev in (dev_a, dev_b):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        sock.bind((dev, 0))
        sock.setblocking(False)
        socks[dev] = sock
    # per direction (by the device frames come in on): the link's state and the frames on it
    busy = {dev_a: 0.0, dev_b: 0.0}
    departures: dict[str, deque[float]] = {dev_a: deque(), dev_b: deque()}
    line: dict[str, deque[tuple[float, bytes]]] = {dev_a: deque(), dev_b: deque()}
    out = {dev_a: socks[dev_b], dev_b: socks[dev_a]}
    stats = {"frames_ab": 0, "frames_ba": 0, "queue_drops": 0, "late_max_us": 0}
    by_fd = {sock.fileno(): dev for dev, sock in socks.items()}
    stdin = sys.stdin.fileno()
    print("ready", flush=True)
    try:
        while True:
            due = min((q[0][0] for q in line.values() if q), default=math.inf)
            now = time.monotonic()
            timeout = None if due == math.inf else max(0.0, due - now)
            ready, _, _ = select.select([*by_fd, stdin], [], [], timeout)
            for fd in ready:
                if fd == stdin:
                    if not os.read(stdin, 4096):
                        return
                    continue
                dev = by_fd[fd]
                while True:
                    try:
                        frame, address = socks[dev].recvfrom(65536)
                    except BlockingIOError:
                        break
                    if address[2] == _PACKET_OUTGOING:
                        continue  # what the relay itself sent out of this device
                    now = time.monotonic()
                    gone = departures[dev]
                    while gone and gone[0] <= now:
                        gone.popleft()
                    if len(gone) >= queue:
                        stats["queue_drops"] += 1
                        continue
                    start = max(now, busy[dev])
                    busy[dev] = start + (len(frame) * 8.0 / bandwidth_bps if bandwidth_bps > 0 else 0.0)
                    gone.append(busy[dev])
                    line[dev].append((busy[dev] + delay_s, frame))
            now = time.monotonic()
            for dev, queued in line.items():
                while queued and queued[0][0] <= now:
                    at, frame = queued.popleft()
                    stats["late_max_us"] = max(stats["late_max_us"], round((now - at) * 1e6))
                    try:
                        out[dev].send(frame)
                    except OSError:
                        stats["queue_drops"] += 1
                        continue
                    stats["frames_ab" if dev == dev_a else "frames_ba"] += 1
    except SystemExit:
        pass
    finally:
        print(json.dumps({**stats, "realtime": realtime}), flush=True)


def _role_receiver(device: str, port: int, timeout_s: float) -> None:
    """Accept one connection, parse its length-prefixed messages, note when each is complete."""
    realtime = _realtime()
    _no_tx_checksum(device)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(1)
    server.settimeout(60)
    print("ready", flush=True)
    conn, _ = server.accept()
    conn.settimeout(timeout_s)
    records: list[tuple[int, int, int]] = []
    buffer = bytearray()
    while True:
        data = conn.recv(1 << 18)
        now = time.monotonic_ns()
        if not data:
            break
        buffer += data
        at = 0
        while len(buffer) - at >= HEADER.size:
            size, index, stamp = HEADER.unpack_from(buffer, at)
            if len(buffer) - at < size:
                break
            records.append((index, stamp, now))
            at += size
        del buffer[:at]
    conn.close()
    print(json.dumps({"records": records, "leftover": len(buffer), "realtime": realtime}), flush=True)


def _role_sender(
    device: str, host: str, port: int, count: int, size: int, rate_hz: float, lead_s: float, drain_s: float
) -> None:
    """Connect, wait for 'go', write the messages on schedule, wait until all are acknowledged, report."""
    realtime = _realtime()
    _no_tx_checksum(device)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")  # Nagle stays on
    sock.settimeout(30)
    sock.connect((host, port))
    connected = time.monotonic_ns()
    print("connected", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go")
    period_ns = round(1e9 / rate_hz)
    first = time.monotonic_ns() + round(lead_s * 1e9)
    padding = bytes(size - HEADER.size)
    stamps: list[int] = []
    cwnd = 0
    for i in range(count):
        wait = first + i * period_ns - time.monotonic_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        stamp = time.monotonic_ns()
        sock.sendall(HEADER.pack(size, i, stamp) + padding)
        stamps.append(stamp)
        cwnd += struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 84), 80)[0]
    deadline = time.monotonic() + drain_s
    info = _tcp_info(sock)
    while (info["unacked"] or info["notsent_bytes"]) and time.monotonic() < deadline:
        time.sleep(0.005)
        info = _tcp_info(sock)
    congestion = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0")[0].decode()
    report = {
        "stamps": stamps,
        "connected_ns": connected,
        "tcp_info": info,
        "netstat": _netstat(),
        "cwnd_mean": round(cwnd / count, 2),
        "congestion": congestion,
    }
    sock.close()
    print(json.dumps({**report, "realtime": realtime}), flush=True)


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="a process of iotbed's TCP validation, in its namespace")
    roles = parser.add_subparsers(dest="role", required=True)
    relay = roles.add_parser("relay")
    relay.add_argument("dev_a")
    relay.add_argument("dev_b")
    relay.add_argument("bandwidth_bps", type=float)
    relay.add_argument("delay_s", type=float)
    relay.add_argument("queue", type=int)
    receiver = roles.add_parser("receiver")
    receiver.add_argument("device")
    receiver.add_argument("port", type=int)
    receiver.add_argument("timeout_s", type=float)
    sender = roles.add_parser("sender")
    sender.add_argument("device")
    sender.add_argument("host")
    sender.add_argument("port", type=int)
    sender.add_argument("count", type=int)
    sender.add_argument("size", type=int)
    sender.add_argument("rate_hz", type=float)
    sender.add_argument("lead_s", type=float)
    sender.add_argument("drain_s", type=float)
    args = vars(parser.parse_args(argv))
    role: Callable[..., None] = {"relay": _role_relay, "receiver": _role_receiver, "sender": _role_sender}[
        args.pop("role")
    ]
    role(**args)


if __name__ == "__main__":
    _main(sys.argv[1:])
