"""Quantities as users write them in scenario files: `10Mbps`, `5ms`, `60s`, `64KB`.

Each parser returns SI base units (seconds, bits per second, bytes) as floats, and raises `ValueError`
with a message that lists the units it accepts, so scenario validation can point at the exact line.
"""

from __future__ import annotations

import re

_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*$")

DURATION_UNITS = {
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "min": 60.0,
    "m": 60.0,
    "h": 3600.0,
}
BANDWIDTH_UNITS = {
    "bps": 1.0,
    "kbps": 1e3,
    "Kbps": 1e3,
    "Mbps": 1e6,
    "Gbps": 1e9,
    "Bps": 8.0,
    "kBps": 8e3,
    "KBps": 8e3,
    "MBps": 8e6,
    "GBps": 8e9,
}
SIZE_UNITS = {
    "B": 1.0,
    "kB": 1e3,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "KiB": 1024.0,
    "MiB": 1024.0**2,
    "GiB": 1024.0**3,
}


def _parse(value: object, units: dict[str, float], kind: str, bare_unit: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a {kind} such as `{_example(kind)}`, got {value!r}")
    if isinstance(value, (int, float)):
        number, factor = float(value), units[bare_unit]
    elif isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if not match:
            raise ValueError(f"expected a {kind} such as `{_example(kind)}`, got {value!r}")
        number_text, unit = match.groups()
        if unit == "":
            unit = bare_unit
        if unit not in units:
            accepted = ", ".join(units)
            raise ValueError(f"unknown {kind} unit {unit!r} in {value!r}; use one of: {accepted}")
        number, factor = float(number_text), units[unit]
    else:
        raise ValueError(f"expected a {kind} such as `{_example(kind)}`, got {value!r}")
    return number * factor


def _example(kind: str) -> str:
    return {"duration": "5ms", "bandwidth": "10Mbps", "size": "64KB"}[kind]


def parse_duration(value: object) -> float:
    """Seconds from `5ms`, `60s`, `2min`; a bare number means seconds."""
    return _parse(value, DURATION_UNITS, "duration", "s")


def parse_bandwidth(value: object) -> float:
    """Bits per second from `10Mbps`, `1Gbps`, `500kBps` (bytes); a bare number means bit/s."""
    return _parse(value, BANDWIDTH_UNITS, "bandwidth", "bps")


def parse_size(value: object) -> float:
    """Bytes from `64KB`, `1MiB`; a bare number means bytes."""
    return _parse(value, SIZE_UNITS, "size", "B")


def format_duration(seconds: float) -> str:
    """The shortest exact unit form, so resolved scenarios read like hand-written ones."""
    for unit, factor in (("h", 3600.0), ("min", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= factor and _is_round(seconds / factor):
            return f"{_trim(seconds / factor)}{unit}"
    return f"{_trim(seconds)}s"


def format_bandwidth(bps: float) -> str:
    for unit, factor in (("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3)):
        if bps >= factor and _is_round(bps / factor):
            return f"{_trim(bps / factor)}{unit}"
    return f"{_trim(bps)}bps"


def _is_round(x: float) -> bool:
    return abs(x - round(x, 6)) < 1e-9


def _trim(x: float) -> str:
    return f"{round(x, 6):g}"
