"""Many `MqttTransport`s at once: `connect_ahead` connects them in batches before the run's clock starts,
`close_all` disconnects them together."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iotbed.broker.mqtt_transport import MqttTransport


def connect_ahead(transports: list[MqttTransport], batch: int = 50, timeout_s: float = 20.0) -> None:
    """Connect `transports` before the run's clock starts, `batch` at a time: a thousand clients connecting
    at once overflow the broker's listen backlog (Mosquitto's is 100), and the SYNs dropped there are resent
    after 1, 3, 7 s. Each batch waits until every client in it has an answer (a CONNACK, a refusal or a
    failed attempt) or `timeout_s` has passed; what the answers were is counted later, on the SimPy thread."""
    for start in range(0, len(transports), batch):
        chunk = transports[start : start + batch]
        for transport in chunk:
            transport.connect()
        deadline = time.monotonic() + timeout_s
        for transport in chunk:
            transport.wait_answered(max(0.0, deadline - time.monotonic()))


def close_all(transports: list[MqttTransport]) -> None:
    """Disconnect every transport, then wait for their network threads: they wind down together, not one
    after another (a thread waiting out a reconnect delay takes up to a second to notice)."""
    closing = [t for t in transports if t.begin_close()]
    for t in closing:
        t.stop_network()
    for t in closing:
        t.bridge.drain()
    for t in transports:
        t.is_connected = False
