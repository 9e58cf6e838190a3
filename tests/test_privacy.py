"""Encrypted inference: CKKS parameters are checked, the encrypted network computes what the plaintext one
does, ciphertexts are reproducible but never share randomness, hostile bytes are refused, and a simulated
run carries the real ciphertexts' sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from iotbed.errors import ModelError, ScenarioError
from iotbed.models import build_model, get_or_train
from iotbed.privacy.ckks import CkksParams, PublicContext, generate_keys
from iotbed.privacy.encrypted_cnn import MULTIPLICATIONS, EncryptedCnn, evaluation_context
from iotbed.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "scenarios" / "encrypted_inference.yaml"


@pytest.fixture(scope="module")
def trained():
    from iotbed.data import load_splits

    splits = load_splits("digits", seed=0)
    model = get_or_train("he_cnn", splits.train, test_ds=splits.test, progress=False)
    return model, splits.test


@pytest.fixture(scope="module")
def compiled(trained):
    model, _ = trained
    net = EncryptedCnn(model.model, CkksParams())
    return net, generate_keys(net.params, net.rotations, seed=3), evaluation_context(net.params)


def test_default_parameters_are_tutorials_and_pass():
    params = CkksParams()
    assert params.poly_modulus_degree == 8192 and params.depth == MULTIPLICATIONS
    assert params.problems(MULTIPLICATIONS) == []


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        (CkksParams(4096), "raise poly_modulus_degree to 8192"),  # 218 bits > 109 allowed at N=4096
        (CkksParams(8192, (31, 26, 26, 31)), "needs 6 multiplications"),
        (CkksParams(8192, (31, 30, 26, 26, 26, 26, 26, 31)), "must equal global_scale"),
        (CkksParams(8192, (27, 26, 26, 26, 26, 26, 26, 31)), "first prime"),
        (CkksParams(3000), "one of"),
    ],
)
def test_bad_parameters_are_refused_with_the_fix(params, needle):
    problems = " ".join(params.problems(MULTIPLICATIONS))
    assert needle in problems


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["nodes.cameras.0.privacy.poly_modulus_degree=4096"],
            "nodes.cameras.0.privacy: coeff_mod_bit_sizes sum to 218",
        ),
        (["nodes.cameras.0.privacy.coeff_mod_bit_sizes=[31,26,26,31]"], "multiplications"),
        (["model.arch=lenet5"], "he_cnn"),
        (["nodes.cameras.0.codec={kind: pixel_drop}"], "pixel drop saves nothing"),
        (["nodes.edge_servers.0.defenses=[{kind: jpeg}]"], "cannot see their pixels"),
        (["nodes.cameras.0.privacy.global_scale=1000"], "power of two"),
    ],
)
def test_scenario_refuses_what_encrypted_frames_cannot_do(overrides, needle):
    with pytest.raises(ScenarioError) as info:
        load_scenario(SCENARIO, overrides)
    assert needle in str(info.value)


def test_shipped_scenario_validates():
    scenario = load_scenario(SCENARIO)
    assert scenario.nodes.cameras[0].privacy is not None


def test_only_he_cnn_models_compile():
    lenet = build_model("lenet5", in_channels=1, num_classes=10, image_size=32, mean=[0.0], std=[1.0])
    with pytest.raises(ModelError, match="he_cnn"):
        EncryptedCnn(lenet, CkksParams())


def test_encrypted_predictions_agree_with_plaintext(trained, compiled):
    model, test = trained
    net, owner, context = compiled
    images = test.images[:24]
    with torch.inference_mode():
        plain = model.model(images).double().numpy()
    logits = np.stack(
        [
            net.decrypt(owner, net.evaluate(context, owner.public, net.encrypt(owner.public_key, img.numpy(), seed=i)))
            for i, img in enumerate(images)
        ]
    )
    # CKKS at scale 2^26 keeps these logits (magnitudes up to ~40) to within about 2e-2.
    assert np.abs(logits - plain).max() < 0.05
    assert (logits.argmax(1) == plain.argmax(1)).all()


def test_encryption_is_reproducible_and_never_reuses_randomness(compiled):
    net, owner, _ = compiled
    image = np.full((1, 32, 32), 0.5, dtype=np.float32)
    first = net.encrypt(owner.public_key, image, seed=42)
    assert net.encrypt(owner.public_key, image, seed=42) == first  # same seed, same bytes
    assert net.encrypt(owner.public_key, image, seed=43) != first  # each encryption draws fresh noise
    again = generate_keys(net.params, net.rotations, seed=3)
    assert again.public.to_bytes() == owner.public.to_bytes()


def test_galois_keys_cover_only_the_rotations_used(compiled):
    net, owner, _ = compiled
    full_set = 2 * 12  # SEAL's default: every power-of-two step, both ways, for N = 8192
    assert len(net.rotations) < full_set
    assert owner.public.nbytes < 20e6  # TenSEAL's context with every Galois key is ~97 MB


def test_hostile_ciphertexts_are_refused(compiled):
    net, owner, context = compiled
    good = net.encrypt(owner.public_key, np.zeros((1, 32, 32)), seed=1)[0]
    rng = np.random.default_rng(0)
    bad = [b"", b"\x00" * 16, good[:100], good[:-1], good + b"x", rng.bytes(len(good))]
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    bad.append(bytes(flipped))
    result = net.evaluate(context, owner.public, [good])
    bad.append(result)  # a ciphertext at the last level is no fresh input
    for data in bad:
        with pytest.raises(ValueError):
            net.evaluate(context, owner.public, [data])
    with pytest.raises(ValueError):
        net.evaluate(context, owner.public, [good, good])  # one channel only
    with pytest.raises(ValueError):
        net.decrypt(owner, good[:50])


def test_public_context_bounds():
    owner_bytes = b"IK\x01" + (5).to_bytes(4, "big") * 3 + b"x" * 15
    assert PublicContext.from_bytes(owner_bytes, CkksParams(), 1000).public_key == b"xxxxx"
    for data, limit in ((owner_bytes, 10), (owner_bytes[:-1], 1000), (b"IK", 1000), (b"ZZ" + owner_bytes[2:], 1000)):
        with pytest.raises(ValueError):
            PublicContext.from_bytes(data, CkksParams(), limit)


@pytest.mark.slow
def test_simulated_run_carries_real_ciphertexts(monkeypatch):
    from iotbed.nodes.payloads import ENCRYPTED_HEADER
    from iotbed.runner import run

    sizes: list[int] = []
    results: list[int] = []
    encrypt, evaluate = EncryptedCnn.encrypt, EncryptedCnn.evaluate

    def recording_encrypt(self, *args, **kwargs):
        out = encrypt(self, *args, **kwargs)
        sizes.append(ENCRYPTED_HEADER.size + 1 + len("cam-0") + sum(4 + len(c) for c in out))  # and the key owner
        return out

    def recording_evaluate(self, *args, **kwargs):
        out = evaluate(self, *args, **kwargs)
        results.append(ENCRYPTED_HEADER.size + 4 + len(out))
        return out

    overrides = ["duration=12s", "nodes.cameras.0.fps=1"]
    scenario = load_scenario(SCENARIO, overrides)
    first = run(scenario, write=False, progress=False)
    monkeypatch.setattr(EncryptedCnn, "encrypt", recording_encrypt)
    monkeypatch.setattr(EncryptedCnn, "evaluate", recording_evaluate)
    again = run(load_scenario(SCENARIO, overrides), write=False, progress=False)
    trace = again.trace
    assert len(trace) > 10 and trace["encrypted"].all()
    # The camera publishes the bytes SEAL wrote (frames in capture order, results in evaluation order).
    assert sorted(trace["payload_bytes"]) == sorted(sizes[-len(trace) :])
    assert sorted(trace["result_bytes"]) == sorted(results[-len(trace) :])
    assert (trace["payload_bytes"] > 400_000).all()  # a fresh ciphertext at N = 8192, not the 1 KB raw frame
    assert (trace["status"] == "delivered").all()
    privacy = again.summary["privacy"]
    assert privacy["frames_evaluated"] == privacy["results_decrypted"] == len(trace)
    assert privacy["agreement_with_plaintext"] >= 0.99
    # No frame leaves before the camera's context is uploaded: ~11 MB over 20 Mbit/s is over 4 s.
    ready = min(privacy["cameras_ready_s"].values())
    assert ready > 4.0 and (trace["t_first_hop"] > ready).all()
    assert (trace["t_done"] > trace["t_result"]).all() and (trace["t_result"] > trace["t_edge"]).all()
    # Same seed, same run: the ciphertexts themselves are reproducible.
    assert first.trace["payload_bytes"].tolist() == trace["payload_bytes"].tolist()
    assert first.trace["prediction"].tolist() == trace["prediction"].tolist()


def test_encrypted_payloads_round_trip_and_refuse_bad_lengths():
    from iotbed.broker import wire
    from iotbed.nodes.payloads import EncryptedFrame, EncryptedResult

    frame = EncryptedFrame(7, 1, "cam-1", [b"\x5e\xa1abc", b"xyz"])
    data = wire.encode(frame)
    assert len(data) == frame.nbytes
    back = wire.decode("frames/cam-1", data, encrypted=(2, 100))
    assert (back.frame_id, back.key_owner, back.ciphertexts) == (7, "cam-1", frame.ciphertexts)
    result = EncryptedResult(7, 3, b"r" * 50)
    assert wire.decode("privacy/results/cam-1", wire.encode(result), encrypted=(2, 100)) == result
    bad = {
        "truncated": data[:-1],
        "bad_length": data + b"\x00",
        "oversized": wire.encode(EncryptedFrame(7, 1, "cam-1", [b"a" * 101])),
        "bad_header": wire.encode(EncryptedFrame(7, 1, "cam-1", [b"a"] * 3)),  # more ciphertexts than channels
    }
    # a length field claiming 4 GB is refused before anything is allocated
    huge = bytearray(data)
    at = len(data) - len(b"xyz") - 4
    huge[at : at + 4] = (2**32 - 1).to_bytes(4, "big")
    bad["oversized "] = bytes(huge)
    owner = bytearray(data)
    owner[17:22] = b"cam/#"  # a topic wildcard as the key owner would steer the result anywhere
    bad["bad_header "] = bytes(owner)
    for reason, payload in bad.items():
        with pytest.raises(wire.MalformedPayload) as info:
            wire.decode("frames/cam-1", payload, encrypted=(2, 100))
        assert info.value.reason == reason.strip()
    with pytest.raises(wire.MalformedPayload):
        wire.decode("privacy/context/cam-1", b"IK\x01" + b"\xff" * 12, encrypted=(2, 100))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["encrypted", "interactive"])
def test_live_encrypted_run_through_mosquitto_with_acls(mosquitto_binary, tmp_path, mode):
    """The same scenario against a real Mosquitto whose ACLs give each node only its role's topics: a camera
    may upload its context, read its results and (interactive) answer rounds; the edge the other side."""
    import json
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "iotbed.cli", *args], capture_output=True, text=True, timeout=300)

    broker_dir = tmp_path / "broker"
    sets = ["--set", "duration=14s"]
    if mode == "interactive":  # the broker's ACL follows the same overrides as the run
        sets += ["--set", "nodes.cameras.0.privacy.mode=interactive", "--set", "model.arch=he_cnn_relu"]
    assert cli("broker", "start", "--auth", str(SCENARIO), *sets, "--dir", str(broker_dir)).returncode == 0
    try:
        port = json.loads((broker_dir / "broker.json").read_text())["port"]
        out = tmp_path / "live"
        args = ["--broker", f"mqtt://127.0.0.1:{port}", "--credentials", str(broker_dir / "credentials.json")]
        done = cli("emulate", str(SCENARIO), *args, *sets, "--out", str(out), "--quiet")
        assert done.returncode == 0, done.stderr
        summary = json.loads((out / "summary.json").read_text())
    finally:
        cli("broker", "stop", "--dir", str(broker_dir))
    privacy = summary["privacy"]
    assert summary["broker"]["refusals"] == 0 and summary["broker"]["malformed"] == 0
    assert privacy["frames_encrypted"] == summary["frames"]["captured"] > 5
    assert privacy["results_decrypted"] == privacy["frames_encrypted"]
    assert privacy["agreement_with_plaintext"] >= 0.99 and privacy["mode"] == mode
    if mode == "encrypted":
        assert 400_000 < privacy["bytes"]["up_per_frame"] < 600_000
    else:
        assert privacy["round_trips_per_frame"] == 2.0 and privacy["refused_at_edge"] == {}


def test_privacy_cost_figure_draws_plain_and_encrypted_curves(tmp_path):
    """A swept `privacy: null` (NaN in sweep.csv) is a curve of its own, next to the encrypted one."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from iotbed.analysis import plots

    rows = []
    for i, (bandwidth, privacy) in enumerate([(b, p) for b in ("5Mbps", "20Mbps") for p in (None, '{"kind": "ckks"}')]):
        rows.append(
            {
                "point": i,
                "status": "ok",
                "param.links.0.bandwidth": bandwidth,
                "param.nodes.cameras.0.privacy": privacy,
                "latency_ms.p50": 30.0 if privacy is None else 1500.0,
                "throughput.frames_per_s": 1.0,
                "bandwidth.bytes_per_frame_mean": 1118.0 if privacy is None else 490_000.0,
                "accuracy.overall": 1.0,
                "privacy.frames_encrypted": None if privacy is None else 20,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "sweep.csv", index=False)
    assert "privacy_cost" in plots.available(tmp_path)
    drawn = []
    original = plots._errorbar

    def counting(ax, group, x, metric, **style):
        drawn.append((metric, style.get("label")))
        return original(ax, group, x, metric, **style)

    plots._errorbar = counting
    try:
        files = plots.plot("privacy_cost", tmp_path, tmp_path / "figures", ("png",))
    finally:
        plots._errorbar = original
    assert files and files[0].stat().st_size > 0
    labels = {label for metric, label in drawn if metric == "latency_ms.p50"}
    assert labels == {"nodes.cameras.0.privacy=none", "nodes.cameras.0.privacy=kind: ckks"}


@pytest.fixture(scope="module")
def interactive_net():
    from iotbed.data import load_splits
    from iotbed.privacy.interactive import InteractiveCnn

    splits = load_splits("digits", seed=0)
    model = get_or_train("he_cnn_relu", splits.train, test_ds=splits.test, progress=False).model
    net = InteractiveCnn(EncryptedCnn(model, CkksParams()))
    return model, splits.test, net, generate_keys(net.params, net.rotations, seed=4), evaluation_context(net.params)


def test_interactive_rounds_compute_the_relu_network_and_mask_what_the_key_holder_sees(interactive_net):
    from iotbed.privacy.ckks import seal_load
    from iotbed.privacy.interactive import MASK_RANGE

    model, test, net, owner, context = interactive_net
    images = test.images[:10]
    with torch.inference_mode():
        plain = model(images).double().numpy()
        hidden = model.conv(model.normalize(images)).flatten(1).double().numpy()  # before the first ReLU
    rng = np.random.default_rng(1)
    seal = __import__("tenseal.sealapi", fromlist=["sealapi"])
    for i, image in enumerate(images):
        masks = net.draw_masks(rng)
        data = net.encrypt(owner.public_key, image.numpy(), seed=10 + i)
        assert len(data[0]) < 300_000  # three primes, not a full-level ciphertext (~477 KB)
        first = net.stage(context, owner.public, 0, data, masks)
        # What the key holder decrypts is the hidden layer times the mask, never the hidden layer itself.
        ct = seal_load(seal.Ciphertext(), owner.context, first)
        out = seal.Plaintext()
        seal.Decryptor(owner.context, owner.secret_key).decrypt(ct, out)
        seen = np.asarray(seal.CKKSEncoder(owner.context).decode_double(out))[: net.net.windows]
        true = hidden[i, : net.net.windows]
        ratio = seen[np.abs(true) > 0.1] / true[np.abs(true) > 0.1]
        assert MASK_RANGE[0] - 0.01 < ratio.min() and ratio.max() < MASK_RANGE[1] + 0.01
        assert ratio.std() > 0.1  # a different factor per slot
        second = net.stage(context, owner.public, 1, [net.relu_round(owner, first, 0, seed=100 + i)], masks)
        result = net.stage(context, owner.public, 2, [net.relu_round(owner, second, 1, seed=200 + i)], masks)
        logits = net.decrypt(owner, result)
        assert np.abs(logits - plain[i]).max() < 0.1 and logits.argmax() == plain[i].argmax()
    # A reply at the wrong level (a fresh full-level ciphertext) or a step-0 output passed back is refused.
    for wrong in (net.net.encrypt(owner.public_key, images[0].numpy(), seed=5)[0], first):
        with pytest.raises(ValueError):
            net.stage(context, owner.public, 1, [wrong], masks)


@pytest.mark.slow
def test_simulated_interactive_run():
    from iotbed.runner import run

    overrides = [
        "duration=12s",
        "nodes.cameras.0.fps=1",
        "nodes.cameras.0.privacy.mode=interactive",
        "model.arch=he_cnn_relu",
    ]
    result = run(load_scenario(SCENARIO, overrides), write=False, progress=False)
    trace, privacy = result.trace, result.summary["privacy"]
    assert privacy["mode"] == "interactive" and len(trace) > 8
    assert (trace["status"] == "delivered").all() and (trace["round_trips"] == 2).all()
    # each round: the masked layer (one prime left, ~70 KB) and the key holder's fresh reply (~210-280 KB)
    assert (trace["round_bytes"] > 400_000).all()
    assert privacy["agreement_with_plaintext"] >= 0.99 and privacy["refused_at_edge"] == {}
    assert (trace["payload_bytes"] < 300_000).all()


def test_acl_grants_the_encrypted_topics_only_where_cameras_encrypt():
    from iotbed.broker.mosquitto import scenario_extra_rules

    assert scenario_extra_rules(load_scenario(REPO / "scenarios" / "quickstart.yaml")) == {}
    plain = scenario_extra_rules(load_scenario(SCENARIO))
    assert set(plain) == {"cam-0", "cam-1", "edge-0"}
    assert ("write", "privacy/context/{user}") in plain["cam-0"] and ("read", "privacy/rounds/{user}") not in plain[
        "cam-0"
    ]
    assert ("read", "privacy/context/#") in plain["edge-0"] and ("write", "privacy/rounds/#") not in plain["edge-0"]
    interactive = scenario_extra_rules(
        load_scenario(SCENARIO, ["nodes.cameras.0.privacy.mode=interactive", "model.arch=he_cnn_relu"])
    )
    assert ("read", "privacy/rounds/{user}") in interactive["cam-1"]
    assert ("read", "privacy/replies/{user}") in interactive["edge-0"]
