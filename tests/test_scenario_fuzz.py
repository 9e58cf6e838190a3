"""A loader that no file can crash or fool: bounded YAML, duplicate keys, non-finite and out-of-range values,
every error with `file:line` (or `--set KEY`), and a property-based fuzz over the shipped scenarios."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SCENARIOS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotbed.errors import ScenarioError
from iotbed.scenario import Scenario, load_scenario, parse_scenario
from iotbed.scenario.loading import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES
from iotbed.scenario.schema import SEED_MAX

BASE = (SCENARIOS / "quickstart.yaml").read_text()
NO_DESCRIPTION = re.sub(r"(?m)^description:.*\n", "", BASE)  # to append one
LOCATED = re.compile(r"^(bad\.yaml:\d+|--set \S)")


def _error(text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "bad.yaml", overrides or [])
    message = str(info.value)
    assert LOCATED.match(message), message  # every error says where
    return message


def _line_of(text: str, needle: str, nth: int = 0) -> int:
    return [i for i, line in enumerate(text.splitlines(), 1) if needle in line][nth]


# --- bounded YAML -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["[" * 500 + "]" * 500, "{a: " * 300 + "1" + "}" * 300, "\n" + "".join(f"{' ' * i}- \n" for i in range(200))],
)
def test_deep_nesting_is_refused_with_a_line_not_a_recursion_error(value: str) -> None:
    message = _error(NO_DESCRIPTION + f"description: {value}\n")
    assert f"nested more than {MAX_DEPTH} levels deep" in message


def test_nesting_up_to_the_bound_still_parses_as_yaml() -> None:
    depth = MAX_DEPTH - 2  # the top mapping and `description:` take two levels
    message = _error(NO_DESCRIPTION + "description: " + "[" * depth + "]" * depth)
    assert "nested more than" not in message and "description" in message  # a schema error, not a YAML one


def test_alias_bomb_is_refused_quickly() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        bomb += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
    start = time.monotonic()
    message = _error(BASE + bomb)
    assert time.monotonic() - start < 2
    assert f"more than {MAX_NODES:,} values once its aliases" in message


@pytest.mark.timeout(60)
def test_a_billion_nodes_are_checked_without_listing_them() -> None:
    """A fuzzed file set a gateway group's count to 10^9 next to an update-channel attack; validation listed the
    group's nodes and hung. Nodes are now named and checked by arithmetic."""
    scenario = load_scenario(
        SCENARIOS / "update_channel_attacks.yaml",
        [
            "nodes.gateways.0.count=1000000000",
            "security.attacks=[{kind: forged_quarantine, at: 5s, gateway: gw-999999999}]",
        ],
    )
    assert scenario.resolve_node("gw-999999999") == "gw-999999999"
    assert scenario.resolve_node("gw-1000000000") is None and scenario.resolve_node("gw-01") is None


def test_recursive_alias_is_refused() -> None:
    assert "inside its own anchor" in _error(NO_DESCRIPTION + "description: &d [*d]\n")


def test_small_aliases_still_work() -> None:
    text = BASE.replace("bandwidth: 20Mbps", "bandwidth: &wifi 20Mbps").replace(
        "bandwidth: 100Mbps", "bandwidth: *wifi"
    )
    scenario = parse_scenario(text, "ok.yaml", ["links.0.bandwidth=1Gbps"])
    assert scenario.links[0].bandwidth == 1e9 and scenario.links[1].bandwidth == 20e6  # the override hits one


def test_huge_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "#" * MAX_FILE_BYTES + "\n")
    with pytest.raises(ScenarioError, match=r"big\.yaml:1: the file is over"):
        load_scenario(big)
    start = time.monotonic()
    message = _error("links:\n" + "  - 1\n" * (MAX_NODES + 10))
    assert time.monotonic() - start < 5 and f"more than {MAX_NODES:,} values" in message


def test_bad_characters_and_dates_have_a_line() -> None:
    text = NO_DESCRIPTION + "description: a\x07b\n"
    assert _error(text).startswith(f"bad.yaml:{text.count(chr(10))}:") and "#x0007" in _error(text)
    assert "cannot read '2020-13-45'" in _error(NO_DESCRIPTION + "description: 2020-13-45\n")


# --- duplicate keys ----------------------------------------------------------------------------------


