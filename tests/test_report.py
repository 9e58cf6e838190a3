"""Plots and the HTML report, checked the way a user sees them: rendered by headless Chromium."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO, SCENARIOS

import iotbed
from iotbed.analysis.plots import plot
from iotbed.analysis.report import write_report
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
