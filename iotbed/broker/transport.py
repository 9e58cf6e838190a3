"""What node logic talks to: an MQTT client, simulated (`SimMqttClient`) or real (paho, in `iotbed emulate`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import simpy

from iotbed.broker.messages import Publish

Handler = Callable[[Publish], None]


class Transport(Protocol):
    env: simpy.Environment
    client_id: str

    def connect(self) -> simpy.Event:
        """Start connecting; the event fires once the broker has accepted the session."""
        ...

    def publish(
        self, topic: str, payload: Any, qos: int, retain: bool = False, account: Any = None, confirm: bool = False
    ) -> simpy.Event | None:
        """Send a message. With `confirm`, the returned event fires when the QoS handshake completes
        (at once for QoS 0); `account` is the frame's trace record, charged for the bytes it causes."""
        ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int) -> None:
        """Deliver messages matching `topic_filter` to `handler`, on the simulation thread."""
        ...
