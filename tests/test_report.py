"""Plots and the HTML report, checked the way a user sees them: rendered by headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, SCENARIOS

import iotbed
from iotbed.analysis import plots
from iotbed.analysis.plots import plot
from iotbed.analysis.report import Interval, fmt, write_report
from iotbed.errors import IotbedError
from iotbed.sweep import run_sweep

ARTEFACTS = REPO / ".cache" / "test-artefacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scenario = iotbed.load_scenario(SCENARIOS / "quickstart.yaml", ["duration=10s"])
    out = tmp_path_factory.mktemp("run") / "quickstart"
    iotbed.run(scenario, out, progress=False)
    return out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    sweep = folder / "sweep.yaml"
    sweep.write_text(f"""
name: report
scenario: {SCENARIOS / "quickstart.yaml"}
replications: 2
grid:
  links.0.loss: [0.0, 0.05, 3.0]
set: {{duration: 3s}}
""")
    run_sweep(sweep, folder / "out", workers=1, progress=False)
    return folder / "out"


def test_plots_write_png_and_svg(run_dir: Path, sweep_dir: Path) -> None:
    for folder in (run_dir, sweep_dir):
        for kind in ("latency", "throughput"):
            paths = plot(kind, folder)
            assert {p.suffix for p in paths} == {".png", ".svg"}
            assert all(p.stat().st_size > 5_000 for p in paths)
            assert "<svg" in paths[1].read_text()[:2000]


def test_plot_errors_are_clear(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(IotbedError, match="did you mean `latency`"):
        plot("latncy", run_dir)
    with pytest.raises(IotbedError, match="neither a run folder"):
        plot("latency", tmp_path)


def render(report: Path, screenshot: Path) -> dict[str, object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it)")
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri())
        images = page.evaluate(
            "Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0}))"
        )
        tables = page.locator("table").count()
        headings = page.locator("h2").all_inner_texts()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"images": images, "tables": tables, "headings": headings}


def test_run_report_renders_with_its_figures(run_dir: Path) -> None:
    report = write_report(run_dir)
    assert "data:image/png;base64," in report.read_text()  # self-contained: figures embedded
    seen = render(report, ARTEFACTS / "report-run.png")
    assert [i["alt"] for i in seen["images"]] == ["latency", "throughput"]  # type: ignore[index]
    assert all(i["ok"] for i in seen["images"])  # type: ignore[union-attr]
    assert seen["tables"] >= 2 and "Scenario (resolved)" in seen["headings"]  # type: ignore[operator]
    assert (ARTEFACTS / "report-run.png").stat().st_size > 50_000


def test_sweep_report_renders_and_shows_failures(sweep_dir: Path) -> None:
    report = write_report(sweep_dir)
    seen = render(report, ARTEFACTS / "report-sweep.png")
    assert len(seen["images"]) == 2 and all(i["ok"] for i in seen["images"])  # type: ignore[arg-type, union-attr]
    assert "Failed runs (2)" in seen["headings"]  # type: ignore[operator]
    assert seen["tables"] >= 3  # type: ignore[operator]


# ---------------------------------------------------------------- what the report draws and how it shows numbers


def _copy(folder: Path, target: Path) -> Path:
    """A copy of a run or sweep folder without any figure or report saved in it."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.png", "*.svg", "report.html", "figures"))
    return target


def _alts(page: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)


