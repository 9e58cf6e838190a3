"""Fixtures for tests against a real Mosquitto: every test gets its OWN broker on a free port, with a config
generated into its tmp_path, stopped at teardown (also when the test fails). Nothing depends on a broker
left running.

Import the fixtures a test module uses by name:

    (conftest.py loads this module as a plugin: tests name the fixtures they need)

Without a `mosquitto` binary the tests are skipped with the install command, unless
IOTBED_REQUIRE_MOSQUITTO=1 (what `make test` sets), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import simpy.rt

from iotbed.broker.broker_auth import BrokerUser
from iotbed.broker.broker_errors import BrokerError
from iotbed.broker.mosquitto import BrokerConfig, MosquittoBroker, find_binary
from iotbed.broker.mqtt_transport import MqttTransport
from iotbed.broker.realtime import RealtimeBridge

# Timeouts for waiting on conditions; generous because the test machine is small and shared.
WAIT_S = 15.0


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    try:
        return find_binary()
    except BrokerError as exc:
        if os.environ.get("IOTBED_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def broker_factory(tmp_path: Path, mosquitto_binary: str) -> Iterator[Callable[..., MosquittoBroker]]:
    """`broker_factory(name="broker", **BrokerConfig fields)` -> a started broker, stopped at teardown."""
    brokers: list[MosquittoBroker] = []

    def make(name: str = "broker", **config: Any) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / name, BrokerConfig(**config), binary=mosquitto_binary)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.stop(kill=True)


@pytest.fixture
def plain_broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """Anonymous access, persistence on (restarts keep sessions and queued messages)."""
    return broker_factory("plain", persistence=True)


AUTH_USERS = {
    "cam-0": "camera",
    "cam-1": "camera",
    "edge-0": "edge",
    "registry": "registry",
    "monitor": "monitor",
}


@pytest.fixture
def auth_broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """No anonymous access; users from AUTH_USERS with random passwords; the role ACL."""
    users = tuple(BrokerUser(name, secrets.token_urlsafe(12), role) for name, role in AUTH_USERS.items())
    return broker_factory("auth", users=users)


@pytest.fixture
def tls_broker(broker_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    pytest.importorskip("cryptography")
    return broker_factory("tls", tls=True)


@pytest.fixture
def rt_env() -> simpy.rt.RealtimeEnvironment:
    # strict=False: on a loaded machine the simulation may fall behind the wall clock; it catches up.
    return simpy.rt.RealtimeEnvironment(factor=1.0, strict=False)


@pytest.fixture
def transports(rt_env: simpy.rt.RealtimeEnvironment) -> Iterator[Callable[..., MqttTransport]]:
    """`transports(broker, client_id, **MqttTransport kwargs)` -> a transport on `rt_env` sharing one bridge,
    closed at teardown."""
    made: list[MqttTransport] = []
    bridge = RealtimeBridge(rt_env)

    def make(broker: MosquittoBroker, client_id: str, **kwargs: Any) -> MqttTransport:
        kwargs.setdefault("bridge", bridge)
        kwargs.setdefault("reconnect_min_s", 0.05)
        kwargs.setdefault("reconnect_max_s", 1.0)
        if broker.config.tls:
            kwargs.setdefault("tls", True)
        transport = MqttTransport(rt_env, client_id, broker.host, broker.port, **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()
