"""What encrypted inference costs in device time: measured once on this host, cached, scaled per device.

HE cost does not follow the plaintext FLOP count (it is NTTs and key switching on 64-bit integers), so a
node's simulated time for an encryption, an encrypted evaluation or a decryption is the median of real runs
on this host divided by the device profile's `he_core_speed` (one of its cores running SEAL, against one
core of the host that measured). The measurement is cached beside the models under a key of the model and
the parameters, so a run's simulated times are the same every time it runs on that cache; `rm` the file
(printed in the summary) to measure again.

Every encryption here builds a SEAL context of its own, seeded from the frame's stream (`iotbed.privacy.ckks`:
reproducible runs without shared noise). A device would seed from its own entropy and build no context per
frame, so the measured time of building one is taken off every encryption's cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from iotbed.privacy.ckks import CkksParams, generate_keys, seal_context
from iotbed.privacy.encrypted_cnn import EncryptedCnn, evaluation_context
from iotbed.privacy.interactive import InteractiveCnn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeCosts:
    """Host seconds per image (medians), and the sizes they came with."""

    encrypt_s: float
    evaluate_s: float
    decrypt_s: float
    keygen_s: float
    input_bytes: int  # the ciphertexts of one image
    result_bytes: int
    context_bytes: int  # the public context a key owner uploads
    samples: int
    host: str
    measured_at: str
    stage_s: tuple[float, ...] = ()  # interactive: the edge's seconds for each step
    relu_round_s: float = 0.0  # interactive: the key holder's seconds for one ReLU round
    round_bytes: int = 0  # interactive: both legs of both rounds


def host_cpu() -> str:
    """The host's CPU model, as measurements record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def context_seconds(params: CkksParams, n: int = 5) -> float:
    """The median time to build one seeded SEAL context: the simulation's cost of reproducible encryption."""
    times = []
    for i in range(n):
        start = time.perf_counter()
        seal_context(params, i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(net: EncryptedCnn | InteractiveCnn, images: np.ndarray, samples: int = 3) -> HeCosts:
    """Encrypt, evaluate and decrypt `samples` images for real (after one warm-up) and take the medians."""
    if isinstance(net, InteractiveCnn):
        return _measure_interactive(net, images, samples)
    started = time.perf_counter()
    owner = generate_keys(net.params, net.rotations, seed=0)
    keygen = time.perf_counter() - started
    context = evaluation_context(net.params)
    times: dict[str, list[float]] = {"encrypt": [], "evaluate": [], "decrypt": []}
    sizes = (0, 0)
    for i in range(samples + 1):
        image = images[i % len(images)]
        t0 = time.perf_counter()
        inputs = net.encrypt(owner.public_key, image, seed=i + 1)
        t1 = time.perf_counter()
        result = net.evaluate(context, owner.public, inputs)
        t2 = time.perf_counter()
        net.decrypt(owner, result)
        t3 = time.perf_counter()
        if i:  # the first pass encodes the weight plaintexts and warms caches
            times["encrypt"].append(t1 - t0)
            times["evaluate"].append(t2 - t1)
            times["decrypt"].append(t3 - t2)
        sizes = (sum(len(c) for c in inputs), len(result))
    setup = context_seconds(net.params)
    return HeCosts(
        max(0.0, statistics.median(times["encrypt"]) - setup),
        statistics.median(times["evaluate"]),
        statistics.median(times["decrypt"]),
        keygen,
        sizes[0],
        sizes[1],
        owner.public.nbytes,
        samples,
        host_cpu(),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _measure_interactive(net: InteractiveCnn, images: np.ndarray, samples: int) -> HeCosts:
    started = time.perf_counter()
    owner = generate_keys(net.params, net.rotations, seed=0)
    keygen = time.perf_counter() - started
    context = evaluation_context(net.params)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {k: [] for k in ("encrypt", "s0", "s1", "s2", "relu", "decrypt")}
    sizes = (0, 0, 0)  # the image's ciphertexts, the result, both legs of both rounds
    for i in range(samples + 1):
        masks = net.draw_masks(rng)
        t = [time.perf_counter()]
        data = net.encrypt(owner.public_key, images[i % len(images)], seed=10 * i + 1)
        t.append(time.perf_counter())
        uploaded = sum(len(c) for c in data)
        legs = []
        for step in range(3):
            out = net.stage(context, owner.public, step, data, masks)
            t.append(time.perf_counter())
            if step < 2:
                data = [net.relu_round(owner, out, step, seed=10 * i + 2 + step)]
                legs += [len(out), len(data[0])]
                t.append(time.perf_counter())
        net.decrypt(owner, out)
        t.append(time.perf_counter())
        if i:
            d = np.diff(t)  # encrypt, s0, relu, s1, relu, s2, decrypt
            for key, value in zip(("encrypt", "s0", "relu", "s1", "relu", "s2", "decrypt"), d):
                times[key].append(float(value))
        sizes = (uploaded, len(out), sum(legs))
    stages = tuple(statistics.median(times[k]) for k in ("s0", "s1", "s2"))
    setup = context_seconds(net.params)
    return HeCosts(
        max(0.0, statistics.median(times["encrypt"]) - setup),
        sum(stages),
        statistics.median(times["decrypt"]),
        keygen,
        sizes[0],
        sizes[1],
        owner.public.nbytes,
        samples,
        host_cpu(),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        stages,
        max(0.0, statistics.median(times["relu"]) - setup),
        sizes[2],
    )


def cost_key(model_key: str, params: CkksParams) -> str:
    text = json.dumps(
        {"model": model_key, "params": params.to_dict(), "v": 3}, sort_keys=True
    )  # v: the evaluation code measured
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_costs(
    net: EncryptedCnn | InteractiveCnn, images: np.ndarray, model_key: str, cache_dir: Path
) -> tuple[HeCosts, Path]:
    """The cached measurement for this model and these parameters, or a new one (then cached)."""
    path = cache_dir / "he_costs" / f"{cost_key(model_key, net.params)}.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            stored["stage_s"] = tuple(stored.get("stage_s", ()))
            return HeCosts(**stored), path
        except (OSError, ValueError, TypeError) as exc:
            log.warning("HE cost file %s is unusable (%s); measuring again", path, exc)
    costs = measure(net, images)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(costs), indent=2))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not cache HE costs at %s: %s", path, exc)
    return costs, path
