"""Client ids bound to users (`BrokerConfig.bind_client_ids`, Mosquitto's `use_username_as_clientid`): a
client with a camera's credentials cannot take an edge server's session over by claiming its client id.

Measured with Mosquitto 2.0.11 and paho 2.2: with binding, the impostor's CONNACK is a plain success (MQTT 5
sends no Assigned Client Identifier, so the client never learns that its id became `cam-0`); a later
connect as the real cam-0 closes the impostor's connection. Without binding the edge server's connection is
closed instead. Either way the client whose session was taken sees only its socket closed (paho: reason
"Unspecified error", no DISCONNECT packet with 0x8E Session taken over, also under MQTT 5); the broker
logs "Client edge-0 already connected, closing old connection".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import simpy
import yaml
from click.testing import CliRunner
from conftest import SCENARIOS
from mosquitto_fixtures import WAIT_S

import iotbed
from iotbed.broker.broker_auth import BrokerUser
from iotbed.broker.mosquitto import MosquittoBroker, scenario_client_roles
from iotbed.broker.mqtt_transport import MqttTransport
from iotbed.broker.realtime import wait_for
from iotbed.cli import main

STORY = SCENARIOS / "codefend_backdoor_update.yaml"
USERS = (BrokerUser("cam-0", "pw-cam-0", "camera"), BrokerUser("edge-0", "pw-edge-0", "edge"))
BINDING = "use_username_as_clientid true"


def _run_until(env: simpy.Environment, predicate: Callable[[], bool], what: str) -> None:
    env.run(until=wait_for(env, predicate, WAIT_S, what=what))


def _login(
    broker: MosquittoBroker, transports: Callable[..., MqttTransport], user: str, client_id: str = ""
) -> MqttTransport:
    username, password = broker.credentials(user)
    return transports(broker, client_id or user, username=username, password=password)


def _edge_and_impostor(
    broker: MosquittoBroker, env: simpy.Environment, transports: Callable[..., MqttTransport]
) -> tuple[MqttTransport, MqttTransport, list[bytes]]:
    """edge-0 connected and subscribed to frames/#, then a client with cam-0's credentials claiming id edge-0."""
    frames: list[bytes] = []
    edge = _login(broker, transports, "edge-0")
    edge.subscribe("frames/#", lambda m: frames.append(m.payload), 1)
    env.run(until=edge.connect())
    _run_until(env, edge.subscribed, "edge-0's SUBACK")
    impostor = _login(broker, transports, "cam-0", client_id="edge-0")
    env.run(until=impostor.connect())
    return edge, impostor, frames


def test_a_camera_cannot_take_the_edge_servers_session_over(broker_factory, rt_env, transports) -> None:  # type: ignore[no-untyped-def]
    broker = broker_factory("bound", users=USERS)
    assert BINDING in broker.config_path.read_text().splitlines()
    edge, impostor, frames = _edge_and_impostor(broker, rt_env, transports)

    # the impostor has cam-0's rights: an edge server may publish models, a camera may not
    denied = impostor.publish("models/classifier", b"evil", 1, confirm=True)
    rt_env.run(until=denied)
    assert denied.value == 0x87  # MQTT 5 PUBACK: Not authorized
    impostor.publish("frames/cam-0", b"after the impostor", 1)
    _run_until(rt_env, lambda: frames == [b"after the impostor"], "the frame published after the impostor connected")
    assert edge.is_connected and edge.stats.connection_losses == 0 and edge.stats.connects == 1

    # the impostor's session is cam-0's: the real cam-0 connecting takes it over
    camera = _login(broker, transports, "cam-0")
    rt_env.run(until=camera.connect())
    _run_until(rt_env, lambda: impostor.stats.connection_losses >= 1, "the impostor losing its connection")
    camera.close()
    impostor.close()
    edge.subscribe("status/#", lambda m: None, 1)  # a round trip on edge-0's connection, after all that
    _run_until(rt_env, lambda: edge.subscribed("status/#"), "edge-0's second SUBACK")
    assert edge.stats.connection_losses == 0 and edge.stats.connects == 1


def test_without_binding_the_camera_takes_the_edge_servers_session_over(broker_factory, rt_env, transports) -> None:  # type: ignore[no-untyped-def]
    broker = broker_factory("unbound", users=USERS, bind_client_ids=False)
    assert BINDING not in broker.config_path.read_text().splitlines()
    edge, impostor, _ = _edge_and_impostor(broker, rt_env, transports)
    _run_until(rt_env, lambda: edge.stats.connection_losses >= 1, "edge-0 losing its connection to the impostor")
    impostor.close()


def test_anonymous_brokers_have_nothing_to_bind(broker_factory) -> None:  # type: ignore[no-untyped-def]
    broker = broker_factory("anonymous")
    assert BINDING not in broker.config_path.read_text()


def test_scenario_client_roles_give_rogue_publishers_their_nodes_role() -> None:
    scenario = iotbed.load_scenario(
        STORY,
        [
            "registry.updates=[{at: 3s, publisher: cam-7}, {at: 4s, publisher: cam-7}, {at: 5s, publisher: gw-1}]",
            "attacks=[]",
        ],
    )
    roles = scenario_client_roles(scenario)
    expected = (
        {f"cam-{i}": "camera" for i in range(8)}
        | {"gw-0": "gateway", "gw-1": "gateway", "edge-0": "edge"}
        | {"rogue@cam-7": "camera", "rogue@gw-1": "gateway", "registry": "registry", "monitor": "monitor"}
    )
    assert roles == expected


def test_cli_broker_start_auth_makes_a_user_per_client_and_binds_them(mosquitto_binary: str, tmp_path: Path) -> None:
    data = yaml.safe_load(STORY.read_text())
    data["registry"]["updates"][0]["publisher"] = "cam-7"
    scenario = tmp_path / "rogue.yaml"
    scenario.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "broker"
    runner = CliRunner()
    started = runner.invoke(main, ["broker", "start", "--auth", str(scenario), "--dir", str(run_dir)])
    try:
        assert started.exit_code == 0, started.output
        clients = json.loads((run_dir / "credentials.json").read_text())["clients"]
        assert {"cam-7", "rogue@cam-7", "edge-0", "registry", "monitor"} <= set(clients)
        assert BINDING in (run_dir / "mosquitto.conf").read_text().splitlines()
        acl = (run_dir / "acl").read_text()
        assert "# role camera\nuser rogue@cam-7\ntopic write frames/rogue@cam-7\n" in acl
    finally:
        stopped = runner.invoke(main, ["broker", "stop", "--dir", str(run_dir)])
        assert stopped.exit_code == 0 and "stopped" in stopped.output
