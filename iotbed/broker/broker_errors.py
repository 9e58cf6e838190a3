"""The error of the Mosquitto broker modules (`mosquitto`, `broker_auth`, `broker_tls`), in a module of its own
so that they share it without importing each other."""

from __future__ import annotations

from iotbed.errors import IotbedError


class BrokerError(IotbedError):
    """Mosquitto is missing, does not start, or a detached broker cannot be found."""
