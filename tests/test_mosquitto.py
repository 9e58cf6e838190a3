"""The Mosquitto launcher: generated config, passwords, ACL, TLS files, start/stop/restart, state file."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import time
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
        "set_tcp_nodelay false",  # Nagle on, as Mosquitto leaves it, unless the scenario turns it off
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


def test_restart_keeps_persistent_sessions_but_not_their_shared_subscriptions(broker_factory) -> None:  # type: ignore[no-untyped-def]
    """What `SimBroker.crash` models, pinned on this Mosquitto: after a SIGTERM restart with persistence, a
    persistent session is present with its non-shared subscription and the messages queued for it, shared
    subscription or not, but its shared subscription is gone; a clean session is gone. Raw paho clients,
    which never subscribe again by themselves (MqttTransport does)."""
    from paho.mqtt import client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    broker = broker_factory("keeps", persistence=True)
    got: dict[str, list[str]] = {}
    present: dict[str, bool] = {}
    filters = {"plain": ("a/#", False), "shared": ("$share/g/b/#", False), "clean": ("c/#", True)}

    def client(client_id: str, clean: bool) -> paho.Client:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, clean_session=clean)
        c.on_message = lambda cl, u, m: got.setdefault(client_id, []).append(m.payload.decode())
        c.on_connect = lambda cl, u, flags, rc, props: present.__setitem__(client_id, flags.session_present)
        c.connect(broker.host, broker.port)
        c.loop_start()
        return c

    def settle(condition) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + WAIT_S
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert condition()

    subs = {cid: client(cid, clean) for cid, (_, clean) in filters.items()}
    settle(lambda: len(present) == 3)
    for cid, (topic_filter, _) in filters.items():
        subs[cid].subscribe(topic_filter, 1)
    pub = client("pub", True)
    settle(lambda: "pub" in present)
    time.sleep(0.2)  # the SUBACKs
    for c in subs.values():
        c.disconnect()
        c.loop_stop()
    for topic in ("a/1", "b/1", "c/1"):
        pub.publish(topic, "queued", 1).wait_for_publish(WAIT_S)
    pub.disconnect()
    pub.loop_stop()
    broker.restart()  # SIGTERM: the database is written
    present.clear()
    subs = {cid: client(cid, clean) for cid, (_, clean) in filters.items()}  # no SUBSCRIBE this time
    pub = client("pub", True)
    settle(lambda: len(present) == 4)
    for topic in ("a/2", "b/2", "c/2"):
        pub.publish(topic, "after", 1).wait_for_publish(WAIT_S)
    settle(lambda: len(got.get("plain", [])) == 2)
    time.sleep(0.3)  # anything else would have arrived by now
    for c in [*subs.values(), pub]:
        c.disconnect()
        c.loop_stop()
    assert present == {"plain": True, "shared": True, "clean": False, "pub": False}
    assert got == {"plain": ["queued", "after"], "shared": ["queued"]}


@pytest.mark.parametrize("nodelay", [False, True])
def test_nagle_is_off_only_where_the_scenario_turns_it_off(nodelay: bool, broker_factory) -> None:  # type: ignore[no-untyped-def]
    """`broker.tcp_nodelay` drives the live runtime: the launched Mosquitto's set_tcp_nodelay, and TCP_NODELAY
    on the client's socket, the first one and the one it opens after a broker restart."""
    broker = broker_factory("nagle", persistence=True, tcp_nodelay=nodelay)
    assert f"set_tcp_nodelay {str(nodelay).lower()}" in broker.config_path.read_text().splitlines()
    env = simpy.rt.RealtimeEnvironment(strict=False)
    transport = MqttTransport(env, "cam", broker.host, broker.port, tcp_nodelay=nodelay, reconnect_max_s=0.5)

    def socket_nodelay() -> bool:
        return bool(transport._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    try:
        env.run(until=transport.connect())
        assert socket_nodelay() is nodelay
        broker.restart()
        env.run(until=wait_for(env, lambda: transport.stats.reconnects == 1, WAIT_S))
        assert socket_nodelay() is nodelay
    finally:
        transport.close()


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
