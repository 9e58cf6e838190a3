"""MQTT topic names and filters (MQTT 3.1.1 section 4.7, MQTT 5 section 4.7 and 4.8.2)."""

from __future__ import annotations

SHARED_PREFIX = "$share/"


def validate_topic(topic: str) -> None:
    """A topic name to publish to: non-empty, no wildcards, no NUL, at most 65535 UTF-8 bytes."""
    if not topic:
        raise ValueError("a topic name must not be empty")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic name {topic!r} contains a wildcard; wildcards belong in subscriptions")
    _check_common(topic)


def validate_filter(topic_filter: str) -> None:
    """A subscription filter: `+` fills a whole level, `#` only as the whole last level."""
    if not topic_filter:
        raise ValueError("a topic filter must not be empty")
    _check_common(topic_filter)
    group, inner = split_shared(topic_filter)
    if group is not None and (not group or "+" in group or "#" in group):
        raise ValueError(f"shared subscription {topic_filter!r} needs a group name without wildcards")
    levels = inner.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"filter {topic_filter!r}: `#` must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"filter {topic_filter!r}: `+` must fill a whole level")


def _check_common(text: str) -> None:
    if "\x00" in text:
        raise ValueError(f"{text!r} contains a NUL character")
    if len(text.encode("utf-8")) > 65535:
        raise ValueError("topics are at most 65535 bytes long")


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """`$share/group/a/b` -> ("group", "a/b"); a plain filter -> (None, filter)."""
    if not topic_filter.startswith(SHARED_PREFIX):
        return None, topic_filter
    rest = topic_filter[len(SHARED_PREFIX) :]
    group, _, inner = rest.partition("/")
    return group, inner


def matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (shared-subscription prefix allowed on the filter)."""
    _, pattern = split_shared(topic_filter)
    # Topics starting with `$` are not matched by filters starting with a wildcard (4.7.2).
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    filter_levels = pattern.split("/")
    topic_levels = topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level: `a/#` matches `a`
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)
