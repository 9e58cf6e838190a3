"""Scenario files: YAML loading with file:line errors, `--set` overrides, the resolved YAML, JSON Schema export.

Every mistake becomes a `ScenarioError` that names the file, the line and a fix.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from iotbed.errors import ScenarioError
from iotbed.scenario.schema import Scenario, _suggest

MAX_FILE_BYTES = 2 * 1024 * 1024
"""Largest scenario file read (2 MiB); the shipped ones are a few KB."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and lists; the shipped scenarios nest 5 levels."""
MAX_NODES = 20_000
"""Most values a document may hold once its aliases (`*name`) are expanded: stops "billion laughs" files."""


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a scenario refuses (too deep, alias bomb, duplicate key, bad value)."""


class _ScenarioLoader(yaml.SafeLoader):
    """A SafeLoader with bounded nesting and alias expansion that refuses duplicate keys.

    Aliases stay allowed (anchors save repeating a link or a camera group), but a document that expands to
    more than `MAX_NODES` values, or an alias inside its own anchor, is refused before it is constructed.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded
        self._open: set[str] = set()  # anchors whose node is being composed
        self._aliased = False
        self._count = 0  # nodes composed so far, so a huge flat file stops early

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Refused(
                    None, None, f"alias `*{event.anchor}` is inside its own anchor `&{event.anchor}`", event.start_mark
                )
            self._aliased = True
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _Refused(
                None,
                None,
                f"nested more than {MAX_DEPTH} levels deep; a scenario needs a handful",
                event.start_mark,
            )
        self._count += 1
        if self._count > MAX_NODES:
            raise _Refused(
                None,
                None,
                f"the file holds more than {MAX_NODES:,} values; a scenario needs far fewer",
                event.start_mark,
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)  # type: ignore[arg-type]
        size = 1
        if isinstance(node, yaml.MappingNode):
            size += sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes.get(id(item), 1) for item in node.value)
        if size > MAX_NODES:
            how = " once its aliases (`*name`) are expanded" if self._aliased else ""
            raise _Refused(
                None,
                None,
                f"this value holds more than {MAX_NODES:,} values{how}; a scenario needs far fewer",
                node.start_mark,
            )
        self._sizes[id(node)] = size
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError, RecursionError, IndexError) as exc:  # 2020-13-45, `!!int` empty
            what = repr(node.value)[:60] if isinstance(node, yaml.ScalarNode) else node.tag
            raise _Refused(None, None, f"cannot read {what} ({exc})", node.start_mark) from None

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            first = seen.setdefault((key_node.tag, key_node.value), key_node)
            if first is not key_node:
                raise _Refused(
                    None,
                    None,
                    f"duplicate key `{key_node.value}` (first on line {first.start_mark.line + 1}); "
                    "YAML would keep only the last one: remove or rename one of them",
                    key_node.start_mark,
                )
        return node


def load_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the data of one YAML document, or a `ScenarioError`."""
    if len(text) > MAX_FILE_BYTES:
        raise ScenarioError(f"{source}:1: the text is over {MAX_FILE_BYTES:,} characters; a scenario is a few KB")
    loader = None
    try:
        loader = _ScenarioLoader(text)
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except _Refused as exc:
        raise ScenarioError(f"{_where(exc, text, source)}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, yaml.reader.ReaderError):
            problem = f"{exc.reason} (character #x{ord(exc.character) if isinstance(exc.character, str) else exc.character:04x}); remove it"
        raise ScenarioError(f"{_where(exc, text, source)}: not valid YAML: {problem}") from None
    except RecursionError:  # not expected with MAX_DEPTH, but never a traceback
        raise ScenarioError(f"{source}:1: nested too deeply; a scenario needs a handful of levels") from None
    finally:
        if loader is not None:
            loader.dispose()
    return root, data


def _where(exc: yaml.YAMLError, text: str, source: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return f"{source}:{mark.line + 1}:{mark.column + 1}"
    position = getattr(exc, "position", None)  # a ReaderError (a control character) has only an offset
    if isinstance(position, int):
        return f"{source}:{text.count(chr(10), 0, position) + 1}"
    return f"{source}:1"


def load_scenario(path: str | Path, overrides: typing.Sequence[str] = ()) -> Scenario:
    """Read, override (`key.path=value`) and validate a scenario file."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ScenarioError(f"{path}:1: the file is over {MAX_FILE_BYTES:,} bytes; a scenario is a few KB")
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as Path.read_text reads it
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file; the ready ones are in scenarios/") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read the file ({exc})") from None
    return parse_scenario(text, str(path), overrides)


def parse_scenario(text: str, source: str = "<scenario>", overrides: typing.Sequence[str] = ()) -> Scenario:
    root, data = load_yaml(text, source)
    if not isinstance(data, dict):
        line = root.start_mark.line + 1 if root is not None else 1
        raise ScenarioError(f"{source}:{line}: a scenario is a mapping of keys such as `name`, `duration`, `nodes`")
    if "scenario" in data and ("grid" in data or "zip" in data):
        raise ScenarioError(
            f"{source}:{_line_of(root, ('scenario',))}: this is a sweep file (it names a base `scenario:`); run it with `iotbed sweep {source}`"
        )
    overridden: dict[tuple[Any, ...], str] = {}
    if overrides:
        data = copy.deepcopy(data)  # aliased values are shared; an override changes only the one it names
    for item in overrides:
        keys = _apply_override(data, item, source)
        overridden[keys] = item.partition("=")[0]
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_format_errors(exc, root, source, overridden)) from None


def _apply_override(data: dict[str, Any], item: str, source: str) -> tuple[Any, ...]:
    key_path, sep, raw_value = item.partition("=")
    if not sep or not key_path:
        raise ScenarioError(f"--set {item!r}: write it as key.path=value, e.g. --set duration=30s")
    value: Any = ""
    if raw_value:
        try:
            _, value = load_yaml(raw_value, f"--set {key_path}")
        except ScenarioError as exc:
            if "not valid YAML" not in str(exc):
                raise ScenarioError(f"--set {item!r}: {str(exc).split(': ', 1)[1]}") from None
            value = raw_value  # not YAML: the text itself
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


def _format_errors(
    exc: ValidationError, root: yaml.Node | None, source: str, overridden: dict[tuple[Any, ...], str]
) -> str:
    entries = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        data_loc = _data_loc(loc)
        # a model-wide check names the entry it is about (`LocatedError`); point there, not at the top
        cause = (error.get("ctx") or {}).get("error")
        data_loc += tuple(getattr(cause, "loc", ()))
        line = _line_of(root, data_loc)
        where = f"{source}:{line or 1}"
        for keys, key_path in overridden.items():
            if data_loc[: len(keys)] == keys:
                where = f"--set {key_path} (over {source})"  # the value has no line in the file
        dotted = ".".join(str(p) for p in data_loc) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(Scenario, data_loc[:-1])
            message = f"unknown key `{data_loc[-1]}`{_suggest(str(data_loc[-1]), allowed) if allowed else ''}"
        elif error["type"] == "missing":
            message = f"`{data_loc[-1]}` is required here"
        entries.append((where, f"{dotted}: {message}"))
    if len(entries) == 1:
        return f"{entries[0][0]}: {entries[0][1]}"
    lines = [f"{entries[0][0]}: the scenario is not valid ({len(entries)} problems):"]
    lines += [f"  {where}: {text}" for where, text in entries]
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
