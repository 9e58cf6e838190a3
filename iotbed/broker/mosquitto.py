"""A Mosquitto broker for live runs and tests: the process, its generated config file and its state file.

`MosquittoBroker` writes everything it needs into one run directory (config, password file, ACL file, CA
and server certificate, persistence database, log), starts `mosquitto -c <config>` on 127.0.0.1 and a free
port, and waits until the port accepts TCP connections. `stop()` ends it (SIGTERM, or SIGKILL with
`kill=True`), `restart()` stops and starts it again on the same port with the same persistence database,
which is how tests and emulations inject broker faults. Used as a context manager it always stops the broker,
also when the body raises; a broker left running at interpreter exit is stopped by an atexit hook.

What a restart keeps (Mosquitto 2.0.11; the simulated broker, `SimBroker.crash`, keeps the same): with
persistence and a SIGTERM (the database is written on exit), persistent sessions (clean_session off, or
clean_start off with a session expiry), their non-shared subscriptions, the QoS 1/2 messages queued for them
and those in flight to them (sent again with DUP), and retained messages. Not their shared subscriptions
($share/...): the session comes back present but no longer a member of its group, so until it subscribes
again what is published to the group finds no subscriber and is dropped (acknowledged to its publisher all
the same). Clean sessions, and everything without persistence, are gone. A SIGKILL keeps the database of the
last autosave (none by default within 30 min; `autosave_on_changes` writes it per change).

`iotbed broker start|stop` use `start_detached()` / `stop_detached()`: the broker runs in its own session
and a state file (`broker.json` in the run directory: pid, host, port, config path, ...) lets a later
command find and stop it.

Users, the password file and the ACL by role are in `iotbed.broker.broker_auth`; the generated CA and
server certificate in `iotbed.broker.broker_tls`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from iotbed.broker.broker_auth import (
    DEFAULT_ROLES,
    BrokerUser,
    Rule,
    acl_text,
    privacy_rules,
    write_password_file,
)
from iotbed.broker.broker_errors import BrokerError
from iotbed.broker.broker_tls import generate_tls_files
from iotbed.naming import group_nodes

if TYPE_CHECKING:
    from iotbed.scenario.schema import Scenario

INSTALL_HINT = "install it with `sudo apt-get install -y mosquitto mosquitto-clients` (Debian/Ubuntu)"
STATE_FILE = "broker.json"
DEFAULT_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    persistence: bool = False
    # Nagle's algorithm off on the broker's sockets (set_tcp_nodelay); False: on, as Mosquitto leaves it. A
    # scenario's `broker.tcp_nodelay`.
    tcp_nodelay: bool = False
    autosave_interval_s: int | None = None  # Mosquitto's default is 1800 s; the db is always saved on SIGTERM
    # Save after every `autosave_interval_s` (default 1) changes instead of seconds: state survives SIGKILL
    # except for the last few microseconds before the kill. Costs a database write per message.
    autosave_on_changes: bool = False
    users: tuple[BrokerUser, ...] = ()  # empty: anonymous access, no ACL
    roles: Mapping[str, tuple[Rule, ...]] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    acl: bool = True  # with users: also generate and enforce the role ACL
    # With users: bind each user to one client id, its name (`use_username_as_clientid`): Mosquitto replaces
    # the client id an authenticated client sends by its user name, so a user can only ever be the client
    # whose id is its name. Without it, a client with a camera's credentials could connect as `edge-0` and
    # Mosquitto would disconnect the real edge-0 (one session per client id). Clients that share a user then
    # share one session too: each connect takes the session over from the previous one.
    bind_client_ids: bool = True
    tls: bool = False  # the listener speaks TLS with a generated CA and server certificate
    max_queued_messages: int = 1000  # per client, QoS 1/2 messages queued while offline or beyond inflight
    max_inflight_messages: int | None = None
    persistent_client_expiration: str | None = None  # e.g. "1h", "2d": MQTT 3.1.1 persistent sessions expire
    max_packet_size: int | None = None  # bytes; Mosquitto disconnects a client sending more
    sys_interval_s: int = 1  # how often $SYS counters are published (Mosquitto's default: 10 s)
    netns: str | None = None  # run inside this network namespace (`ip netns exec`), for `iotbed emulate --netns`
    log_types: tuple[str, ...] = ("error", "warning", "notice", "information")
    extra_lines: tuple[str, ...] = ()


def scenario_client_roles(scenario: Scenario) -> dict[str, str]:
    """The MQTT client ids a live run of `scenario` connects as, each a user of its own -> that user's role.

    One per camera, gateway and edge server node (routers are no MQTT clients), one per extra client the
    scenario runs on such a node, with that node's role, and `registry` and `monitor` (the $SYS reader of
    the run summary). Under `BrokerConfig.bind_client_ids` a client logs in as the user named like its
    client id (`iotbed.emulation.live` does so where there is one, else as its node): an extra client
    without a user of its own would log in as its node and take over the node's session.
    """
    n = scenario.nodes
    group_roles = (
        {g.name: "camera" for g in n.cameras}
        | {g.name: "gateway" for g in n.gateways}
        | {g.name: "edge" for g in n.edge_servers}
        | {g.name: "cloud" for g in [*n.clouds, *n.reviewers]}
    )
    roles = {
        node: group_roles[group]
        for group, count in scenario.group_counts().items()
        if group in group_roles
        for node in group_nodes(group, count)
    }
    # Clients besides the node's own, as (client id, node); see `iotbed.deployment.build_nodes`.
    from iotbed.trust.channel_setup import attacker_clients

    extra = [(f"rogue@{u.publisher}", u.publisher) for u in scenario.registry.updates if u.publisher is not None]
    extra += attacker_clients(scenario)
    for client_id, node in extra:
        resolved = scenario.resolve_node(node)
        if resolved in roles:
            roles.setdefault(client_id, roles[resolved])
    return roles | {"registry": "registry", "monitor": "monitor"}


def scenario_extra_rules(scenario: Scenario) -> dict[str, tuple[Rule, ...]]:
    """Client id -> ACL rules beyond its role: the encrypted protocol's topics for the cameras that encrypt
    and for every edge server, where any camera does (`broker_auth.privacy_rules`)."""
    encrypting = [g for g in scenario.nodes.cameras if g.privacy is not None]
    if not encrypting:
        return {}
    interactive = encrypting[0].privacy.mode == "interactive"  # type: ignore[union-attr]
    extra = {node: privacy_rules("camera", interactive) for g in encrypting for node in group_nodes(g.name, g.count)}
    for group in scenario.nodes.edge_servers:
        extra |= {node: privacy_rules("edge", interactive) for node in group_nodes(group.name, group.count)}
    return extra


def find_binary(name: str = "mosquitto") -> str:
    """The path of `mosquitto` (or another Mosquitto tool); `$IOTBED_MOSQUITTO` overrides the broker's."""
    if name == "mosquitto" and os.environ.get("IOTBED_MOSQUITTO"):
        path = os.environ["IOTBED_MOSQUITTO"]
        if not os.access(path, os.X_OK):
            raise BrokerError(f"$IOTBED_MOSQUITTO={path} is not an executable file")
        return path
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        raise BrokerError(f"`{name}` was not found on PATH or in /usr/sbin; {INSTALL_HINT}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_accepts(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --- the broker --------------------------------------------------------------------------------------------
class MosquittoBroker:
    """One Mosquitto process and its run directory.

    >>> with MosquittoBroker(tmp_path, BrokerConfig(persistence=True)) as broker:
    ...     broker.port, broker.restart(kill=True)
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        config: BrokerConfig | None = None,
        *,
        binary: str | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        passwd_tool: str | None = "auto",
        reach_host: str | None = None,
    ) -> None:
        self.config = config or BrokerConfig()
        self._own_dir = run_dir is None
        self.run_dir = Path(tempfile.mkdtemp(prefix="iotbed-mosquitto-")) if run_dir is None else Path(run_dir)
        self.binary = binary or find_binary()
        self.start_timeout_s = start_timeout_s
        self.passwd_tool = passwd_tool
        # Where this process reaches the broker: its listening address, unless it listens inside a network
        # namespace (then the namespace's address as seen from here).
        self.host = reach_host or self.config.host
        self.port: int = self.config.port or 0
        self.config_path = self.run_dir / "mosquitto.conf"
        self.log_path = self.run_dir / "mosquitto.log"
        self.state_path = self.run_dir / STATE_FILE
        self.ca_file: Path | None = None
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._detached = False

    # --- files -------------------------------------------------------------------------------------------
    @property
    def users(self) -> dict[str, BrokerUser]:
        return {u.username: u for u in self.config.users}

    def credentials(self, username: str) -> tuple[str, str]:
        user = self.users[username]
        return user.username, user.password

    @property
    def persistence_dir(self) -> Path:
        return self.run_dir / "persistence"

    def _prepare(self) -> None:
        if self._prepared:
            return
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        if cfg.users:
            write_password_file(self.run_dir / "passwords", cfg.users, self.passwd_tool)
            if cfg.acl:
                (self.run_dir / "acl").write_text(acl_text(cfg.users, cfg.roles))
        if cfg.tls:
            self.ca_file, _, _ = generate_tls_files(self.run_dir / "tls", (cfg.host, "localhost"))
        if cfg.persistence:
            self.persistence_dir.mkdir(exist_ok=True)
        self._write_config()
        self._prepared = True

    def _write_config(self) -> None:
        cfg = self.config
        lines = [
            "# generated by iotbed (iotbed.broker.mosquitto); edits are overwritten",
            "per_listener_settings false",
            f"set_tcp_nodelay {'true' if cfg.tcp_nodelay else 'false'}",
            f"listener {self.port} {cfg.host}",
        ]
        if cfg.tls:
            tls = self.run_dir / "tls"
            lines += [
                f"cafile {tls / 'ca.crt'}",
                f"certfile {tls / 'server.crt'}",
                f"keyfile {tls / 'server.key'}",
                "require_certificate false",
                "tls_version tlsv1.2",
            ]
        if cfg.users:
            lines += ["allow_anonymous false", f"password_file {self.run_dir / 'passwords'}"]
            if cfg.acl:
                lines.append(f"acl_file {self.run_dir / 'acl'}")
            if cfg.bind_client_ids:
                lines.append("use_username_as_clientid true")
        else:
            lines.append("allow_anonymous true")
        if cfg.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.persistence_dir}/",
                "persistence_file mosquitto.db",
            ]
            if cfg.autosave_on_changes:
                lines += ["autosave_on_changes true", f"autosave_interval {cfg.autosave_interval_s or 1}"]
            elif cfg.autosave_interval_s is not None:
                lines.append(f"autosave_interval {cfg.autosave_interval_s}")
        else:
            lines.append("persistence false")
        lines.append(f"sys_interval {cfg.sys_interval_s}")
        lines.append(f"max_queued_messages {cfg.max_queued_messages}")
        if cfg.max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {cfg.max_inflight_messages}")
        if cfg.persistent_client_expiration:
            lines.append(f"persistent_client_expiration {cfg.persistent_client_expiration}")
        if cfg.max_packet_size is not None:
            lines.append(f"max_packet_size {cfg.max_packet_size}")
        lines += [
            "log_dest stdout",
            *(f"log_type {t}" for t in cfg.log_types),
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else Mosquitto drops to `mosquitto`, who cannot read the run directory
        lines += list(cfg.extra_lines)
        self.config_path.write_text("\n".join(lines) + "\n")

    # --- process -----------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.config.tls else 'mqtt'}://{self.host}:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, detach: bool = False) -> MosquittoBroker:
        if self.running:
            return self
        self._prepare()
        auto_port = self.config.port is None and self.starts == 0
        for attempt in range(3 if auto_port else 1):
            try:
                self._spawn(detach)
                break
            except BrokerError as exc:
                if attempt == 2 or not auto_port or "already in use" not in f"{exc} {self.log_tail(5)}":
                    raise
                self.port = free_port(self.host)  # somebody took the port between our probe and the bind
                self._write_config()
        self.starts += 1
        self._detached = detach
        self.write_state()
        if not detach:
            atexit.register(self._atexit)
        return self

    def _spawn(self, detach: bool) -> None:
        if port_accepts(self.host, self.port, 0.05):
            raise BrokerError(f"port {self.host}:{self.port} is already in use by another process")
        with open(self.log_path, "ab") as log:
            command = [self.binary, "-c", str(self.config_path)]
            if self.config.netns is not None:
                command = ["ip", "netns", "exec", self.config.netns, *command]
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BrokerError(
                    f"mosquitto exited with code {code} during start-up (config {self.config_path});"
                    f" log tail:\n{self.log_tail()}"
                )
            if port_accepts(self.host, self.port):
                return
            time.sleep(0.02)
        self._terminate(kill=True)
        raise BrokerError(
            f"mosquitto did not accept connections on {self.host}:{self.port} within "
            f"{self.start_timeout_s:.0f} s; log tail:\n{self.log_tail()}"
        )

    def _terminate(self, kill: bool, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def stop(self, kill: bool = False, timeout_s: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence db and exits) or, with `kill`, SIGKILL (state since the
        last autosave is lost). Waits for the process to end."""
        self._terminate(kill, timeout_s)
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)
        with contextlib.suppress(OSError):
            self.state_path.unlink()

    def restart(self, kill: bool = False, down_s: float = 0.0) -> None:
        """Stop and start again on the same port, with the same config and persistence database."""
        detach = self._detached
        self.stop(kill=kill)
        if down_s > 0:
            time.sleep(down_s)
        self.start(detach=detach)

    def cleanup(self) -> None:
        """Stop, and remove the run directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self._terminate(kill=False, timeout_s=3.0)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- state file for `iotbed broker start|stop` ------------------------------------------------------
    def state(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "config": str(self.config_path),
            "log": str(self.log_path),
            "run_dir": str(self.run_dir),
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "binary": self.binary,
            "started_at": time.time(),
        }

    def write_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        tmp.replace(self.state_path)


def start_detached(run_dir: str | Path, config: BrokerConfig | None = None, **kwargs: object) -> MosquittoBroker:
    """Start a broker that outlives this process (for `iotbed broker start`); its state file is
    `<run_dir>/broker.json`. Refuses to start a second one in the same run directory."""
    run_dir = Path(run_dir)
    existing = read_state(run_dir)
    if existing is not None and _is_our_broker(existing):
        raise BrokerError(
            f"a broker started from {run_dir} is already running (pid {existing['pid']}, "
            f"port {existing['port']}); stop it with `iotbed broker stop`"
        )
    return MosquittoBroker(run_dir, config, **kwargs).start(detach=True)  # type: ignore[arg-type]


def read_state(run_dir: str | Path) -> dict[str, object] | None:
    path = Path(run_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BrokerError(f"broker state file {path} is unreadable: {exc}") from exc


def _is_our_broker(state: Mapping[str, object]) -> bool:
    """The pid is alive and is a mosquitto running our config (not a process that reused the pid)."""
    pid = state.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(state.get("config")).encode() in cmdline


def stop_detached(run_dir: str | Path, timeout_s: float = 10.0) -> bool:
    """Stop the broker `start_detached` left in `run_dir`; False if none was running."""
    state = read_state(run_dir)
    path = Path(run_dir) / STATE_FILE
    if state is None:
        return False
    if not _is_our_broker(state):
        path.unlink(missing_ok=True)  # stale: the broker is gone
        return False
    pid = int(state["pid"])  # type: ignore[arg-type]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _is_our_broker(state):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        time.sleep(0.02)
    if _is_our_broker(state):
        os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True
