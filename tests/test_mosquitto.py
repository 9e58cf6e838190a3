"""The Mosquitto launcher: generated config, passwords, ACL, TLS files, start/stop/restart, state file."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
from pathlib import Path

import pytest
import simpy.rt
from mosquitto_fixtures import WAIT_S

from iotbed.broker.broker_auth import DEFAULT_ROLES, BrokerUser, acl_text, hash_password
from iotbed.broker.broker_errors import BrokerError
from iotbed.broker.mosquitto import (
    BrokerConfig,
    MosquittoBroker,
    find_binary,
    free_port,
    port_accepts,
    read_state,
    start_detached,
    stop_detached,
)
from iotbed.broker.mqtt_transport import MqttTransport
from iotbed.broker.realtime import wait_for


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def test_missing_binary_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOTBED_MOSQUITTO", raising=False)
    with pytest.raises(BrokerError, match="apt-get install -y mosquitto"):
        find_binary("mosquitto-that-does-not-exist")
    monkeypatch.setenv("IOTBED_MOSQUITTO", "/nonexistent/mosquitto")
    with pytest.raises(BrokerError, match="IOTBED_MOSQUITTO"):
        find_binary()


def test_acl_from_roles() -> None:
    users = [
        BrokerUser("cam-3", "p", "camera"),
        BrokerUser("edge-0", "p", "edge"),
        BrokerUser("registry", "p", "registry"),
        BrokerUser("gw", "p", "gateway", extra_rules=(("read", "status/#"),)),
    ]
    text = acl_text(users, DEFAULT_ROLES)
    blocks = {block.split("\n")[1]: block.split("\n")[2:] for block in text.split("# role ")[1:]}
    assert [line for line in blocks["user cam-3"] if line] == ["topic write frames/cam-3", "topic write status/cam-3"]
    assert "topic read frames/#" in blocks["user edge-0"] and "topic read models/#" in blocks["user edge-0"]
    # an edge publishes the models it repairs (CoDefend), never frames
    assert "topic write models/#" in blocks["user edge-0"]
    assert not any(line.startswith("topic write frames") for line in blocks["user edge-0"])
    # a gateway may publish quarantine notices and no model
    assert [line for line in blocks["user gw"] if line.startswith("topic write models")] == [
        "topic write models/quarantine"
    ]
    assert "topic write models/#" in blocks["user registry"]
    assert "topic read status/#" in blocks["user gw"]
    with pytest.raises(BrokerError, match="known roles"):
        acl_text([BrokerUser("x", "p", "pilot")], {"camera": ()})


def test_python_password_hash_matches_the_mosquitto_format() -> None:
    salt = bytes(range(12))
    line = hash_password("secret", salt)
    _, kind, iterations, salt64, hash64 = line.split("$")
    assert (kind, iterations, base64.b64decode(salt64)) == ("7", "101", salt)
    assert base64.b64decode(hash64) == hashlib.pbkdf2_hmac("sha512", b"secret", salt, 101, 64)


def test_generated_config(tmp_path: Path, mosquitto_binary: str) -> None:
    users = (BrokerUser("cam-0", "pw", "camera"),)
    config = BrokerConfig(
        users=users,
        persistence=True,
        tls=True,
        max_queued_messages=77,
        persistent_client_expiration="2h",
        max_packet_size=1 << 20,
    )
    pytest.importorskip("cryptography")
    broker = MosquittoBroker(tmp_path / "b", config, binary=mosquitto_binary)
    broker._prepare()
    text = broker.config_path.read_text()
    run = tmp_path / "b"
    for line in (
        f"listener {broker.port} 127.0.0.1",
        "allow_anonymous false",
        "persistence true",
        f"persistence_location {run / 'persistence'}/",
        "max_queued_messages 77",
        "persistent_client_expiration 2h",
        "max_packet_size 1048576",
        f"acl_file {run / 'acl'}",
        f"password_file {run / 'passwords'}",
        f"cafile {run / 'tls' / 'ca.crt'}",
    ):
        assert line in text.splitlines(), line
    assert (tmp_path / "b" / "passwords").read_text().startswith("cam-0:$7$")
    assert oct((tmp_path / "b" / "passwords").stat().st_mode & 0o777) == "0o600"
    assert broker.ca_file is not None and broker.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_python_hashed_passwords_work_with_mosquitto(broker_factory, tmp_path: Path, mosquitto_binary: str) -> None:
    users = (BrokerUser("cam-0", "right horse battery", "camera"),)
    broker = MosquittoBroker(tmp_path / "py", BrokerConfig(users=users), binary=mosquitto_binary, passwd_tool=None)
    with broker:
        env = simpy.rt.RealtimeEnvironment(strict=False)
        good = MqttTransport(env, "cam-0", broker.host, broker.port, username="cam-0", password="right horse battery")
        bad = MqttTransport(env, "cam-0b", broker.host, broker.port, username="cam-0", password="wrong")
        try:
            env.run(until=good.connect())
            bad.connect()
            env.run(until=wait_for(env, lambda: bad.stats.connect_refusals == 1, WAIT_S))
        finally:
            good.close()
            bad.close()


def test_start_restart_stop_and_context_manager_cleanup(tmp_path: Path, mosquitto_binary: str) -> None:
    broker = MosquittoBroker(tmp_path / "b", BrokerConfig(persistence=True), binary=mosquitto_binary)
    with pytest.raises(RuntimeError, match="boom"):
        with broker:
            pid, port = broker.pid, broker.port
            assert pid is not None and _alive(pid) and port_accepts("127.0.0.1", port)
            assert read_state(broker.run_dir)["port"] == port  # type: ignore[index]
            broker.restart(kill=True)
            assert broker.port == port and broker.pid != pid and not _alive(pid)
            pid2 = broker.pid
            broker.restart()  # SIGTERM: the persistence database is written
            assert (broker.persistence_dir / "mosquitto.db").exists()
            raise RuntimeError("boom")
    assert pid2 is not None and not _alive(pid2) and broker.pid is None
    assert not port_accepts("127.0.0.1", port)
    assert read_state(broker.run_dir) is None  # the state file goes with the broker
    assert broker.starts == 3


def test_start_failure_reports_the_log_and_leaves_nothing_running(tmp_path: Path, mosquitto_binary: str) -> None:
    broker = MosquittoBroker(tmp_path / "bad", BrokerConfig(extra_lines=("no_such_option 1",)), binary=mosquitto_binary)
    with pytest.raises(BrokerError, match="no_such_option|Unknown configuration") as info:
        broker.start()
    assert "log tail" in str(info.value) and not broker.running


def test_busy_port_is_a_clear_error(broker_factory, tmp_path: Path, mosquitto_binary: str) -> None:
    first = broker_factory("first")
    second = MosquittoBroker(tmp_path / "second", BrokerConfig(port=first.port), binary=mosquitto_binary)
    with pytest.raises(BrokerError, match="already in use"):
        second.start()


def test_detached_broker_is_found_and_stopped_through_its_state_file(tmp_path: Path, mosquitto_binary: str) -> None:
    run_dir = tmp_path / "detached"
    broker = start_detached(run_dir, BrokerConfig(), binary=mosquitto_binary)
    try:
        state = read_state(run_dir)
        assert state is not None and state["pid"] == broker.pid and state["port"] == broker.port
        assert state["config"] == str(run_dir / "mosquitto.conf")
        assert os.getsid(broker.pid) == broker.pid  # its own session: it survives the CLI that started it
        with pytest.raises(BrokerError, match="already running"):
            start_detached(run_dir, BrokerConfig(), binary=mosquitto_binary)
        assert stop_detached(run_dir) is True
        assert not port_accepts("127.0.0.1", int(state["port"]))  # type: ignore[arg-type]
        assert read_state(run_dir) is None and stop_detached(run_dir) is False
    finally:
        if broker.running:
            os.kill(broker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        broker._proc = None


def test_free_port_is_free() -> None:
    port = free_port()
    assert 1024 <= port <= 65535 and not port_accepts("127.0.0.1", port)
