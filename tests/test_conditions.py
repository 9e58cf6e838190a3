"""Camera conditions: the corruptions (range, shape, determinism, what each does, severity), their schedules,
and cameras that see through them in a run, simulated and live."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCENARIOS

import iotbed
from iotbed.data import corruptions
from iotbed.data.corruptions import CORRUPTIONS, RANDOM_KINDS, SEVERITIES, corrupt, plasma_fractal
from iotbed.emulation.runner import emulate
from iotbed.errors import IotbedError, ScenarioError
from iotbed.runner import prepare
from iotbed.scenario import parse_scenario, resolved_yaml
from iotbed.scenario.schema import ConditionKind

QUICKSTART = SCENARIOS / "quickstart.yaml"
FOG = "nodes.cameras.0.conditions=[{kind: fog, severity: 5, start: 4s, stop: 8s}, {kind: contrast, severity: 5, start: 8s}]"


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    _, artefacts, _ = prepare(iotbed.load_scenario(QUICKSTART), progress=False)
    return artefacts.images[:300], torch.as_tensor(artefacts.labels[:300]), artefacts.model.eval()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruptions_keep_range_and_shape_and_follow_the_generator(kind: str, channels: int) -> None:
    x = torch.rand(4, channels, 20, 24)
    for severity in SEVERITIES:
        a = corrupt(x, kind, severity, torch.Generator().manual_seed(1))
        b = corrupt(x, kind, severity, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and a.dtype == torch.float32
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert torch.equal(a, b)
        assert not torch.equal(a, x)
    other_seed = corrupt(x, kind, 3, torch.Generator().manual_seed(2))
    assert torch.equal(corrupt(x, kind, 3, torch.Generator().manual_seed(1)), other_seed) == (kind not in RANDOM_KINDS)


def test_the_scenario_schema_offers_every_corruption() -> None:
    assert set(typing.get_args(ConditionKind)) == set(CORRUPTIONS)
    assert RANDOM_KINDS <= set(CORRUPTIONS) and set(corruptions.SOURCES) == set(CORRUPTIONS)


def test_brightness_raises_value_and_keeps_hue() -> None:
    x = torch.tensor([0.2, 0.1, 0.05]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    y = corrupt(x, "brightness", 5, torch.Generator())
    assert float(y.amax()) == pytest.approx(0.2 + 0.3)
    assert torch.allclose(y / y.amax(dim=1, keepdim=True), x / x.amax(dim=1, keepdim=True))


def test_plasma_fractal_is_a_normalised_map() -> None:
    plasma = plasma_fractal(32, 2.0, np.random.default_rng(0))
    assert plasma.shape == (32, 32) and plasma.min() == 0.0 and plasma.max() == 1.0
    assert np.array_equal(plasma, plasma_fractal(32, 2.0, np.random.default_rng(0)))


# CIFAR-10-C's noise, blur and compression constants were set for 32x32 photographs; the digits (8x8, upscaled,
# so already smooth) keep their labels through all of them (measured: within 2 points of clean at severity 5).
# For those the test asks that accuracy does not rise with severity; the others must cost at least 5 points.
MILD_ON_DIGITS = {"gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur", "motion_blur"}
MILD_ON_DIGITS |= {"jpeg", "pixelate"}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_accuracy_falls_and_images_move_further_as_severity_rises(digits, kind: str) -> None:  # type: ignore[no-untyped-def]
    images, labels, model = digits
    accuracy, distance = [], []
    for severity in SEVERITIES:
        with torch.no_grad():
            seen = corrupt(images, kind, severity, torch.Generator().manual_seed(0))
            accuracy.append(float((model(seen).argmax(1) == labels).float().mean()))
        distance.append(float((seen - images).abs().mean()))
    assert all(later <= earlier + 0.02 for earlier, later in zip(accuracy, accuracy[1:]))
    if kind not in MILD_ON_DIGITS:
        assert accuracy[-1] < accuracy[0] - 0.05
    # CIFAR-10-C's motion blur at severities 3 and 4, (6, 2) and (8, 2), differs only in taps weighing < 1e-4.
    assert all(later >= earlier - 1e-4 for earlier, later in zip(distance, distance[1:]))
    assert distance[-1] > 1.5 * distance[0]


def test_gaussian_blur_is_skimages_gaussian() -> None:
    from skimage.filters import gaussian

    x = torch.rand(2, 3, 20, 24)
    for severity in SEVERITIES:
        ours = corrupt(x, "gaussian_blur", severity, torch.Generator())
        sigma = corruptions.GAUSSIAN_BLUR[severity - 1]
        for image, blurred in zip(x.numpy(), ours.numpy()):
            theirs = gaussian(image, sigma=sigma, channel_axis=0, mode="nearest", truncate=4.0)
            assert np.allclose(blurred, theirs, atol=1e-5)


def test_defocus_disk_grows_with_severity() -> None:
    kernels = [corruptions.disk_kernel(*corruptions.DEFOCUS_BLUR[s - 1]) for s in SEVERITIES]
    assert all(k.sum() == pytest.approx(1.0) and np.allclose(k, k.T) and np.allclose(k, k[::-1]) for k in kernels)
    centres = [k[k.shape[0] // 2, k.shape[1] // 2] for k in kernels]
    assert all(later < earlier for earlier, later in zip(centres, centres[1:]))  # weight spreads off the centre
    assert kernels[3].shape == (5, 5)  # radius 1: the centre and its four neighbours, then the 3x3 antialiasing


def _skimage_warp(image: np.ndarray, source: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """MNIST-C's warp: skimage's, with the inverse map `source` about the centre plus `shift` (x, y)."""
    from skimage import transform

    h, w = image.shape[1:]
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    matrix = np.eye(3)
    matrix[:2, :2], matrix[:2, 2] = source, centre - source @ centre + shift
    return transform.warp(image.transpose(1, 2, 0), inverse_map=transform.AffineTransform(matrix=matrix), order=1)


def test_geometry_is_mnist_cs_warp_with_a_random_sign_per_image() -> None:
    x = torch.rand(24, 1, 28, 28)
    a, b = corruptions.ROTATE[1], corruptions.SHEAR[1]
    rotation = {s: np.array([[np.cos(s * a), -np.sin(s * a)], [np.sin(s * a), np.cos(s * a)]]) for s in (1, -1)}
    shear = {s: np.array([[1.0, -np.sin(s * b)], [0.0, np.cos(s * b)]]) for s in (1, -1)}
    d = corruptions.TRANSLATE[1]
    shifts = {(sx, sy): np.array([sx * d, sy * d]) for sx in (1, -1) for sy in (1, -1)}
    cases = {
        "rotate": {s: (m, np.zeros(2)) for s, m in rotation.items()},
        "shear": {s: (m, np.zeros(2)) for s, m in shear.items()},
        "scale": {1: (np.eye(2) * corruptions.SCALE[1], np.zeros(2))},
        "translate": {s: (np.eye(2), shift) for s, shift in shifts.items()},
    }
    for kind, options in cases.items():
        ours = corrupt(x, kind, 2, torch.Generator().manual_seed(0)).numpy()
        chosen = []
        for image, warped in zip(x.numpy(), ours):
            errors = {s: np.abs(_skimage_warp(image, *m).transpose(2, 0, 1) - warped).max() for s, m in options.items()}
            best = min(errors, key=errors.__getitem__)
            assert errors[best] < 1e-5, kind
            chosen.append(best)
        assert set(chosen) == set(options), kind  # every direction turns up among 24 images


def test_impulse_and_shot_noise_follow_their_published_rates() -> None:
    x = torch.full((32, 3, 32, 32), 0.5)
    for severity in SEVERITIES:
        hit = corrupt(x, "impulse_noise", severity, torch.Generator().manual_seed(severity))
        changed = hit != 0.5
        assert float(changed.float().mean()) == pytest.approx(corruptions.IMPULSE_NOISE[severity - 1], rel=0.15)
        assert set(hit[changed].unique().tolist()) == {0.0, 1.0}
        shot = corrupt(x, "shot_noise", severity, torch.Generator().manual_seed(severity))
        photons = corruptions.SHOT_NOISE[severity - 1]
        assert float(shot.mean()) == pytest.approx(0.5, abs=0.01)
        assert float(shot.std()) == pytest.approx((0.5 / photons) ** 0.5, rel=0.1)  # Poisson: variance = mean


def test_motion_blur_keeps_flat_images_and_draws_a_dot_into_a_line() -> None:
    flat = torch.full((3, 3, 32, 32), 0.4)
    assert torch.allclose(corrupt(flat, "motion_blur", 5, torch.Generator()), flat, atol=1e-6)
    dot = torch.zeros(16, 1, 32, 32)
    dot[:, :, 16, 16] = 1.0
    smeared = corrupt(dot, "motion_blur", 1, torch.Generator().manual_seed(0))
    assert torch.allclose(smeared.sum(dim=(1, 2, 3)), torch.ones(16), atol=1e-5)  # weights sum to one
    radius = corruptions.MOTION_BLUR[0][0]
    for image in smeared[:, 0]:
        rows, cols = torch.nonzero(image > 0, as_tuple=True)
        assert len(rows) > 3 and (rows - 16).abs().max() <= radius * 2 and (cols - 16).abs().max() <= radius * 2
        assert image[16, 16] == image.max()  # the blur runs one way from the point, heaviest at it


def test_rain_brightens_in_streaks_and_dark_scales_value() -> None:
    x = torch.rand(8, 3, 32, 32) * 0.5
    covered = []
    for severity in SEVERITIES:
        rained = corrupt(x, "rain", severity, torch.Generator().manual_seed(0))
        assert bool((rained >= x - 1e-6).all())  # streaks blend toward white; nothing darkens
        covered.append(float((rained > x + 1e-6).float().mean()))
        darkened = corrupt(x, "dark", severity, torch.Generator())
        assert torch.allclose(darkened, x * corruptions.DARK[severity - 1])
    assert all(later > earlier for earlier, later in zip(covered, covered[1:]))


def test_lengths_scale_with_frames_larger_than_the_published_ones() -> None:
    dot = torch.zeros(1, 1, 128, 128)
    dot[:, :, 64, 64] = 1.0
    wide = corrupt(dot, "gaussian_blur", 5, torch.Generator())
    small = corrupt(dot[:, :, 48:80, 48:80], "gaussian_blur", 5, torch.Generator())
    assert float((wide > 1e-4).sum()) > 10 * float((small > 1e-4).sum())  # sigma 4 px on 128 px, 1 px on 32 px


def test_bad_conditions_are_refused_at_validation() -> None:
    for override, message in {
        "nodes.cameras.0.conditions=[{kind: fog, severity: 6}]": "less than or equal to 5",
        "nodes.cameras.0.conditions=[{kind: haze}]": "fog",
        "nodes.cameras.0.conditions=[{kind: fog, start: 5s, stop: 2s}]": "stop must come after start",
    }.items():
        with pytest.raises(ScenarioError, match=message):
            iotbed.load_scenario(QUICKSTART, [override])


SCHEDULE = "nodes.cameras.0.conditions=[{kind: fog, schedule: {60s: 1, 80s: 2, 100s: 3}}, {kind: rain, stop: 5s}]"


def test_a_schedule_becomes_plain_windows() -> None:
    scenario = iotbed.load_scenario(QUICKSTART, [SCHEDULE])
    windows = [(c.kind, c.severity, c.start, c.stop) for c in scenario.nodes.cameras[0].conditions]
    assert windows == [("fog", 1, 60.0, 80.0), ("fog", 2, 80.0, 100.0), ("fog", 3, 100.0, None), ("rain", 3, 0.0, 5.0)]
    assert all(c.schedule is None for c in scenario.nodes.cameras[0].conditions)
    again = parse_scenario(resolved_yaml(scenario), "resolved.yaml")  # the resolved file lists the windows
    assert again == scenario and "schedule" not in resolved_yaml(scenario)
    stopped = iotbed.load_scenario(
        QUICKSTART, ["nodes.cameras.0.conditions=[{kind: dark, schedule: {0: 2, 1min: 5}, stop: 90s}]"]
    )
    assert [(c.severity, c.start, c.stop) for c in stopped.nodes.cameras[0].conditions] == [
        (2, 0.0, 60.0),
        (5, 60.0, 90.0),
    ]


BAD_SCHEDULES = [  # the entry's lines under `- kind: fog`, the line the error must name, what it must say
    (["schedule:", "  80s: 1", "  60s: 2"], "60s: 2", "schedule times must rise: 60s comes before 80s"),
    (["schedule:", "  60s: 1", "  1min: 2"], "1min: 2", "1min is the same time as 60s"),
    (["schedule:", "  60s: 1", "  70s: 6"], "70s: 6", "the severity at 70s must be a whole number from 1 to 5"),
    (["schedule:", "  60s: 0"], "60s: 0", "from 1 to 5, got 0"),
    (["schedule:", "  soon: 1"], "soon: 1", "a duration"),
    (["schedule: {}"], "schedule: {}", "a schedule maps times to severities"),
    (["schedule: {60s: 1}", "severity: 2"], "severity: 2", "`severity` and `schedule` do not go together"),
    (["schedule: {60s: 1}", "start: 2s"], "start: 2s", "`start` and `schedule` do not go together"),
    (["schedule: {60s: 1, 70s: 2}", "stop: 50s"], "stop: 50s", "stop must come after the schedule's last time, 70s"),
]


@pytest.mark.parametrize(("lines", "culprit", "message"), BAD_SCHEDULES)
def test_bad_schedules_are_refused_on_their_line(lines: list[str], culprit: str, message: str) -> None:
    entry = "".join(f"          {line}\n" for line in lines)
    text = QUICKSTART.read_text().replace(
        "      arrivals: periodic\n", f"      arrivals: periodic\n      conditions:\n        - kind: fog\n{entry}", 1
    )
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "bad.yaml")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip() == culprit)
    assert f"bad.yaml:{line}:" in str(info.value) and message in str(info.value)


def test_a_scheduled_condition_changes_what_the_cameras_see_over_time(tmp_path: Path) -> None:
    schedule = "nodes.cameras.0.conditions=[{kind: dark, schedule: {2s: 2, 4s: 5}, stop: 6s}]"
    scenario = iotbed.load_scenario(QUICKSTART, ["duration=8s", "links.0.loss=0", schedule])
    trace = iotbed.run(scenario, tmp_path / "run", progress=False).trace
    expected = np.select(
        [trace["t_capture"] < 2, trace["t_capture"] < 4, trace["t_capture"] < 6], ["", "dark-2", "dark-5"], ""
    )
    assert (trace["condition"].to_numpy() == expected).all()
    assert set(expected) == {"", "dark-2", "dark-5"}


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
