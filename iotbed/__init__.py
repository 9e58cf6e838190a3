"""iotbed: a testbed for the security of deep-learning inference in IoT deployments."""

from __future__ import annotations

__version__ = "0.1.0"
