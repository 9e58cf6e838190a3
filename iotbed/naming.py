"""The project's naming conventions, each in one place: node names and model version numbers.

A scenario's node group `cam` with `count: 3` becomes the nodes `cam-0`, `cam-1`, `cam-2`. The model the
edge starts with is version 1, the registry's k-th update (from 0) is version k + 2, and CoDefend's repair
of version v is published as v + 1000, so a repaired model outranks every update the registry made.
"""

from __future__ import annotations

INITIAL_MODEL_VERSION = 1
REPAIR_OFFSET = 1000


def node_name(group: str, index: int) -> str:
    return f"{group}-{index}"


def group_nodes(group: str, count: int) -> list[str]:
    return [node_name(group, i) for i in range(count)]


def group_of(node: str) -> str:
    """The group a node belongs to (`cam-3` -> `cam`); a name without an index is its own group."""
    group, dash, index = node.rpartition("-")
    return group if dash and index.isdigit() else node


def update_version(update_index: int) -> int:
    """The version of the registry's `update_index`-th scheduled update."""
    return update_index + 2


def repaired_version(version: int) -> int:
    return version + REPAIR_OFFSET
