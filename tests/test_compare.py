"""`iotbed compare` names how the two runtimes carried MQTT and repaired losses: a simulation over the UDP
model against a live run, kernel loss under --netns with both sides' TCP resends, the in-process shaper's
unshaped legs. The live summaries here are the sections `iotbed emulate` writes; the simulated ones come from
real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SCENARIOS

import iotbed
from iotbed.analysis.compare import explain

SHORT = ["duration=4s", "nodes.cameras.0.count=2", "links.0.loss=0.05"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for transport in ("tcp", "udp"):
        folder = tmp_path_factory.mktemp(f"sim-{transport}")
        scenario = iotbed.load_scenario(SCENARIOS / "quickstart.yaml", [*SHORT, f"broker.transport={transport}"])
        iotbed.run(scenario, progress=False, out_dir=folder, force=True)
        out[transport] = folder
    return out


def live(tmp_path: Path, shaping: dict) -> Path:
    folder = tmp_path / "live"
    folder.mkdir()
    summary = {"mode": "emulated", "shaping": shaping, "broker": {"queue_drops": 0}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_a_simulation_over_the_udp_model_is_named_against_live_tcp(simulated, tmp_path) -> None:
    folder = live(tmp_path, {"mode": "in process", "transport": "tcp"})
    udp = explain(simulated["udp"], folder)
    assert any("broker.transport=tcp to compare like with like" in n for n in udp)
    assert not any("like with like" in n for n in explain(simulated["tcp"], folder))
    assert any("through the same TCP model" in n for n in explain(simulated["tcp"], folder))


def test_kernel_loss_names_both_sides_tcp_resends(simulated, tmp_path) -> None:
    sim = json.loads((simulated["tcp"] / "summary.json").read_text())
    resent = sum(sim["tcp"][d]["retransmissions"] for d in ("client_to_broker", "broker_to_client"))
    assert resent > 0  # 5% loss over 4 s of frames
    shaping = {
        "mode": "kernel (network namespaces, veth, tc, nftables)",
        "netem": False,
        "kernel_tcp": {"nodes": {"RetransSegs": 7}, "broker": {"RetransSegs": 5}},
    }
    notes = explain(live(tmp_path, shaping), simulated["tcp"])
    assert any(f"TCP segments resent: 12 live, {resent} simulated." in n for n in notes)
    assert any("nftables" in n for n in notes)
