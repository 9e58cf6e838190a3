"""What node logic talks to: an MQTT client, simulated (`SimMqttClient`) or real (paho, in `iotbed emulate`).

Faults are written once against this surface (`iotbed.deployment.inject_fault`): a node crashes and
rejoins, or reads slowly, the same way in both runtimes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import simpy

from iotbed.broker.messages import Publish

if TYPE_CHECKING:
    from iotbed.sim.trace import FrameRecord

Handler = Callable[[Publish], None]


class Transport(Protocol):
    env: simpy.Environment
    client_id: str

    def connect(self) -> simpy.Event:
        """Start connecting; the event fires once the broker has accepted the session."""
        ...

    def publish(
        self,
        topic: str,
        payload: Any,
        qos: int,
        retain: bool = False,
        record: FrameRecord | None = None,
        confirm: bool = False,
    ) -> simpy.Event | None:
        """Send a message. With `confirm`, the returned event fires when the QoS handshake completes
        (at once for QoS 0); `record` is the frame's trace record, charged for the bytes it causes."""
        ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int) -> None:
        """Deliver messages matching `topic_filter` to `handler`, on the simulation thread."""
        ...

    def crash(self) -> None:
        """Vanish without a DISCONNECT (the broker notices when the connection or keep-alive fails)."""
        ...

    def rejoin(self) -> simpy.Event:
        """After `crash`: connect again with the same client id; the event fires at the CONNACK."""
        ...

    def slow_down(self, rate: float, duration_s: float) -> None:
        """For `duration_s` from now, read at most `rate` messages a second."""
        ...