def test_duplicate_keys_are_refused_naming_both_lines() -> None:
    text = BASE.replace("    bandwidth: 100Mbps", "    bandwidth: 100Mbps\n    bandwidth: 1Mbps")
    message = _error(text)
    first = _line_of(text, "bandwidth: 100Mbps")
    assert message.startswith(f"bad.yaml:{first + 1}:") and f"first on line {first}" in message
    assert "duplicate key `bandwidth`" in message
    top = _error(BASE + "duration: 5s\n")
    assert f"first on line {_line_of(BASE, 'duration: 60s')}" in top


def test_merge_keys_are_not_duplicates() -> None:
    text = BASE + "devices:\n  base: &base {cores: 2, gflops_per_core: 5}\n  fast: {<<: *base, cores: 4}\n"
    assert parse_scenario(text, "ok.yaml").devices["fast"].cores == 4


# --- values that make no sense -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf", "1e999", "1e999s", "nan"])
@pytest.mark.parametrize(
    ("old", "field"),
    [
        ("duration: 60s", "duration"),
        ("latency: 5ms", "links.1.latency"),
        ("bandwidth: 20Mbps", "links.0.bandwidth"),
        ("loss: 0.01", "links.0.loss"),
        ("fps: 5", "nodes.cameras.0.fps"),
        ("retry_interval: 500ms", "broker.retry_interval"),
    ],
)
def test_non_finite_quantities_are_refused(old: str, field: str, bad: str) -> None:
    key = old.split(":")[0]
    text = BASE.replace(old, f"{key}: {bad}")
    message = _error(text)
    assert message.startswith(f"bad.yaml:{_line_of(text, f'{key}: {bad}')}:") and field in message


def test_non_finite_attack_and_fault_numbers_are_refused() -> None:
    attack = "attacks: [{kind: compromised_camera, cameras: [cam], eps: .inf}]\n"
    assert "attacks.0.eps" in _error(BASE + attack)
    assert "attacks.0.alpha" in _error(BASE + attack.replace("eps: .inf", "alpha: .nan"))
    fault = "faults: [{kind: slow_subscriber, node: edge-0, at: 5s, rate: .inf}]\n"
    assert "faults.0.rate" in _error(BASE + fault)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("duration: 60s", "duration: -60"),
        ("latency: 5ms", "latency: -5"),
        ("retry_interval: 500ms", "retry_interval: -0.5"),
    ],
)
def test_negative_durations_are_refused(old: str, new: str) -> None:
    assert "must not be negative" in _error(BASE.replace(old, new))


def test_faults_and_attacks_after_the_end_are_refused_naming_the_entry() -> None:
    fault = "faults:\n  - {kind: broker_restart, at: 5s}\n  - {kind: broker_restart, at: 60s}\n"
    text = BASE + fault
    message = _error(text)
    assert message.startswith(f"bad.yaml:{_line_of(text, 'at: 60s')}:") and "faults.1.at" in message
    assert "at or after the end of the run" in message
    attack = "attacks:\n  - {kind: compromised_camera, cameras: [cam], start: 2min}\n"
    text = BASE + attack
    message = _error(text)
    assert message.startswith(f"bad.yaml:{_line_of(text, 'start: 2min')}:") and "attacks.0.start" in message
    assert "'compromised_camera-pgd' starts at 2min" in message
    assert parse_scenario(BASE + attack.replace("2min", "59s"), "ok.yaml").attacks[0].start == 59


@pytest.mark.parametrize("seed", ["-1", str(SEED_MAX + 1), str(2**64), "1" + "0" * 40])
def test_seeds_outside_numpy_and_torch_range_are_refused(seed: str) -> None:
    text = BASE.replace("seed: 7", f"seed: {seed}")
    message = _error(text)
    assert message.startswith(f"bad.yaml:{_line_of(text, 'seed: ')}:") and "a seed is a whole number" in message
    assert _error(BASE, [f"model.train.seed={seed}"]).startswith("--set model.train.seed")


def test_the_largest_seed_is_usable() -> None:
    import numpy as np
    import torch

    scenario = parse_scenario(BASE.replace("seed: 7", f"seed: {SEED_MAX}"), "ok.yaml")
    np.random.SeedSequence(scenario.seed)
    torch.Generator().manual_seed(scenario.seed)


# --- every error says where -----------------------------------------------------------------------------


