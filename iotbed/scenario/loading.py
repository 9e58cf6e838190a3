"""Scenario files: YAML loading with file:line errors, `--set` overrides, the resolved YAML, JSON Schema export.

Every mistake becomes a `ScenarioError` that names the file, the line and a fix.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from iotbed.errors import ScenarioError
from iotbed.scenario.schema import Scenario, _suggest


def load_scenario(path: str | Path, overrides: typing.Sequence[str] = ()) -> Scenario:
    """Read, override (`key.path=value`) and validate a scenario file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file; the ready ones are in scenarios/") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read the file ({exc})") from None
    return parse_scenario(text, str(path), overrides)


def parse_scenario(text: str, source: str = "<scenario>", overrides: typing.Sequence[str] = ()) -> Scenario:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}:1: a scenario is a mapping of keys such as `name`, `duration`, `nodes`")
    if "scenario" in data and ("grid" in data or "zip" in data):
        raise ScenarioError(
            f"{source}: this is a sweep file (it names a base `scenario:`); run it with `iotbed sweep {source}`"
        )
    overridden: set[tuple[Any, ...]] = set()
    for item in overrides:
        overridden.add(_apply_override(data, item, source))
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_format_errors(exc, root, source, overridden)) from None


def _apply_override(data: dict[str, Any], item: str, source: str) -> tuple[Any, ...]:
    key_path, sep, raw_value = item.partition("=")
    if not sep or not key_path:
        raise ScenarioError(f"--set {item!r}: write it as key.path=value, e.g. --set duration=30s")
    try:
        value = yaml.safe_load(raw_value) if raw_value else ""
    except yaml.YAMLError:
        value = raw_value
    keys: list[Any] = [int(k) if k.isdigit() else k for k in key_path.split(".")]
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        try:
            if isinstance(node, dict) and isinstance(key, str) and key not in node:
                node[key] = {}  # a section left to its defaults; validation still checks the key
            node = node[key]
        except (KeyError, IndexError, TypeError):
            so_far = ".".join(str(k) for k in keys[: depth + 1])
            raise ScenarioError(f"--set {item!r}: {source} has nothing at `{so_far}`") from None
    last = keys[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ScenarioError(f"--set {item!r}: `{key_path}` is not an index of the list in {source}")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ScenarioError(f"--set {item!r}: `{'.'.join(map(str, keys[:-1]))}` is not a mapping in {source}")
    return tuple(keys)


def _format_errors(exc: ValidationError, root: yaml.Node | None, source: str, overridden: set[tuple[Any, ...]]) -> str:
    lines = [f"{source}: the scenario is not valid:"]
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        data_loc = _data_loc(loc)
        line = _line_of(root, data_loc)
        where = f"{source}:{line}" if line else source
        if any(data_loc[: len(o)] == o for o in overridden):
            where = f"{where} (value from --set)"
        dotted = ".".join(str(p) for p in data_loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(Scenario, data_loc[:-1])
            message = f"unknown key `{data_loc[-1]}`{_suggest(str(data_loc[-1]), allowed) if allowed else ''}"
        elif error["type"] == "missing":
            message = f"`{data_loc[-1]}` is required here"
        elif error["type"] == "union_tag_invalid":
            message = f"{message}"
        lines.append(f"  {where}: {dotted}: {message}")
    return "\n".join(lines)


def _data_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # Pydantic inserts union tags and validator names into locations; keep only the data keys.
    skip = {
        "bernoulli",
        "gilbert_elliott",
        "function-before[_loss_shorthand(), nullable[tagged-union[BernoulliLossSpec,GilbertElliottLossSpec]]]",
    }
    return tuple(p for p in loc if not (isinstance(p, str) and (p in skip or "[" in p)))


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(key):
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model found at `loc`, for "did you mean" suggestions."""
    current: Any = model
    for key in loc:
        current = _unwrap(current, key)
        if current is None:
            return []
    models = [m for m in _models_in(current)]
    return sorted({name for m in models for name in m.model_fields})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out.extend(_models_in(arg))
    return out


def _unwrap(annotation: Any, key: Any) -> Any:
    if isinstance(key, int):
        origin = typing.get_origin(annotation)
        if origin in (list, tuple):
            return typing.get_args(annotation)[0]
        if origin is Annotated:
            return _unwrap(typing.get_args(annotation)[0], key)
        return None
    for m in _models_in(annotation):
        if key in m.model_fields:
            return m.model_fields[key].annotation
    origin = typing.get_origin(annotation)
    if origin is dict:
        return typing.get_args(annotation)[1]
    if origin in (Union, types.UnionType, Annotated):
        for arg in typing.get_args(annotation):
            found = _unwrap(arg, key)
            if found is not None:
                return found
    return None


def resolved_yaml(scenario: Scenario) -> str:
    """The scenario with every default filled in, in the same units users write; loads back identically."""
    return yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def json_schema() -> dict[str, Any]:
    return Scenario.model_json_schema()
