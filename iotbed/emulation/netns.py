"""Kernel-shaped links for live runs (`iotbed emulate --netns`): network namespaces, veth pairs and `tc`.

The layout, for a run with process id P:

    root namespace ── veth (169.254.213.x/30) ── iotbed-P-broker: Mosquitto on 0.0.0.0:1883
                                                   │ veth gK (10.(100+K).0.1/16)   one per node group K
                                                 iotbed-P-K: the group's nodes, one address each
                                                   (10.(100+K).a.b/16 on veth up0), each client bound to its own

Every node group's clients run in a worker process that has entered its group's namespace, so their
packets cross a real veth pair. Each node's path to the broker (`iotbed.emulation.paths`) becomes an HTB
class on the group's side of the pair (what the node sends) and one on the broker's side (what it
receives), selected by the node's address: its rate is the path's bottleneck bandwidth, and nodes of one
group whose bottleneck is one shared link or medium share a parent class of that bandwidth (nodes of two
groups behind one link each get its full rate: every group has a veth of its own). Under each class a `netem`
qdisc gives every packet its transmission time at that bandwidth (`rate`, as a simulated link does) and adds
the path's delay, jitter (normal) and loss (random, or `gemodel` for Gilbert-Elliott), with the path's queue
as its limit. A kernel without `netem` gets a `pfifo` of that size: HTB then only caps the rate of real
packets (a token bucket lets a lone packet through at once), and iotbed shapes what nodes publish in process
as well (`LinkShaper`: transmission time, delay, jitter, loss), and says so in the summary. Loss in the
kernel hits TCP segments, which TCP retransmits: MQTT never sees it, unlike in simulation or with the
in-process shaper, where a lost message is resent by MQTT after `retry_interval`.

The addresses exist only inside the run's namespaces (the root namespace gets one /30 in link-local space),
so nothing on the host's own networks is shadowed. `NetnsLab` is a context manager: leaving it deletes the
namespaces, which deletes their veths and qdiscs, also on Ctrl-C. A run killed outright leaves them behind;
the next `--netns` run removes namespaces whose owning process is gone.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iotbed.emulation.paths import NodePaths, PathShape
from iotbed.errors import IotbedError
from iotbed.naming import group_of
from iotbed.sim.links import BernoulliLoss, GilbertElliottLoss

CLONE_NEWNET = 0x40000000
BROKER_PORT = 1883
PREFIX = "iotbed-"
SEGMENT_BYTES = 1448  # TCP payload of one 1500-byte packet with timestamps: what a qdisc counts as one
UNSHAPED = "10gbit"  # the ceiling of a class whose path has delay or loss but no bandwidth limit


class NetnsError(IotbedError):
    """Network namespaces or tc could not be set up."""


@dataclass
class GroupNet:
    index: int
    group: str
    namespace: str
    hub_address: str  # the broker's address on this group's veth
    addresses: dict[str, str] = field(default_factory=dict)  # node -> its address


def _run(args: list[str], what: str, input_text: str | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, input=input_text, timeout=120)
    if result.returncode != 0:
        raise NetnsError(f"{what} failed: `{' '.join(args)}`: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def check_available() -> None:
    """Root and iproute2, or a clear error saying what to do instead."""
    if os.geteuid() != 0:
        raise NetnsError(
            "--netns needs root (it creates network namespaces and tc qdiscs); run as root, or leave "
            "out --netns: the in-process shaper shapes the same paths"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK):
            raise NetnsError(f"--netns needs `{tool}` from iproute2: `apt-get install -y iproute2`")


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces left by iotbed runs whose process is gone (a run killed with SIGKILL)."""
    removed = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = re.fullmatch(re.escape(prefix) + r"(\d+)-\w+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            removed.append(name)
    return removed


def enter(namespace: str) -> None:
    """Move the calling thread into `namespace`; sockets it opens from now on live there. Call it in a
    freshly forked worker before anything opens a socket or starts a thread (threads inherit it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"cannot enter network namespace {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _bits(rate_bytes_s: float) -> str:
    return f"{max(8, int(round(rate_bytes_s * 8)))}bit"


def _leaf(shape: PathShape, netem: bool, segments: int) -> str:
    """The qdisc under a node's class: netem with the path's transmission time, delay, jitter and loss, or a
    plain FIFO. The scenario's queue counts messages and a qdisc counts packets: a message of `segments` TCP
    segments takes that many places, and netem also counts the packets in its delay line."""
    limit = max(1, shape.queue) * segments
    if not netem:
        return f"pfifo limit {limit}"
    if shape.delay_s > 0 or shape.jitter_s > 0:
        in_flight = shape.rate_bytes_s * (shape.delay_s + 3 * shape.jitter_s) / SEGMENT_BYTES
        limit += math.ceil(in_flight) if math.isfinite(in_flight) else 10_000
    parts = [f"netem limit {limit}"]
    if math.isfinite(shape.rate_bytes_s):
        parts.append(f"rate {_bits(shape.rate_bytes_s)}")  # each packet takes its transmission time
    if shape.delay_s > 0 or shape.jitter_s > 0:
        parts.append(f"delay {shape.delay_s * 1e6:.0f}us")
        if shape.jitter_s > 0:
            parts.append(f"{shape.jitter_s * 1e6:.0f}us distribution normal")
    loss = shape.loss
    if isinstance(loss, BernoulliLoss) and loss.rate > 0:
        parts.append(f"loss random {loss.rate * 100:.6f}%")
    elif isinstance(loss, GilbertElliottLoss):
        # netem's gemodel: p (good->bad), r (bad->good), 1-h (loss in bad), 1-k (loss in good), in percent
        parts.append(
            f"loss gemodel {loss.p * 100:.6f}% {loss.r * 100:.6f}% {loss.loss_bad * 100:.6f}% "
            f"{loss.loss_good * 100:.6f}%"
        )
    return " ".join(parts)


def tc_script(
    device: str,
    nodes: dict[str, tuple[str, PathShape]],
    direction: str,
    netem: bool,
    message_bytes: int = SEGMENT_BYTES,
) -> tuple[list[str], dict[str, str]]:
    """`tc -batch` lines shaping `device`'s egress per node, and which class is whose (`1:5` -> node). `nodes`
    maps a node to (its address, the path its packets take through this device); `direction` is `src` (the
    node sends) or `dst` (it receives); `message_bytes` sizes the queues (the largest frame on the wire)."""
    segments = math.ceil(message_bytes / SEGMENT_BYTES)
    # default 0: what no filter claims (ARP, unshaped nodes) leaves at once, past every class
    lines = [f"qdisc add dev {device} root handle 1: htb default 0 r2q 100"]
    media: dict[str, list[str]] = {}  # a link several of these nodes' paths share -> those nodes
    for node, (_, shape) in nodes.items():
        if shape.shaped and shape.medium:
            media.setdefault(shape.medium, []).append(node)
    minor = 2
    owners: dict[str, str] = {}
    parents: dict[str, tuple[int, int]] = {}  # medium -> (class minor, members)
    for medium, members in sorted(media.items()):
        shape = nodes[members[0]][1]
        if len(members) > 1 and math.isfinite(shape.rate_bytes_s):
            lines.append(
                f"class add dev {device} parent 1: classid 1:{minor:x} htb rate {_bits(shape.rate_bytes_s)} "
                f"quantum 1514"
            )
            parents[medium] = (minor, len(members))
            minor += 1
    for node, (address, shape) in nodes.items():
        if not shape.shaped:
            continue
        ceil = _bits(shape.rate_bytes_s) if math.isfinite(shape.rate_bytes_s) else UNSHAPED
        parent = parents.get(shape.medium)
        if parent is not None:
            # a share of the medium guaranteed, all of it when the others are quiet
            rate = _bits(shape.rate_bytes_s / parent[1])
            lines.append(
                f"class add dev {device} parent 1:{parent[0]:x} classid 1:{minor:x} htb rate {rate} "
                f"ceil {ceil} quantum 1514"
            )
        else:
            lines.append(
                f"class add dev {device} parent 1: classid 1:{minor:x} htb rate {ceil} ceil {ceil} quantum 1514"
            )
        lines.append(f"qdisc add dev {device} parent 1:{minor:x} handle {minor:x}: {_leaf(shape, netem, segments)}")
        lines.append(
            f"filter add dev {device} parent 1: protocol ip prio 1 u32 match ip {direction} {address}/32 "
            f"flowid 1:{minor:x}"
        )
        owners[f"1:{minor:x}"] = node
        minor += 1
    return lines, owners


class NetnsLab:
    """The namespaces, veths, addresses and qdiscs of one run. `groups` maps each node group that runs a
    worker to its nodes' paths (`iotbed.emulation.paths.node_paths`)."""

    def __init__(
        self,
        groups: dict[str, dict[str, NodePaths]],
        *,
        message_bytes: int = SEGMENT_BYTES,
        run_id: str | None = None,
        netem: bool | None = None,
    ) -> None:
        self.run_id = run_id or str(os.getpid())
        self.prefix = f"{PREFIX}{self.run_id}-"
        self.broker_ns = f"{self.prefix}broker"
        self.paths = groups
        self.message_bytes = message_bytes
        self.groups: dict[str, GroupNet] = {}
        self._netem_forced = netem
        self.netem = False
        self.root_device = f"ibr{self.run_id}"[:15]
        self.broker_address = ""  # the broker's address as the root namespace reaches it
        self.classes: dict[tuple[str, str], dict[str, str]] = {}  # (group, up|down) -> class id -> node
        self._made: list[str] = []
        self._root_link = False

    # --- setting up -------------------------------------------------------------------------------------
    def __enter__(self) -> NetnsLab:
        check_available()
        remove_stale()
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _add_namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name], f"creating network namespace {name}")
        self._made.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"], f"bringing up lo in {name}")

    def _setup(self) -> None:
        if len(self.paths) > 150:
            raise NetnsError(f"--netns gives each node group a /16; {len(self.paths)} groups is more than 150")
        self._add_namespace(self.broker_ns)
        self.netem = self._probe_netem() if self._netem_forced is None else self._netem_forced
        self._link_root()
        for k, (group, nodes) in enumerate(sorted(self.paths.items()), start=1):
            if len(nodes) > 65_000:
                raise NetnsError(f"node group {group!r} has {len(nodes)} nodes; --netns takes at most 65,000 per group")
            net = GroupNet(k, group, f"{self.prefix}{k}", f"10.{100 + k}.0.1")
            self._add_namespace(net.namespace)
            hub, up = f"g{k}", "up0"
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    up,
                    "netns",
                    net.namespace,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    hub,
                    "netns",
                    self.broker_ns,
                ],
                f"creating the veth pair of group {group}",
            )
            batch = [
                f"addr add {net.hub_address}/16 dev {hub}",
                f"link set {hub} gso_max_size 1500",
                f"link set {hub} up",
            ]
            node_batch = [f"link set {up} gso_max_size 1500", f"link set {up} up"]
            for i, node in enumerate(sorted(nodes, key=_node_order)):
                host = i + 2
                net.addresses[node] = f"10.{100 + k}.{host >> 8}.{host & 255}"
                node_batch.append(f"addr add {net.addresses[node]}/16 dev {up}")
            _run(
                ["ip", "-n", self.broker_ns, "-batch", "-"],
                f"addressing the broker side of group {group}",
                "\n".join(batch) + "\n",
            )
            _run(
                ["ip", "-n", net.namespace, "-batch", "-"],
                f"addressing the nodes of group {group}",
                "\n".join(node_batch) + "\n",
            )
            for namespace, device, direction, end in (
                (net.namespace, up, "up", "src"),
                (self.broker_ns, hub, "down", "dst"),
            ):
                lines, owners = tc_script(
                    device,
                    {n: (net.addresses[n], getattr(p, direction)) for n, p in nodes.items()},
                    end,
                    self.netem,
                    self.message_bytes,
                )
                self._tc(namespace, lines, group)
                self.classes[(group, direction)] = owners
            self.groups[group] = net

    def _probe_netem(self) -> bool:
        probe = subprocess.run(
            ["tc", "-n", self.broker_ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            subprocess.run(["tc", "-n", self.broker_ns, "qdisc", "del", "dev", "lo", "root"], capture_output=True)
            return True
        return False

    def _link_root(self) -> None:
        """One veth from the root namespace to the broker's, in 169.254.213.0/24, so this process can check the
        broker's port and read its counters."""
        used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
        for block in range(64):
            root, broker = f"169.254.213.{block * 4 + 1}", f"169.254.213.{block * 4 + 2}"
            if f" {root}/" not in used and f" {broker}/" not in used:
                break
        else:
            raise NetnsError("no free /30 left in 169.254.213.0/24 for the broker's namespace")
        _run(
            ["ip", "link", "add", self.root_device, "type", "veth", "peer", "name", "root0", "netns", self.broker_ns],
            "creating the veth to the broker's namespace",
        )
        self._root_link = True
        _run(["ip", "addr", "add", f"{root}/30", "dev", self.root_device], "addressing the root side")
        _run(["ip", "link", "set", self.root_device, "up"], "bringing up the root side")
        _run(
            ["ip", "-n", self.broker_ns, "-batch", "-"],
            "addressing the broker's side",
            f"addr add {broker}/30 dev root0\nlink set root0 up\n",
        )
        self.broker_address = broker

    def _tc(self, namespace: str, lines: list[str], group: str) -> None:
        _run(["tc", "-n", namespace, "-batch", "-"], f"shaping the links of group {group}", "\n".join(lines) + "\n")

    # --- using it ----------------------------------------------------------------------------------------
    def namespace_of(self, node: str) -> GroupNet:
        for net in self.groups.values():
            if node in net.addresses:
                return net
        raise KeyError(node)

    def class_stats(self) -> list[dict[str, Any]]:
        """Per shaped node and direction: bytes and packets that left its class's leaf qdisc, and what the leaf
        dropped (queue full, or netem's loss), from `tc -s -j qdisc show`. Call it before leaving the lab."""
        rows = []
        for net in self.groups.values():
            for namespace, device, direction in (
                (net.namespace, "up0", "up"),
                (self.broker_ns, f"g{net.index}", "down"),
            ):
                owners = self.classes.get((net.group, direction), {})
                for leaf in _tc_json(["tc", "-n", namespace, "-s", "-j", "qdisc", "show", "dev", device]):
                    node = owners.get(str(leaf.get("parent", "")))
                    if node is not None:
                        rows.append(
                            {
                                "node": node,
                                "direction": direction,
                                "qdisc": leaf.get("kind", ""),
                                "bytes": int(leaf.get("bytes", 0)),
                                "packets": int(leaf.get("packets", 0)),
                                "drops": int(leaf.get("drops", 0)),
                            }
                        )
        return rows

    def teardown(self) -> None:
        # Deleting a namespace deletes the veths in it, their peers, and every qdisc on them.
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        self._made.clear()
        if self._root_link:
            subprocess.run(["ip", "link", "delete", self.root_device], capture_output=True)
            self._root_link = False

    def describe(self) -> dict[str, Any]:
        return {
            "mode": "kernel (network namespaces, veth, tc)",
            "netem": self.netem,
            "bandwidth": "htb per node (nodes of one group behind one shared link or medium share its rate)",
            "transmission_delay_jitter_loss": "netem per node, both directions"
            if self.netem
            else "in process, on what cameras publish (this kernel has no netem; htb only caps the rate)",
            "groups": {g.group: {"namespace": g.namespace, "nodes": len(g.addresses)} for g in self.groups.values()},
        }


def _tc_json(args: list[str]) -> list[dict[str, Any]]:
    import json

    result = subprocess.run(args, capture_output=True, text=True)
    try:
        parsed = json.loads(result.stdout) if result.returncode == 0 else []
    except ValueError:  # an iproute2 without JSON for this object
        return []
    return parsed if isinstance(parsed, list) else []


def _node_order(node: str) -> tuple[str, int]:
    group, _, index = node.rpartition("-")
    return (group, int(index)) if index.isdigit() else (node, -1)


def by_group(paths: dict[str, NodePaths], nodes: Iterable[str]) -> dict[str, dict[str, NodePaths]]:
    out: dict[str, dict[str, NodePaths]] = {}
    for node in nodes:
        out.setdefault(group_of(node), {})[node] = paths[node]
    return out
