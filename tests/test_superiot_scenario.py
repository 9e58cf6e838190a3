"""SUPER-IoT in scenarios: pixel-drop cameras, defenses at the edge, compromised cameras and men in the
middle, the trace's attack column, the clean/attacked split with its undefended reference, the sweep's
bandwidth-vs-robustness figure, and pixel-dropped frames through a real Mosquitto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SCENARIOS

import iotbed
from iotbed.attacks.crafting import quantise
from iotbed.attacks.network import AttackWindow, ManInTheMiddle
from iotbed.broker import wire
from iotbed.broker.messages import Publish
from iotbed.codecs.pixel_drop import PixelDropCodec, drop_mask, encoded_size
from iotbed.defenses.pipeline import DefenseChain, build_chain
from iotbed.defenses.superiot import SuperIoT
from iotbed.emulation.runner import emulate
from iotbed.errors import ScenarioError
from iotbed.nodes.payloads import FRAME_HEADER, Frame
from iotbed.runner import prepare
from iotbed.sim.network import Packet

BASE = SCENARIOS / "superiot_cameras.yaml"
SHORT = ["duration=6s"]


def _run(overrides: list[str], tmp_path: Path | None = None) -> iotbed.RunResult:
    scenario = iotbed.load_scenario(BASE, [*SHORT, *overrides])
    return iotbed.run(scenario, tmp_path, progress=False, write=tmp_path is not None)


# --- scenario files --------------------------------------------------------------------------------


def test_defense_and_codec_entries_read_in_their_short_forms() -> None:
    scenario = iotbed.load_scenario(BASE, ["nodes.edge_servers.0.defenses=[{superiot: {recovery: faithful}}, jpeg]"])
    superiot, jpeg = scenario.nodes.edge_servers[0].defenses
    assert (superiot.kind, superiot.recovery, superiot.denoise) == ("superiot", "faithful", "bayes_shrink")
    assert (jpeg.kind, jpeg.quality) == ("jpeg", 75)
    assert scenario.nodes.cameras[0].codec.kind == "pixel_drop"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nodes.edge_servers.0.defenses=[jpg]", "'jpg'"),
        ("attacks.0.cameras=[gw]", "is not a camera group or camera; known: cam"),
        ("attacks=[{kind: mitm, link: [gw, edgee]}]", "did you mean `edge`?"),
        ("attacks=[{kind: mitm, link: [cam, edge]}]", "there is no link between 'cam' and 'edge'"),
        ("attacks.0.method=deepfool", None),  # valid: deepfool, oblivious
        ("attacks.0.adaptive=true", None),
        (
            "attacks=[{kind: compromised_camera, cameras: [cam], method: cw_l2, adaptive: true}]",
            "adaptive attacks use gradients",
        ),
        ("nodes.cameras.0.codec.rate=1.5", "nodes.cameras.0.codec.pixel_drop.rate"),
    ],
)
def test_attack_and_defense_mistakes_name_the_fix(override: str, message: str | None) -> None:
    if message is None:
        iotbed.load_scenario(BASE, [override])
        return
    with pytest.raises(ScenarioError) as caught:
        iotbed.load_scenario(BASE, [override])
    assert message in str(caught.value)
    assert "superiot_cameras.yaml" in str(caught.value)


def test_cli_refuses_a_bad_attack_with_exit_code_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "iotbed.cli", "validate", str(BASE), "--set", "attacks.0.cameras=[cam-9]"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert "cam-9" in done.stderr and "Traceback" not in done.stderr


# --- the codec on the wire -------------------------------------------------------------------------


def test_pixel_drop_shrinks_every_frame_on_every_link() -> None:
    raw = _run(["nodes.cameras.0.codec={kind: raw}", "attacks=[]", "nodes.edge_servers.0.defenses=[]"]).summary
    dropped = _run(["nodes.cameras.0.codec.rate=0.25", "attacks=[]"]).summary
    shape = (1, 32, 32)
    assert dropped["codecs"]["cam"]["payload_bytes"] == FRAME_HEADER.size + encoded_size(shape, 8, 0.25, "seed")
    assert raw["codecs"]["cam"]["payload_bytes"] == FRAME_HEADER.size + 32 * 32
    assert dropped["codecs"]["cam"]["real_rate"] == pytest.approx(16 / 64)
    assert dropped["codecs"]["cam"]["nominal_rate"] == 0.25
    for group, stats in raw["bandwidth"]["links"].items():
        # Changed for TCP, the default transport (was: the directions with over 10 KB): the directions toward
        # the edge carry the frames; the reverse ones carry acknowledgements, which pixel drop does not shrink,
        # and over TCP (a 56-B PUBACK segment per frame) they pass 10 KB here too.
        if group in ("cam->gw", "gw->edge"):
            assert dropped["bandwidth"]["links"][group]["bytes"] < 0.85 * stats["bytes"], group
    assert dropped["bandwidth"]["per_camera_kbps"] < 0.85 * raw["bandwidth"]["per_camera_kbps"]
    # the defense costs edge compute, charged from its operation count
    assert dropped["defenses"]["edge-0"]["defense_flops_per_image"] > 0
    assert raw["defenses"]["edge-0"]["defense_flops_per_image"] == 0
    # SUPER-IoT recovers dropped frames well enough to keep clean accuracy near the bare model's
    assert dropped["accuracy"]["clean"] >= raw["accuracy"]["clean"] - 0.05


def test_without_recovery_the_model_sees_the_holes() -> None:
    kept = _run(["nodes.cameras.0.codec.rate=0.5", "attacks=[]"]).summary
    holes = _run(["nodes.cameras.0.codec.rate=0.5", "attacks=[]", "nodes.edge_servers.0.defenses=[]"]).summary
    assert holes["accuracy"]["clean"] < kept["accuracy"]["clean"]


# --- attackers in the system -----------------------------------------------------------------------


def test_compromised_camera_attacks_inside_its_window_and_the_split_reports_it() -> None:
    result = _run(
        [
            "attacks.0.method=fgsm",
            "attacks.0.eps=0.3",
            "attacks.0.start=2s",
            "attacks.0.stop=4s",
            "attacks.0.fraction=1.0",
            "attacks.0.cameras=[cam-0, cam-1]",
        ]
    )
    trace, summary = result.trace, result.summary
    attacked = trace.attack == "compromised_camera-fgsm"
    inside = trace.camera.isin(["cam-0", "cam-1"]) & (trace.t_capture >= 2.0) & (trace.t_capture < 4.0)
    assert attacked.sum() > 0
    assert (attacked == inside).all()
    acc = summary["accuracy"]
    assert acc["attacked"] < acc["clean"] - 0.3  # eps 0.3 FGSM on digits
    entry = acc["by_attack"]["compromised_camera-fgsm"]
    assert entry["frames"] == int(attacked.sum())
    assert summary["attacks"]["compromised_camera-fgsm"]["frames_attacked"] == int(attacked.sum())


def test_undefended_reference_is_the_bare_model_on_the_oblivious_images() -> None:
    scenario = iotbed.load_scenario(BASE, [*SHORT, "attacks.0.method=fgsm", "attacks.0.eps=0.2"])
    result = iotbed.run(scenario, progress=False, write=False)
    _, artefacts, _ = prepare(result.scenario, progress=False)
    trace = result.trace[result.trace.status == "delivered"]
    hit = trace[trace.attack != ""]
    adv = torch.from_numpy(artefacts.adversarial["compromised_camera-fgsm"][hit.image_index.to_numpy()])
    with torch.inference_mode():
        bare = artefacts.model(adv).argmax(1).numpy()
    expected = float((bare == hit.label.to_numpy()).mean())
    assert result.summary["accuracy"]["undefended_reference"]["attacked"] == pytest.approx(expected)
    # the adversarial images travel as 8-bit pixels, within the budget
    clean = artefacts.images.numpy()[hit.image_index.to_numpy()]
    assert np.abs(adv.numpy() - clean).max() <= 0.2 + 1e-6
    assert np.allclose(adv.numpy() * 255, np.round(adv.numpy() * 255), atol=1e-4)


def test_man_in_the_middle_changes_only_frames_on_its_link_and_only_kept_pixels() -> None:
    result = _run(["attacks=[{kind: mitm, link: [gw-0, edge], method: fgsm, eps: 0.3}]"])
    trace = result.trace
    attacked = trace.attack == "mitm-fgsm"
    assert attacked.any()
    gw0 = set(trace.camera[attacked])
    # cameras are joined to gateways round robin: cam-0, cam-2, ... use gw-0
    assert gw0 == {f"cam-{i}" for i in range(0, 8, 2)}
    assert not attacked[~trace.camera.isin(gw0)].any()
    summary = result.summary["accuracy"]
    assert summary["attacked"] < summary["clean"]

    # the tamper itself: kept pixels get the perturbation, dropped ones are untouched
    drop = PixelDropCodec(8, 0.25, "seed")
    rng = np.random.default_rng(0)
    clean = (rng.integers(0, 256, (4, 1, 32, 32)) / 255.0).astype(np.float32)
    adversarial = np.clip(clean + 0.1, 0, 1).astype(np.float32)
    window = AttackWindow("mitm", 0.0, 10.0, 1.0, rng, adversarial, clean)
    frame = Frame(0, 0, 0.0, 2, 1, (1, 32, 32), 100, drop=drop, mask_seed=99)
    message = Publish("frames/cam-0", frame, 1)
    ManInTheMiddle(window, lambda: 1.0)(Packet(None, None, 100, message))  # type: ignore[arg-type]
    tampered = message.payload
    mask = frame.drop_mask()
    assert tampered.attack == "mitm" and frame.attack == ""  # a new frame: the sender's copy is not changed
    assert np.array_equal(tampered.pixels[:, ~mask], adversarial[2][:, ~mask])
    assert np.array_equal(tampered.pixels[:, mask], clean[2][:, mask])
    ManInTheMiddle(window, lambda: 1.0)(Packet(None, None, 100, message))  # type: ignore[arg-type]
    assert message.payload is tampered  # a retransmission is not tampered twice


def test_same_seed_same_trace_with_attacks_and_a_random_defense(tmp_path: Path) -> None:
    overrides = [
        "attacks.0.method=fgsm",
        "attacks.0.fraction=0.3",
        "nodes.edge_servers.0.defenses=[superiot, pixel_deflection]",
    ]
    a = _run(overrides).trace
    b = _run(overrides).trace
    assert a.equals(b)
    c = _run([*overrides, "seed=12"]).trace
    assert not a.equals(c)


# --- the pieces ------------------------------------------------------------------------------------


def test_quantise_keeps_the_budget_and_the_8_bit_grid() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), generator=g).float() / 255
    for eps in (0.0, 0.01, 0.1, 0.3):
        adv = (x + eps * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
        q = quantise(adv, x)
        assert (q - x).abs().max() <= eps + 1e-6
        assert torch.allclose(q * 255, torch.round(q * 255), atol=1e-4)
        assert ((q >= 0) & (q <= 1)).all()


def test_chain_recovers_dropped_frames_with_their_masks_and_drops_whole_ones_itself() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 32, 32, generator=g)
    masks = drop_mask(6, 32, 32, 8, 0.25, g)
    dropped = torch.tensor([True, False, True, False, True, True])
    stage = SuperIoT(ws=8, rate=0.25)
    chain = DefenseChain((stage,))
    out = chain.forward(
        x.masked_fill((masks & dropped[:, None, None])[:, None], 0),
        torch.Generator().manual_seed(2),
        masks=masks,
        dropped=dropped,
    )
    expect_dropped = stage.restore(x[dropped].masked_fill(masks[dropped][:, None], 0), masks[dropped])
    assert torch.allclose(out[dropped], expect_dropped)
    expect_whole = stage(x[~dropped], torch.Generator().manual_seed(2))
    assert torch.allclose(out[~dropped], expect_whole)
    assert chain.randomized and not build_chain([]).randomized


def test_pixel_dropped_frames_cross_the_wire_bit_for_bit() -> None:
    for mask_format in ("bitmap", "seed"):
        drop = PixelDropCodec(8, 0.1, mask_format)  # type: ignore[arg-type]
        pixels = np.random.default_rng(3).integers(0, 256, (3, 32, 32)).astype(np.uint8)
        frame = Frame(
            7,
            1,
            0.25,
            5,
            3,
            (3, 32, 32),
            FRAME_HEADER.size + drop.encoded_size((3, 32, 32)),
            drop=drop,
            mask_seed=2**62 + 5,
        )
        data = wire.encode_frame(frame, lambda f, pixels=pixels: pixels)
        assert len(data) == frame.nbytes
        back = wire.decode_frame(data)
        mask = frame.drop_mask()
        assert np.array_equal(back.mask, mask)
        assert np.array_equal(np.rint(back.pixels * 255).astype(np.uint8)[:, ~mask], pixels[:, ~mask])
        assert back.drop == drop
        with pytest.raises(wire.MalformedPayload):
            wire.decode_frame(data[:-1])
    corrupt = bytearray(data)
    corrupt[FRAME_HEADER.size] ^= 0xFF  # the pixel-drop magic
    with pytest.raises(wire.MalformedPayload, match="bad_codec"):
        wire.decode_frame(bytes(corrupt))


def test_adversarial_images_come_from_the_cache_the_second_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iotbed.models.cache import resolve_cache_dir

    # An empty adversarial cache, the trained models shared (so nothing is retrained).
    (tmp_path / "models").symlink_to(resolve_cache_dir(None) / "models", target_is_directory=True)
    monkeypatch.setenv("IOTBED_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "adversarial"
    scenario = iotbed.load_scenario(BASE, [*SHORT, "attacks.0.method=bim", "attacks.0.steps=5", "attacks.0.seed=123"])
    _, first, _ = prepare(scenario, progress=False)
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files  # crafted and stored
    _, second, _ = prepare(scenario, progress=False)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == files  # nothing crafted again
    assert np.array_equal(first.adversarial["compromised_camera-bim"], second.adversarial["compromised_camera-bim"])
    other = iotbed.load_scenario(
        BASE, [*SHORT, "attacks.0.method=bim", "attacks.0.steps=5", "attacks.0.seed=123", "attacks.0.eps=0.05"]
    )
    prepare(other, progress=False)
    assert len(list(folder.glob("*.safetensors"))) > len(files)  # another budget is another entry


# --- sweep and live --------------------------------------------------------------------------------


def test_bandwidth_vs_robustness_sweep_writes_its_table_and_figure(tmp_path: Path) -> None:
    sweep = tmp_path / "bvr.yaml"
    sweep.write_text(
        f"name: bvr\nscenario: {BASE}\nseed: 2\nreplications: 1\n"
        "grid:\n  nodes.cameras.0.codec.rate: [0.1, 0.5]\n  attacks.0.adaptive: [false, true]\n"
        "set:\n  duration: 4s\n  attacks.0.method: fgsm\n  attacks.0.eps: 0.1\n  attacks.0.eot_samples: 2\n"
        "plots: [bandwidth_vs_robustness]\n"
    )
    from iotbed.sweep import run_sweep

    result = run_sweep(sweep, tmp_path / "out", progress=False)
    frame = result.records
    assert (frame.status == "ok").all(), frame.error.tolist()
    by_rate = frame.groupby("param.nodes.cameras.0.codec.rate")["bandwidth.per_camera_kbps"].mean()
    assert by_rate[0.5] < by_rate[0.1]
    assert {"accuracy.attacked", "accuracy.undefended_reference.attacked"} <= set(frame.columns)
    assert (tmp_path / "out" / "bandwidth_vs_robustness.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "sweep.csv").is_file()


def test_pixel_dropped_attacked_frames_through_a_real_broker(plain_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scenario = iotbed.load_scenario(
        BASE, ["duration=4s", "nodes.cameras.0.count=4", "attacks.0.method=fgsm", "attacks.0.eps=0.3"]
    )
    simulated = iotbed.run(scenario, progress=False, write=False).summary
    live = emulate(scenario, plain_broker.url, out_dir=tmp_path / "live", progress=False).summary
    assert live["frames"]["delivered"] == live["frames"]["captured"] == simulated["frames"]["captured"]
    assert live["broker"]["malformed"] == 0
    assert live["codecs"] == simulated["codecs"]
    # Changed for TCP, the default transport (was: equal): both count a frame's PUBLISH, but the live runtime
    # adds 40 B of TCP/IPv4 headers per 1460-B segment (unchanged) and the simulated TCP 52 B per 1448-B
    # segment (Linux with timestamps); these frames take one segment.
    mqtt_bytes = simulated["bandwidth"]["bytes_per_frame_mean"] - 52
    assert live["bandwidth"]["bytes_per_frame_mean"] == pytest.approx(mqtt_bytes + 40)
    assert live["accuracy"]["attacked"] < live["accuracy"]["clean"] - 0.3
    assert live["accuracy"]["by_attack"]["compromised_camera-fgsm"]["frames"] > 0


def test_emulation_refuses_a_man_in_the_middle_it_cannot_place() -> None:
    """A live mitm is a proxy on the loopback interface: kernel-shaped clients in namespaces never reach it."""
    from iotbed.errors import IotbedError

    scenario = iotbed.load_scenario(BASE, ["attacks=[{kind: mitm, link: [gw, edge]}]"])
    with pytest.raises(IotbedError, match="mitm attack is a proxy on the loopback interface"):
        emulate(scenario, "local", netns=True, progress=False, write=False)


def test_model_digest_reads_batchnorm_counters_and_sees_weight_changes() -> None:
    from iotbed.attacks.adaptive import model_digest
    from iotbed.models.architectures import GtsrbCnn

    model = GtsrbCnn(in_channels=3, num_classes=43, image_size=32)  # has 0-dim num_batches_tracked buffers
    before = model_digest(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model_digest(model) != before
