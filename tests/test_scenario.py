"""Scenario files: units, defaults, overrides, and clear errors with file:line for every kind of mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SCENARIOS

from iotbed.errors import ScenarioError
from iotbed.scenario import json_schema, load_scenario, parse_scenario, resolved_yaml
from iotbed.units import parse_bandwidth, parse_duration, parse_size

QUICKSTART = SCENARIOS / "quickstart.yaml"


def test_units_parse_as_users_write_them() -> None:
    assert parse_duration("5ms") == pytest.approx(0.005)
    assert parse_duration("60s") == 60.0
    assert parse_duration("2min") == 120.0
    assert parse_duration(1.5) == 1.5
    assert parse_bandwidth("10Mbps") == 10e6
    assert parse_bandwidth("1Gbps") == 1e9
    assert parse_bandwidth("2MBps") == 16e6
    assert parse_size("64KB") == 64e3
    assert parse_size("1MiB") == 2**20
    with pytest.raises(ValueError, match="unknown duration unit 'parsec'"):
        parse_duration("5parsec")
    with pytest.raises(ValueError, match="expected a bandwidth"):
        parse_bandwidth("fast")


def test_shipped_scenarios_validate() -> None:
    from iotbed.sweep import load_sweep, plan

    for path in sorted(SCENARIOS.rglob("*.yaml")):
        if "scenario:" in path.read_text():  # a sweep: its base scenario and every point must load
            spec, base = load_sweep(path)
            for run in plan(spec, base, Path("unused")):
                assert load_scenario(run.scenario_path, run.overrides).duration > 0, (path, run.run_id)
        else:
            assert load_scenario(path).duration > 0, path


def test_a_sweep_file_given_to_run_says_to_use_sweep() -> None:
    with pytest.raises(ScenarioError, match="this is a sweep file"):
        load_scenario(SCENARIOS / "bandwidth_vs_robustness.yaml")


def test_resolved_scenario_round_trips() -> None:
    scenario = load_scenario(QUICKSTART)
    text = resolved_yaml(scenario)
    assert "bandwidth: 20Mbps" in text and "latency: 2ms" in text
    again = parse_scenario(text, "resolved")
    assert again == scenario


def test_set_overrides_nested_values_and_list_items() -> None:
    scenario = load_scenario(QUICKSTART, ["duration=30s", "nodes.cameras.0.count=3", "links.1.bandwidth=1Gbps"])
    assert scenario.duration == 30.0
    assert scenario.nodes.cameras[0].count == 3
    assert scenario.links[1].bandwidth == 1e9


def test_schema_describes_units_and_forbids_unknown_keys() -> None:
    schema = json_schema()
    link = schema["$defs"]["LinkSpec"]
    assert link["additionalProperties"] is False
    assert any(option.get("type") == "string" for option in link["properties"]["bandwidth"]["anyOf"])


BASE = QUICKSTART.read_text()


def _error(text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "bad.yaml", overrides or [])
    return str(info.value)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_unknown_key_names_the_line_and_suggests_the_right_one() -> None:
    text = BASE.replace("    bandwidth: 100Mbps", "    bandwith: 100Mbps")
    message = _error(text)
    assert f"bad.yaml:{_line_of(text, 'bandwith')}" in message
    assert "unknown key `bandwith`" in message and "did you mean `bandwidth`?" in message


def test_unknown_top_level_key_is_suggested() -> None:
    message = _error(BASE + "\nduraton: 5s\n")
    assert "unknown key `duraton`" in message and "did you mean `duration`?" in message


def test_wrong_unit_names_the_line_and_the_accepted_units() -> None:
    text = BASE.replace("latency: 5ms", "latency: 5 parsecs")
    message = _error(text)
    assert f"bad.yaml:{_line_of(text, 'latency: 5 parsecs')}" in message
    assert "links.1.latency" in message


def test_bandwidth_in_the_wrong_kind_of_unit() -> None:
    message = _error(BASE.replace("bandwidth: 20Mbps", "bandwidth: 20ms"))
    assert "unknown bandwidth unit 'ms'" in message and "Mbps" in message


def test_impossible_values_are_refused() -> None:
    assert "count" in _error(BASE.replace("count: 10", "count: 0"))
    assert "rate" in _error(BASE.replace("loss: 0.01", "loss: 1.5"))
    assert "bandwidth must be above zero" in _error(BASE.replace("bandwidth: 20Mbps", "bandwidth: 0Mbps"))
    assert "duration must be above zero" in _error(BASE.replace("duration: 60s", "duration: 0s"))
    assert "fps" in _error(BASE.replace("fps: 5", "fps: -1"))


def test_unknown_references_get_suggestions() -> None:
    assert "did you mean `gw`?" in _error(BASE.replace("between: [gw, edge]", "between: [gwy, edge]"))
    assert "did you mean `edge`?" in _error(BASE.replace("  node: edge", "  node: egde"))
    assert "did you mean `raspberry_pi_4`?" in _error(BASE.replace("device: raspberry_pi_4", "device: raspberry_pi4"))


def test_bad_loss_model_is_explained() -> None:
    message = _error(BASE.replace("loss: 0.01", "loss: {model: gilbert, p: 0.1}"))
    assert "gilbert_elliott" in message


def test_missing_required_key() -> None:
    message = _error(BASE.replace("duration: 60s\n", ""))
    assert "`duration` is required" in message


def test_invalid_yaml_names_line_and_column() -> None:
    message = _error("name: x\nnodes: [unclosed\n")
    assert message.startswith("bad.yaml:") and "not valid YAML" in message


def test_not_a_mapping() -> None:
    assert "a scenario is a mapping" in _error("- just\n- a list\n")


def test_bad_topic_filter_in_qos_map() -> None:
    assert "`#` must be" in _error(BASE.replace('"frames/#": 1, "models/#": 1', '"frames/#/x": 1'))


def test_bad_override_is_explained() -> None:
    assert "key.path=value" in _error(BASE, ["duration"])
    assert "nothing at `nodes.cameras.5`" in _error(BASE, ["nodes.cameras.5.count=1"])
    assert "unknown key `registy`" in _error(BASE, ["registy.topic=x"])
    assert _error(BASE, ["duration=fast"]).startswith("--set duration (over bad.yaml): duration: expected a duration")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "nope.yaml")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iotbed.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    "mutation",
    [
        ("    bandwidth: 100Mbps", "    bandwith: 100Mbps"),
        ("latency: 5ms", "latency: 5 parsecs"),
        ("count: 10", "count: -2"),
        ("between: [gw, edge]", "between: [gw, nowhere]"),
        ("duration: 60s", "duration: [60s"),
    ],
)
def test_cli_validate_exits_2_without_a_traceback(tmp_path: Path, mutation: tuple[str, str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace(*mutation))
    result = _cli("validate", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(bad) in result.stderr


def test_cli_validate_and_schema_succeed() -> None:
    assert _cli("validate", str(QUICKSTART)).returncode == 0
    schema = _cli("schema")
    assert schema.returncode == 0 and json.loads(schema.stdout)["title"] == "Scenario"


def test_cli_run_refuses_to_overwrite_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    result = _cli("run", str(QUICKSTART), "--out", str(out), "--quiet")
    assert result.returncode != 0 and "--force" in result.stderr and "Traceback" not in result.stderr
    assert (out / "summary.json").read_text() == "{}"  # nothing already written is lost


def test_resolved_yaml_is_plain_yaml() -> None:
    data = yaml.safe_load(resolved_yaml(load_scenario(QUICKSTART)))
    assert data["broker"]["retry_interval"] == "500ms"


def test_faults_name_what_they_need() -> None:
    slow = "faults: [{kind: slow_subscriber, node: edge-0, at: 5s, down: 10s, rate: 5}]\n"
    assert parse_scenario(BASE + slow, "ok.yaml", []).faults[0].rate == 5
    assert "slow_subscriber needs `rate:`" in _error(BASE + slow.replace(", rate: 5", ""))
    assert "slow_subscriber needs `node:`" in _error(BASE + slow.replace("node: edge-0, ", ""))
    assert "broker_restart takes no `node:`" in _error(
        BASE + "faults: [{kind: broker_restart, node: edge-0, at: 1s}]\n"
    )
    assert "node_crash takes no `rate:`" in _error(
        BASE + "faults: [{kind: node_crash, node: edge-0, at: 1s, rate: 2}]\n"
    )
    assert "max_queued" in _error(BASE.replace("retry_interval: 500ms", "retry_interval: 500ms\n  max_queued: -1"))
    assert "runs no MQTT client" in _error(BASE + slow.replace("edge-0", "gw-0"))
