"""Kernel-shaped links for live runs (`iotbed emulate --netns`): network namespaces, veth pairs, `tc`, nftables.

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
groups behind one link each get its full rate: every group has a veth of its own).

With `netem` in the kernel, a `netem` qdisc under each class gives every packet its transmission time at that
bandwidth (`rate`, as a simulated link does) and adds the path's delay, jitter (normal) and loss (random, or
`gemodel` for Gilbert-Elliott), with the path's queue as its limit.

Without `netem` (a kernel built without sch_netem), each class gets a `pfifo` of that size, and:
- rate: HTB only caps the rate of real packets (a token bucket lets a lone packet through at once), so each
  camera also gives its messages their transmission time in process (`LinkShaper`);
- delay and jitter: in process only, on what cameras publish, before the kernel sees it. What other nodes
  send, MQTT's acknowledgements and the broker-to-subscriber leg get none;
- loss: in the kernel, by nftables (`loss_rules`): a table `inet iotbed_loss` whose prerouting chain sends
  each lossy node's TCP packets, through one verdict map keyed by its address, to a chain of its own with
  `numgen random mod 1000000 < k counter drop` (k: the path's Bernoulli rate in millionths). What a node sends
  is dropped on arrival at the broker's side of its veth (in the broker's namespace, matched by source);
  what it receives, on arrival at its own side (in its group's namespace, matched by destination): both
  directions, after the packet took its transmission time, as the simulator loses a packet. (Not in the
  sender's own output path: a drop there comes back to its TCP as a local error and goes again at once.)
  The kernel's TCP resends what is dropped, so MQTT sees no loss and resends nothing, as over simulated
  TCP; but it times its repairs by the RTT it sees, which lacks the path's delay (that is added in process).
  The in-process shaper then loses nothing and drops nothing from its queue. nftables' `numgen` draws each
  packet on its own, so Gilbert-Elliott (burst) loss cannot be done: a run with it is refused, before
  anything is prepared, with what to use instead (`refuse_bursty_loss`).
The summary's `shaping` names the mechanism of each of rate, delay, jitter and loss (`describe`), with what
nftables dropped each way and the kernel's TCP retransmission counters of the run's namespaces; per node,
`kernel_links.csv` has the qdisc's counters and `loss_drops`.

The addresses exist only inside the run's namespaces (the root namespace gets one /30 in link-local space),
so nothing on the host's own networks is shadowed. `NetnsLab` is a context manager: leaving it deletes the
namespaces, which deletes their veths, qdiscs and nftables tables (nftables state belongs to its namespace;
none is put in the host's), also on Ctrl-C. A run killed outright leaves them behind;
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
LOSS_TABLE = "iotbed_loss"  # the nftables table (family inet) of a namespace's loss rules
LOSS_SCALE = 1_000_000  # nftables draws `numgen random mod` this: loss rates in steps of 1e-6
# What the kernel counts of its TCP's repairs, per namespace (/proc/net/snmp's Tcp, /proc/net/netstat's TcpExt).
TCP_COUNTERS = (
    "RetransSegs",
    "TCPFastRetrans",
    "TCPSlowStartRetrans",
    "TCPLossProbes",
    "TCPTimeouts",
    "TCPSynRetrans",
)


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


def _netem_in(namespace: str) -> bool:
    probe = subprocess.run(
        ["tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        subprocess.run(["tc", "-n", namespace, "qdisc", "del", "dev", "lo", "root"], capture_output=True)
        return True
    return False


def netem_available() -> bool:
    """Whether this kernel has netem, tried in a throwaway namespace (root only)."""
    name = f"{PREFIX}{os.getpid()}-probe"
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    _run(["ip", "netns", "add", name], "creating a namespace to probe for netem")
    try:
        return _netem_in(name)
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def bursty_loss_nodes(paths: dict[str, NodePaths]) -> list[str]:
    """The nodes whose path has Gilbert-Elliott loss, which only netem can apply: nftables' numgen drops each
    packet on its own, with no state to carry a burst from one packet to the next."""
    return sorted(
        n
        for n, p in paths.items()
        if isinstance(p.up.loss, GilbertElliottLoss) or isinstance(p.down.loss, GilbertElliottLoss)
    )


def refuse_bursty_loss(nodes: list[str], paths: dict[str, NodePaths]) -> None:
    """A clear error for Gilbert-Elliott loss under --netns on a kernel without netem."""
    if not nodes:
        return
    loss = next(
        p.up.loss if isinstance(p.up.loss, GilbertElliottLoss) else p.down.loss for n, p in paths.items() if n in nodes
    )
    assert isinstance(loss, GilbertElliottLoss)
    shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
    raise NetnsError(
        f"gilbert_elliott loss on the paths of {shown} needs the kernel's netem, which this kernel lacks "
        f"(`modprobe sch_netem`): without it --netns drops packets with nftables' numgen, which draws each "
        f"packet on its own and cannot make bursts. Use `model: bernoulli` (this one's mean rate is "
        f"{loss.mean_loss:.4g}), or run without --netns: the in-process shaper models Gilbert-Elliott loss"
    )


def nft_available() -> bool:
    return shutil.which("nft") is not None or os.access("/usr/sbin/nft", os.X_OK)


def loss_rules(
    nodes: dict[str, tuple[str, PathShape]], direction: str, device: str
) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """`nft -f` lines that drop each lossy node's TCP packets at random, at its path's Bernoulli rate, as they
    arrive through `device` (`direction`: `up`, what the node sends, matched by source address, arriving at the
    broker's side; `down`, what it receives, by destination, arriving at the node's side); and which chain
    counts whose drops (chain -> (node, direction)). One chain per node, reached through one verdict map, so a
    packet costs one lookup however many nodes there are. The drop happens on arrival, after the packet took
    its transmission time: a drop in the sender's own output path would come back to its TCP as a local
    error (EPERM) and go again at once, not as a loss in the network (measured: `iotbed.emulation.tcp_validation`)."""
    field_ = {"up": "saddr", "down": "daddr"}[direction]
    lines = [
        f"add table inet {LOSS_TABLE}",
        # before conntrack (-200): a dropped packet leaves no trace in the connection's state
        f"add chain inet {LOSS_TABLE} arrive {{ type filter hook prerouting priority -300 ; policy accept ; }}",
    ]
    chains: dict[str, tuple[str, str]] = {}
    verdicts = []
    for node, (address, shape) in nodes.items():
        loss = shape.loss
        if isinstance(loss, GilbertElliottLoss):
            raise NetnsError(f"{node}: gilbert_elliott loss cannot be applied by nftables (see refuse_bursty_loss)")
        if not isinstance(loss, BernoulliLoss):
            continue
        threshold = round(loss.rate * LOSS_SCALE)
        if threshold <= 0:  # below half a millionth: too rare to matter, and numgen's steps are millionths
            continue
        chain = f"{direction}_{address.replace('.', '_')}"
        lines.append(f"add chain inet {LOSS_TABLE} {chain}")
        lines.append(f"add rule inet {LOSS_TABLE} {chain} numgen random mod {LOSS_SCALE} < {threshold} counter drop")
        chains[chain] = (node, direction)
        verdicts.append(f"{address} : jump {chain}")
    if not verdicts:
        return [], {}
    lines.append(
        f'add rule inet {LOSS_TABLE} arrive iifname "{device}" meta l4proto tcp '
        f"ip {field_} vmap {{ {', '.join(verdicts)} }}"
    )
    return lines, chains


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
        self.loss_chains: dict[str, dict[str, tuple[str, str]]] = {}  # namespace -> chain -> (node, up|down)
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
        every = {n: p for nodes in self.paths.values() for n, p in nodes.items()}
        if not self.netem:
            refuse_bursty_loss(bursty_loss_nodes(every), every)
            lossy = any(isinstance(loss, BernoulliLoss) for p in every.values() for loss in (p.up.loss, p.down.loss))
            if lossy and not nft_available():
                raise NetnsError(
                    "--netns applies link loss with nftables where the kernel has no netem: "
                    "`apt-get install -y nftables`"
                )
        broker_rules: list[str] = []
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
                if not self.netem:
                    device = hub if direction == "up" else up  # where the packet arrives
                    rules, chains = loss_rules(
                        {n: (net.addresses[n], getattr(p, direction)) for n, p in nodes.items()}, direction, device
                    )
                    if direction == "up":
                        broker_rules += rules
                    elif rules:
                        self._nft(net.namespace, rules, f"the loss rules of group {group}")
                    if chains:
                        self.loss_chains.setdefault(self.broker_ns if direction == "up" else net.namespace, {}).update(
                            chains
                        )
            self.groups[group] = net
        if broker_rules:
            self._nft(self.broker_ns, broker_rules, "the loss rules of what nodes send")

    def _probe_netem(self) -> bool:
        return _netem_in(self.broker_ns)

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

    def _nft(self, namespace: str, lines: list[str], what: str) -> None:
        # nftables state belongs to the namespace: deleting the namespace deletes these tables with it
        _run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], f"adding {what}", "\n".join(lines) + "\n")

    # --- using it ----------------------------------------------------------------------------------------
    def namespace_of(self, node: str) -> GroupNet:
        for net in self.groups.values():
            if node in net.addresses:
                return net
        raise KeyError(node)

    def loss_drops(self) -> dict[tuple[str, str], int]:
        """Packets nftables dropped, per (node, up|down), from the rules' counters. Call it before leaving."""
        drops: dict[tuple[str, str], int] = {}
        for namespace, chains in self.loss_chains.items():
            listing = subprocess.run(
                ["ip", "netns", "exec", namespace, "nft", "-j", "list", "table", "inet", LOSS_TABLE],
                capture_output=True,
                text=True,
            )
            for chain, packets in _chain_counters(listing.stdout).items():
                if chain in chains:
                    drops[chains[chain]] = packets
        return drops

    def tcp_counters(self) -> dict[str, dict[str, int]]:
        """The kernel's TCP retransmission counters of the run, summed over the nodes' namespaces (`nodes`: what
        the nodes resent) and the broker's (`broker`: what Mosquitto resent). Each namespace is the run's own,
        so they count this run alone. Call it before leaving the lab."""
        out = {}
        for side, namespaces in (("nodes", [g.namespace for g in self.groups.values()]), ("broker", [self.broker_ns])):
            total = dict.fromkeys(TCP_COUNTERS, 0)
            for namespace in namespaces:
                text = subprocess.run(
                    ["ip", "netns", "exec", namespace, "cat", "/proc/net/snmp", "/proc/net/netstat"],
                    capture_output=True,
                    text=True,
                ).stdout
                for key, value in _proc_counters(text).items():
                    if key in total:
                        total[key] += value
            out[side] = total
        return out

    def class_stats(self) -> list[dict[str, Any]]:
        """Per shaped node and direction: bytes and packets that left its class's leaf qdisc, what the leaf
        dropped (queue full, or netem's loss), from `tc -s -j qdisc show`, and what nftables' loss rules dropped
        on arrival (`loss_drops`). Call it before leaving the lab."""
        dropped = self.loss_drops()
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
                                "loss_drops": dropped.get((node, direction), 0),
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

    def describe(self, counters: bool = False) -> dict[str, Any]:
        """The summary's `shaping`: which mechanism applies rate, delay, jitter and loss; with `counters`, what
        the kernel dropped and what its TCP resent (call it before leaving the lab)."""
        rate = "htb per node, both directions (nodes of one group behind one shared link or medium share its rate)"
        if self.netem:
            timing = "netem per node, both directions"
            out = {
                "mode": "kernel (network namespaces, veth, tc)",
                "netem": True,
                "rate": rate + "; netem gives each packet its transmission time",
                "delay": timing,
                "jitter": timing + " (normal)",
                "loss": "netem per node, both directions (random, or gemodel for Gilbert-Elliott); the kernel's TCP "
                "resends what it drops, MQTT resends nothing",
            }
        else:
            in_process = (
                "in process, on what cameras publish, before the kernel sees it (this kernel has no netem); "
                "what other nodes send, MQTT's acknowledgements and the broker-to-subscriber leg get none"
            )
            out = {
                "mode": "kernel (network namespaces, veth, tc, nftables)",
                "netem": False,
                "rate": rate + "; htb only caps the rate (a lone packet leaves at once), so each camera's messages "
                "also take their transmission time in process",
                "delay": in_process,
                "jitter": in_process + " (normal, truncated at zero)",
                "loss": f"kernel, nftables per node, both directions: `numgen random mod {LOSS_SCALE} < k drop` on "
                "the TCP packets a node sends (on arrival at the broker's side of its veth) and receives (on arrival "
                "at its own side); the kernel's TCP resends what is dropped, MQTT resends nothing; Bernoulli only "
                "(Gilbert-Elliott needs netem)",
                "loss_repair_timing": "the kernel's TCP times its repairs by the RTT it sees, which lacks the path's "
                "delay (applied in process, before the kernel)",
            }
        out["transport"] = "tcp (the kernel's, whatever the scenario's broker.transport says)"
        out["groups"] = {g.group: {"namespace": g.namespace, "nodes": len(g.addresses)} for g in self.groups.values()}
        if counters:
            drops = self.loss_drops()
            out["loss_drops"] = {
                "up": sum(v for (_, d), v in drops.items() if d == "up"),
                "down": sum(v for (_, d), v in drops.items() if d == "down"),
            }
            out["kernel_tcp"] = self.tcp_counters()
        return out