def _sweep(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(f"scenario: {SCENARIOS / 'quickstart.yaml'}\n{body}")
    return run_sweep(folder / "sweep.yaml", folder / "out", workers=1, progress=False).out_dir


@pytest.fixture(scope="module")
def bandwidth_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep over a parameter written with units (`20Mbps`): no numeric column to put on the x axis."""
    return _sweep(
        tmp_path_factory.mktemp("bandwidth"),
        "name: bandwidth\ngrid:\n  links.0.bandwidth: [20Mbps, 2Mbps, 500kbps]\nset: {duration: 2s}\n",
    )


@pytest.fixture(scope="module")
def attacked_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sweep(
        tmp_path_factory.mktemp("attacked"),
        """name: attacked
grid:
  nodes.cameras.0.codec: [{kind: raw}, {kind: pixel_drop, rate: 0.25, window: 8, mask: seed}]
set:
  duration: 2s
  attacks: [{kind: compromised_camera, cameras: [cam], method: fgsm, eps: 0.1, fraction: 0.5}]
""",
    )


def test_sweep_report_draws_its_figures_into_no_file_of_the_folder(sweep_dir: Path, tmp_path: Path) -> None:
    folder = _copy(sweep_dir, tmp_path / "sweep")
    before = {p.relative_to(folder) for p in folder.rglob("*")}
    page = write_report(folder).read_text()
    assert _alts(page) == ["latency", "throughput"]
    assert page.count("<img") == page.count("data:image/png;base64,") == 2
    assert "No figures" not in page
    assert {p.relative_to(folder) for p in folder.rglob("*")} == before | {Path("report.html")}


def test_sweep_over_a_parameter_with_units_gets_its_figures(bandwidth_sweep: Path) -> None:
    """The cause of "No figures": every figure of a sweep needs an x axis, and a sweep that varies only
    values such as `20Mbps`, a codec or a QoS map had no numeric one, so each figure was left out."""
    page = write_report(bandwidth_sweep).read_text()
    assert _alts(page) == ["latency", "throughput"]
    frame = pd.read_csv(bandwidth_sweep / "sweep.csv")
    column = plots._x_param(frame, None)
    assert column == "param.links.0.bandwidth"
    _, ticks = plots._categories(frame, column)
    assert ticks == ["500kbps", "2Mbps", "20Mbps"]  # by size, not as the grid or the alphabet lists them


def test_attacked_sweep_report_adds_the_robustness_figures(attacked_sweep: Path) -> None:
    page = write_report(attacked_sweep).read_text()
    assert _alts(page) == ["latency", "throughput", "bandwidth_vs_robustness", "robustness"]
    assert "accuracy.<wbr>attacked" in page and "Not drawn" not in page


def test_a_saved_figure_is_reused_only_while_it_is_current(sweep_dir: Path, tmp_path: Path) -> None:
    folder = _copy(sweep_dir, tmp_path / "sweep")
    # a latency figure saved by `iotbed plot` that looks unlike any the report draws, so the page shows
    # which one it embedded
    saved = folder / "figures" / "latency.png"
    saved.parent.mkdir()
    fig = plots.plt.figure(figsize=(2, 1))
    fig.text(0.5, 0.5, "saved by iotbed plot")
    fig.savefig(saved)
    plots.plt.close(fig)
    page = write_report(folder).read_text()
    assert base64.b64encode(saved.read_bytes()).decode("ascii") in page
    assert "figures/latency.png, saved earlier" in page
    later = saved.stat().st_mtime + 10
    os.utime(folder / "sweep.csv", (later, later))  # the sweep resumed: the saved figure is stale
    page = write_report(folder).read_text()
    assert base64.b64encode(saved.read_bytes()).decode("ascii") not in page
    assert "saved earlier" not in page and _alts(page) == ["latency", "throughput"]


def _summary_rows(page: str) -> dict[str, str]:
    table = page.split("<h2>Summary</h2>", 1)[1].split("</table>", 1)[0]
    return dict(re.findall(r"<tr><td>([^<]*)</td><td[^>]*>([^<]*)</td></tr>", table))


def test_run_report_shows_rounded_numbers_and_flat_rows(run_dir: Path, tmp_path: Path) -> None:
    folder = _copy(run_dir, tmp_path / "run")
    summary = json.loads((folder / "summary.json").read_text())
    page = write_report(folder).read_text()
    rows = _summary_rows(page)
    p95 = summary["latency_ms"]["p95"]
    assert p95 != round(p95, 2)  # the test means something: the raw value has more digits
    assert rows["latency_ms.p95"] == f"{p95:.4g}"
    assert repr(p95) not in page
    assert rows["accuracy.undefended_reference.clean"] == f"{summary['accuracy']['undefended_reference']['clean']:.4g}"
    assert rows["frames.captured"] == f"{summary['frames']['captured']:,}"
    assert rows["bandwidth.per_camera_kbps"] == f"{summary['bandwidth']['per_camera_kbps']:.4g}"
    assert "accuracy.undefended_reference" not in rows  # flattened, not shown as one dict
    tables = re.findall(r"<table>.*?</table>", page, flags=re.S)
    assert tables and not any("{" in re.sub(r"<[^>]+>", "", t) for t in tables)


def test_report_escapes_text_from_edited_files(run_dir: Path, tmp_path: Path) -> None:
    folder = _copy(run_dir, tmp_path / "<i>run")
    summary = json.loads((folder / "summary.json").read_text())
    summary["scenario"] = "<script>alert('name')</script>"
    summary["bandwidth"]["links"]["<b>cam->gw</b>"] = summary["bandwidth"]["links"].pop("cam->gw")
    (folder / "summary.json").write_text(json.dumps(summary))
    resolved = folder / "scenario.resolved.yaml"
    text = resolved.read_text().replace("name: quickstart", "name: <img src=x onerror=alert(1)>", 1)
    resolved.write_text(text.replace("description: ", "description: <u>described</u> ", 1))
    page = write_report(folder).read_text()
    for raw in ("<script>", "<img src=x", "<b>cam", "<u>", "<i>run"):
        assert raw not in page
    assert "&lt;script&gt;alert(&#x27;name&#x27;)&lt;/script&gt;" in page
    assert "&lt;b&gt;cam-&gt;gw&lt;/b&gt;" in page and "&lt;u&gt;described&lt;/u&gt;" in page
    assert "&lt;i&gt;run" in page
    assert _alts(page) == ["latency", "throughput"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (25.272994510896414, "25.27"),
        (0.98, "0.98"),
        (1.0, "1"),
        (566298, "566,298"),
        (12345.678, "12,346"),
        (6.0192e-05, "6.019e-5"),
        (None, "-"),
        (float("nan"), "-"),
        (True, "yes"),
        ({}, "none"),
        ('{"frames/#": 0}', "frames/#: 0"),
        (Interval(25.27299, 24.1234, 26.4321), "25.27 [24.12, 26.43]"),
        (Interval(3.0, float("nan"), float("nan")), "3"),
    ],
)
def test_values_are_shown_rounded(value: object, shown: str) -> None:
    assert fmt(value) == shown