def test_overridden_values_are_located_by_their_set_key() -> None:
    message = _error(BASE, ["duration=.nan"])
    assert message.startswith("--set duration (over bad.yaml): duration:") and "finite" in message
    assert _error(BASE, ["seed=-1"]).startswith("--set seed")
    assert _error(BASE, ["nodes.cameras.0.fps=.inf"]).startswith("--set nodes.cameras.0.fps")
    assert "nested more than" in _error(BASE, ["description=" + "[" * 100 + "]" * 100])


def test_model_wide_errors_point_at_the_entry() -> None:
    text = BASE.replace("between: [gw, edge]", "between: [gwy, edge]")
    assert _error(text).startswith(f"bad.yaml:{_line_of(text, 'gwy')}: links.1.between:")
    text = BASE.replace("device: raspberry_pi_4", "device: raspberry_pi4")
    assert _error(text).startswith(f"bad.yaml:{_line_of(text, 'raspberry_pi4')}: nodes.gateways.0.device:")


def test_several_errors_start_with_the_first_location() -> None:
    text = BASE.replace("fps: 5", "fps: -1").replace("count: 10", "count: 0")
    message = _error(text)
    assert "(2 problems)" in message.splitlines()[0]
    assert all(LOCATED.match(line.strip()) for line in message.splitlines()[1:])


# --- fuzz ------------------------------------------------------------------------------------------------

SHIPPED = {path.name: path.read_text() for path in sorted(SCENARIOS.rglob("*.yaml"))}
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
BAD_NUMBERS = [".nan", ".inf", "-.inf", "nan", "-1", "-5s", "1e999", "1e400ms", "99999999999999999999999", "0"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))]
    overrides: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        lines = text.splitlines()
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["dup", "deepen", "alias", "bomb", "number", "delete", "override", "control"]))
        if op == "dup" and lines:
            lines.insert(i, lines[i])
        elif op == "deepen" and lines:
            depth = draw(st.integers(1, 400))
            opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
            lines[i] = re.sub(r":\s*(\S.*)$", ": " + opener * depth + r"\g<1>" + closer * depth, lines[i])
        elif op == "alias" and lines:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i] = re.sub(r":\s+(?=\S)", ": &x ", lines[i], count=1)
            lines[j] = re.sub(r":\s+\S.*$", ": *x", lines[j], count=1)
        elif op == "bomb":
            width, levels = draw(st.integers(2, 12)), draw(st.integers(1, 12))
            lines.append("l0: &l0 [" + ", ".join(["x"] * width) + "]")
            lines += [f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * width) + "]" for k in range(1, levels)]
        elif op == "number":
            matches = list(NUMBER.finditer(text))
            if matches:
                m = draw(st.sampled_from(matches))
                text = text[: m.start()] + draw(st.sampled_from(BAD_NUMBERS)) + text[m.end() :]
                continue
        elif op == "delete" and text:
            at = draw(st.integers(0, len(text) - 1))
            text = text[:at] + text[at + draw(st.integers(1, 5)) :]
            continue
        elif op == "override":
            key = draw(st.sampled_from(["duration", "seed", "links.0.bandwidth", "nodes.cameras.0.fps", "x.y"]))
            overrides.append(f"{key}={draw(st.sampled_from(BAD_NUMBERS + ['[[[[[[]]]]]]', '&a [*a]']))}")
        elif op == "control" and lines:
            lines[i] += draw(st.sampled_from(["\x00", "\x07", "\ufffe", "\t", " #"]))
        text = "\n".join(lines) + "\n"
    return text, overrides


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _floats(v)]
    return []


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_scenarios_load_or_fail_with_a_location(case: tuple[str, list[str]]) -> None:
    text, overrides = case
    start = time.monotonic()
    try:
        scenario = parse_scenario(text, "bad.yaml", overrides)
    except ScenarioError as exc:
        assert LOCATED.match(str(exc)), str(exc)
    else:
        assert isinstance(scenario, Scenario)
        assert all(math.isfinite(f) for f in _floats(scenario.model_dump())), "a non-finite number got through"
        assert 0 <= scenario.seed <= SEED_MAX
        assert all(fault.at < scenario.duration for fault in scenario.faults)
        assert all(attack.start < scenario.duration for attack in scenario.attacks)
    assert time.monotonic() - start < 2.0, "one input took over 2 s"