def _tc_json(args: list[str]) -> list[dict[str, Any]]:
    import json

    result = subprocess.run(args, capture_output=True, text=True)
    try:
        parsed = json.loads(result.stdout) if result.returncode == 0 else []
    except ValueError:  # an iproute2 without JSON for this object
        return []
    return parsed if isinstance(parsed, list) else []


def _chain_counters(listing: str) -> dict[str, int]:
    """chain -> packets its rule counted, from `nft -j list table`."""
    import json

    try:
        items = json.loads(listing)["nftables"] if listing.strip() else []
    except (ValueError, KeyError):
        return {}
    counted: dict[str, int] = {}
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not rule:
            continue
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                counted[rule["chain"]] = counted.get(rule["chain"], 0) + int(expr["counter"]["packets"])
    return counted


def _proc_counters(text: str) -> dict[str, int]:
    """name -> value from /proc/net/snmp and /proc/net/netstat: a `Prefix: names` line, then `Prefix: values`."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for names, values in zip(lines, lines[1:]):
        prefix, _, keys = names.partition(":")
        head, _, numbers = values.partition(":")
        if head != prefix or not keys.split() or keys.split()[0].lstrip("-").isdigit():
            continue
        for key, value in zip(keys.split(), numbers.split()):
            if value.lstrip("-").isdigit():
                out[key] = int(value)
    return out


def _node_order(node: str) -> tuple[str, int]:
    group, _, index = node.rpartition("-")
    return (group, int(index)) if index.isdigit() else (node, -1)


def by_group(paths: dict[str, NodePaths], nodes: Iterable[str]) -> dict[str, dict[str, NodePaths]]:
    out: dict[str, dict[str, NodePaths]] = {}
    for node in nodes:
        out.setdefault(group_of(node), {})[node] = paths[node]
    return out
