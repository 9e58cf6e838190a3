"""Scenario files: the schema, YAML loading with file:line errors, `--set` overrides, JSON Schema export.

A scenario names a dataset and a model, node groups (cameras, gateways, edge servers), the links between
groups, the broker and its QoS per topic, and the model registry. Quantities are written with units
(`10Mbps`, `5ms`, `60s`). Every mistake becomes a `ScenarioError` that names the file, the line and a fix.

`iotbed.scenario.schema` holds the pydantic models and their validators; `iotbed.scenario.loading` reads
files, applies `--set` overrides, formats errors, and writes the resolved YAML and the JSON Schema.
"""

from __future__ import annotations

from iotbed.scenario.loading import json_schema, load_scenario, parse_scenario, resolved_yaml
from iotbed.scenario.schema import (
    AttackSpec,
    CameraGroup,
    EdgeServerGroup,
    FaultSpec,
    LinkSpec,
    Scenario,
    Strict,
    TrainSpec,
)

__all__ = [
    "AttackSpec",
    "CameraGroup",
    "EdgeServerGroup",
    "FaultSpec",
    "LinkSpec",
    "Scenario",
    "Strict",
    "TrainSpec",
    "json_schema",
    "load_scenario",
    "parse_scenario",
    "resolved_yaml",
]
