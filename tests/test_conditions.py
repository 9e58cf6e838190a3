"""Camera conditions: the CIFAR-10-C corruptions (range, shape, determinism, severity), and cameras that see
through them in a run, simulated and live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCENARIOS

import iotbed
from iotbed.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, plasma_fractal
from iotbed.emulation.runner import emulate
from iotbed.errors import IotbedError, ScenarioError
from iotbed.runner import prepare

QUICKSTART = SCENARIOS / "quickstart.yaml"
FOG = "nodes.cameras.0.conditions=[{kind: fog, severity: 5, start: 4s, stop: 8s}, {kind: contrast, severity: 5, start: 8s}]"


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    _, artefacts, _ = prepare(iotbed.load_scenario(QUICKSTART), progress=False)
    return artefacts.images[:300], torch.as_tensor(artefacts.labels[:300]), artefacts.model.eval()


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruptions_keep_range_and_shape_and_follow_the_generator(kind: str) -> None:
    x = torch.rand(4, 3, 20, 24)
    for severity in SEVERITIES:
        a = corrupt(x, kind, severity, torch.Generator().manual_seed(1))
        b = corrupt(x, kind, severity, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and a.dtype == torch.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert torch.equal(a, b)
        assert not torch.equal(a, x)
    if kind in ("gaussian_noise", "fog"):  # the random ones draw from the generator
        assert not torch.equal(
            corrupt(x, kind, 3, torch.Generator().manual_seed(1)), corrupt(x, kind, 3, torch.Generator().manual_seed(2))
        )


def test_brightness_raises_value_and_keeps_hue() -> None:
    x = torch.tensor([0.2, 0.1, 0.05]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    y = corrupt(x, "brightness", 5, torch.Generator())
    assert float(y.amax()) == pytest.approx(0.2 + 0.3)
    assert torch.allclose(y / y.amax(dim=1, keepdim=True), x / x.amax(dim=1, keepdim=True))


def test_plasma_fractal_is_a_normalised_map() -> None:
    plasma = plasma_fractal(32, 2.0, np.random.default_rng(0))
    assert plasma.shape == (32, 32) and plasma.min() == 0.0 and plasma.max() == 1.0
    assert np.array_equal(plasma, plasma_fractal(32, 2.0, np.random.default_rng(0)))


@pytest.mark.parametrize("kind", ["fog", "brightness", "contrast"])
def test_accuracy_falls_as_severity_rises(digits, kind: str) -> None:  # type: ignore[no-untyped-def]
    images, labels, model = digits
    accuracy = []
    for severity in SEVERITIES:
        with torch.no_grad():
            seen = corrupt(images, kind, severity, torch.Generator().manual_seed(0))
            accuracy.append(float((model(seen).argmax(1) == labels).float().mean()))
    assert accuracy[-1] < accuracy[0] - 0.05
    assert all(later <= earlier + 0.02 for earlier, later in zip(accuracy, accuracy[1:]))


def test_bad_conditions_are_refused_at_validation() -> None:
    for override, message in {
        "nodes.cameras.0.conditions=[{kind: fog, severity: 6}]": "less than or equal to 5",
        "nodes.cameras.0.conditions=[{kind: haze}]": "fog",
        "nodes.cameras.0.conditions=[{kind: fog, start: 5s, stop: 2s}]": "stop must come after start",
    }.items():
        with pytest.raises(ScenarioError, match=message):
            iotbed.load_scenario(QUICKSTART, [override])


def test_cameras_see_through_their_conditions_in_simulation_and_live(plain_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scenario = iotbed.load_scenario(QUICKSTART, ["duration=12s", "links.0.loss=0", FOG])
    simulated = iotbed.run(scenario, tmp_path / "sim", progress=False)
    trace = simulated.trace
    fogged = trace["condition"] == "fog-5"
    assert (trace.loc[fogged, "t_capture"].between(4.0, 8.0, inclusive="left")).all()
    assert (trace.loc[~fogged & (trace["t_capture"] < 8.0), "condition"] == "").all()
    assert (trace.loc[trace["t_capture"] >= 8.0, "condition"] == "contrast-5").all()
    by_condition = simulated.summary["accuracy"]["by_condition"]
    fog = by_condition["fog-5"]
    assert fog["delivered"] > 100
    assert fog["accuracy"] == fog["undefended_reference"]  # no defense: the edge is the bare model
    clean = trace.loc[trace["condition"] == "", "correct"].mean()
    assert fog["accuracy"] < clean - 0.2
    live = emulate(scenario, plain_broker.url, out_dir=tmp_path / "live", progress=False).summary
    for label, entry in by_condition.items():  # the same frames, the same 8-bit pixels, the same predictions
        assert live["accuracy"]["by_condition"][label]["accuracy"] == pytest.approx(entry["accuracy"], abs=0.02)


def test_the_report_draws_the_conditions_and_risk_coverage_figures(tmp_path: Path) -> None:
    from iotbed.analysis import plots

    scenario = iotbed.load_scenario(
        QUICKSTART, ["duration=15s", "nodes.edge_servers.0.reject={target: {coverage: 0.9}}", FOG]
    )
    iotbed.run(scenario, tmp_path / "run", progress=False)
    assert {"selective", "conditions"} <= set(plots.available(tmp_path / "run"))
    for kind in ("selective", "conditions"):
        (png,) = plots.plot(kind, tmp_path / "run", formats=("png",))
        assert png.stat().st_size > 10_000
    plain = iotbed.load_scenario(QUICKSTART, ["duration=5s"])
    iotbed.run(plain, tmp_path / "plain", progress=False)
    assert not {"selective", "conditions"} & set(plots.available(tmp_path / "plain"))
    with pytest.raises(IotbedError, match="needs an edge with `reject:`"):
        plots.plot("selective", tmp_path / "plain", formats=("png",))
