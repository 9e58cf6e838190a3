"""The summary's `privacy` section: what encrypting frames cost and whether the encrypted answers are right."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from iotbed.nodes.encrypted import EncryptingCamera


def _median_ms(values: np.ndarray) -> float | None:
    return float(np.median(values) * 1e3) if len(values) else None


def privacy_section(
    trace: pa.Table,
    cameras: list[Any],
    edges: list[Any],
    he: Any,
    plaintext_predictions: np.ndarray,
    raw_payload_bytes: int,
) -> dict[str, Any]:
    """`plaintext_predictions`: per trace row, the same model's prediction on the image the camera encrypted.
    Counts come from the trace; refusals and readiness from the node objects, which a live run split over
    worker processes does not have in this process (then they are empty)."""
    encrypted = trace.column("encrypted").to_numpy(zero_copy_only=False)
    t = {
        name: trace.column(name).to_numpy()[encrypted]
        for name in ("t_capture", "t_encrypted", "t_edge", "t_result", "t_done")
    }
    done = t["t_done"] >= 0
    payload = trace.column("payload_bytes").to_numpy()[encrypted]
    result = trace.column("result_bytes").to_numpy()[encrypted]
    predicted = trace.column("prediction").to_numpy()[encrypted][done]
    label = trace.column("label").to_numpy()[encrypted][done]
    plain = plaintext_predictions[encrypted][done]
    costs = he.costs
    up = float(payload.mean()) if len(payload) else None
    down = float(result[result > 0].mean()) if (result > 0).any() else None
    refused: dict[str, int] = {}
    for edge in edges:
        if edge.encrypted is not None:
            for reason, n in edge.encrypted.refused.items():
                refused[reason] = refused.get(reason, 0) + n
    sealed = [c for c in cameras if isinstance(c, EncryptingCamera)]
    rounds = trace.column("round_trips").to_numpy()[encrypted]
    round_bytes = trace.column("round_bytes").to_numpy()[encrypted]
    interactive = bool(costs.stage_s)
    return {
        "scheme": "ckks",
        "mode": "interactive" if interactive else "encrypted",
        "activation": "relu (applied by the key holder)" if interactive else "square",
        "params": he.net.params.to_dict(),
        "frames_encrypted": int(encrypted.sum()),
        "frames_evaluated": int((trace.column("t_infer_start").to_numpy()[encrypted] >= 0).sum()),
        "results_decrypted": int(done.sum()),
        "sampled": False,  # every encrypted frame was encrypted, evaluated and decrypted for real
        "refused_at_edge": refused,
        "results_refused_by_cameras": int(sum(c.refused_results for c in sealed)),
        "accuracy_encrypted": float((predicted == label).mean()) if len(predicted) else None,
        "accuracy_plaintext_same_frames": float((plain == label).mean()) if len(plain) else None,
        "agreement_with_plaintext": float((predicted == plain).mean()) if len(plain) else None,
        "bytes": {
            "up_per_frame": up,
            "down_per_frame": down,
            "raw_frame": raw_payload_bytes,
            "expansion_up": up / raw_payload_bytes if up else None,
            "context_per_camera": int(sealed[0].context_bytes) if sealed else None,
            "rounds_per_frame": float(round_bytes[done].mean()) if interactive and done.any() else None,
        },
        "round_trips_per_frame": float(rounds[done].mean()) if interactive and done.any() else None,
        "cameras_ready_s": {c.name: c.ready_at for c in sealed if c.ready_at is not None},
        "latency_ms_p50": {
            "encrypt": _median_ms((t["t_encrypted"] - t["t_capture"])[done]),
            "uplink": _median_ms((t["t_edge"] - t["t_encrypted"])[done]),
            "edge_and_downlink": _median_ms((t["t_result"] - t["t_edge"])[done]),
            "decrypt": _median_ms((t["t_done"] - t["t_result"])[done]),
        },
        "host_costs_s": {
            "encrypt": costs.encrypt_s,
            "evaluate": costs.evaluate_s,
            "decrypt": costs.decrypt_s,
            **({"steps": list(costs.stage_s), "relu_round": costs.relu_round_s} if interactive else {}),
            "host": costs.host,
            "measured_at": costs.measured_at,
            "file": he.cost_file,
        },
        "rotations": len(he.net.rotations),
    }
