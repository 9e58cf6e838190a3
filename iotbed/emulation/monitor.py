"""What the broker itself counts during a live run, from Mosquitto's `$SYS` topics.

Mosquitto publishes its counters under `$SYS/broker/...` every `sys_interval` seconds (1 s in the brokers
iotbed generates), retained and only when they change. `BrokerMonitor` is a plain paho client on its own
thread (not a node: it needs no simulated clock) that keeps the first and the latest value of each counter
and the largest value of the message store. The summary reports the differences over the run:

- `dropped`: PUBLISH messages the broker dropped because a client's in-flight window and queue were full
  (`$SYS/broker/publish/messages/dropped`), what a slow subscriber costs;
- `stored_max_increase`: the most messages the broker held beyond what it held at the start
  (`$SYS/broker/messages/stored`: queued and in-flight messages, plus retained ones).

A broker that refuses `$SYS` to the monitor (an ACL without the `monitor` role's `$SYS/#` rule, or another
broker) leaves `available: false`; the frames' own fates in the trace still say what was lost. The counters
are the whole broker's: on a broker that other clients use too, their drops are counted as well.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from iotbed.broker.mqtt_transport import no_delay

COUNTERS = {
    "$SYS/broker/publish/messages/dropped": "dropped",
    "$SYS/broker/messages/stored": "stored",
}


class BrokerMonitor:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        tls_ca: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._lock = threading.Lock()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.last_at: dict[str, float] = {}
        self.stored_max: float | None = None
        # One id per run: two runs against one broker must not take each other's session over.
        client_id = client_id or f"iotbed-monitor-{os.getpid()}-{secrets.token_hex(3)}"
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        if username is not None:
            client.username_pw_set(username, password)
        if tls:
            client.tls_set(ca_certs=tls_ca)
        client.reconnect_delay_set(0.1, 2.0)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._client = client
        self._started = False

    def start(self) -> BrokerMonitor:
        self._client.connect_async(self.host, self.port, 30)
        self._client.loop_start()
        self._started = True
        return self

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not reason.is_failure:
            # Not a node of the scenario, so not under its tcp_nodelay: the monitor carries no frames, and its
            # own few packets (SUBSCRIBE, PINGREQ) going at once cannot delay anyone else's.
            no_delay(client)
            client.subscribe([(topic, 0) for topic in COUNTERS])  # a broker restart: subscribe again

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        name = COUNTERS.get(message.topic)
        try:
            value = float(message.payload)
        except ValueError:
            return
        if name is None:
            return
        with self._lock:
            if name == "dropped" and name in self.last and value < self.last[name]:
                # the counter restarted with the broker: carry what was counted before on top
                self.first[name] = self.first[name] - self.last[name]
            self.first.setdefault(name, value)
            self.last[name] = value
            self.last_at[name] = time.monotonic()
            if name == "stored":
                self.stored_max = value if self.stored_max is None else max(self.stored_max, value)

    def stop(self, settle_s: float = 1.5) -> None:
        """Wait up to `settle_s` for one more round of counters (they change at most once a `sys_interval`),
        then disconnect."""
        if not self._started:
            return
        asked = time.monotonic()
        deadline = asked + settle_s
        while time.monotonic() < deadline:
            with self._lock:
                fresh = self.last_at.get("stored", 0.0) >= asked
            if fresh:
                break
            time.sleep(0.05)
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    def report(self) -> dict[str, Any]:
        with self._lock:
            available = "dropped" in self.last
            stored0 = self.first.get("stored")
            return {
                "available": available,
                "dropped": int(self.last["dropped"] - self.first["dropped"]) if available else None,
                "stored_max_increase": int(self.stored_max - stored0)
                if self.stored_max is not None and stored0 is not None
                else None,
            }
