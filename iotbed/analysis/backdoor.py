"""The `backdoor` and `detection` sections of a run's summary: what a backdoored model update did while it
was in service, when the gateways caught it, how long the repair took, and how well STRIP told stamped
frames from clean ones on the frames the gateways really screened.

Times are simulated seconds. "Live" means served by the edge: a stamped frame classified by the
backdoored version as the attacker's target is a frame the backdoor won.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from iotbed.analysis.detection import FRR_PRESETS, detection_report
from iotbed.naming import repaired_version
from iotbed.sim.trace import ModelEvent


def _first(events: list[ModelEvent], kind: str, version: int, node_prefix: str | None = None) -> float | None:
    times = [
        e.time_s
        for e in events
        if e.event == kind and e.version == version and (node_prefix is None or e.node.startswith(node_prefix))
    ]
    return min(times) if times else None


def _share(mask: np.ndarray, hit: np.ndarray) -> float | None:
    return float(hit[mask].mean()) if mask.any() else None


def _offline(
    model: torch.nn.Module | None, images: torch.Tensor, labels: torch.Tensor, trigger: Any, target: int
) -> dict[str, Any] | None:
    if model is None:
        return None
    from iotbed.attacks.backdoor import backdoor_metrics
    from iotbed.data.dataset import ImageDataset

    classes = tuple(str(c) for c in range(int(labels.max()) + 1))
    ds = ImageDataset("test", images, labels, classes, "the cameras' test split")
    return backdoor_metrics(model, ds, trigger, target).as_dict()


def backdoor_sections(
    trace: pa.Table, events: list[ModelEvent], artefacts: Any, scenario: Any, edges: list[Any], gateways: list[Any]
) -> dict[str, Any]:
    """`{"backdoor": ..., "detection": ...}` for a run with backdoored updates, else `{}`."""
    if not artefacts.backdoors:
        return {}
    attack = trace.column("attack").to_numpy(zero_copy_only=False)
    delivered = trace.column("status").to_numpy(zero_copy_only=False) == "delivered"
    version_col = trace.column("model_version").to_numpy()
    prediction = trace.column("prediction").to_numpy()
    label = trace.column("label").to_numpy()
    captured = trace.column("t_capture").to_numpy()
    labels = torch.from_numpy(artefacts.labels)
    held = {v: m for e in edges for v, m in e.held.items()}
    out: dict[str, Any] = {}
    detection: dict[str, Any] = {}
    for version, bd in artefacts.backdoors.items():
        stamp_labels = [a.label for a in scenario.attacks if a.kind == "trigger" and a.update == bd.update_index]
        shown = _stamped(attack, stamp_labels)  # frames that showed the trigger, delivered or not
        stamped = shown & delivered
        non_target = label != bd.target
        won = stamped & non_target & (prediction == bd.target)
        repair_version = repaired_version(version)
        published = _first(events, "published", version)
        adopted = _first(events, "adopted", version)
        quarantined = _first(events, "quarantined", version)
        repaired = _first(events, "repaired", repair_version)
        repaired_adopted = _first(events, "adopted", repair_version)
        first_stamp = float(captured[shown].min()) if shown.any() else None
        # the backdoor is exposed once the model is in service and the trigger is shown
        exposed = max(adopted, first_stamp) if adopted is not None and first_stamp is not None else None
        in_run = {
            str(v): {
                "stamped_frames": int((stamped & non_target & (version_col == v)).sum()),
                "attack_success_rate": _share(stamped & non_target & (version_col == v), won),
                "clean_accuracy": _share(~shown & delivered & (version_col == v), prediction == label),
            }
            for v in sorted(set(version_col[delivered].tolist()))
        }
        repairs = [r for e in edges for r in e.repairs if r["quarantined_version"] == version]
        images = artefacts.images
        out[str(version)] = {
            "target": bd.target,
            "trigger": bd.trigger.name,
            "published_s": published,
            "published_by": next((e.node for e in events if e.event == "published" and e.version == version), None),
            "adopted_s": adopted,
            "first_stamped_frame_s": first_stamp,
            "quarantined_s": quarantined,
            "time_to_detect_s": quarantined - exposed if quarantined is not None and exposed is not None else None,
            "repaired_published_s": repaired,
            "repaired_adopted_s": repaired_adopted,
            "time_to_repair_s": repaired_adopted - quarantined
            if repaired_adopted is not None and quarantined is not None
            else None,
            "repair": repairs[0] if repairs else None,
            "stamped_frames": int(stamped.sum()),
            "frames_won_by_the_backdoor": int((won & (version_col == version)).sum()),
            "in_run_by_version": in_run,
            "offline": {
                "clean_model": _offline(artefacts.model, images, labels, bd.trigger, bd.target),
                "backdoored": _offline(bd.model, images, labels, bd.trigger, bd.target),
                "repaired": _offline(held.get(repair_version), images, labels, bd.trigger, bd.target),
            },
        }
        detection[str(version)] = _detection(gateways, version, shown)
    screens = [
        {
            "time_s": s.time_s,
            "gateway": s.gateway,
            "version": s.version,
            "frames": s.n_frames,
            "flagged": s.n_flagged,
            "p_value": s.p_value,
            "backdoored": s.backdoored,
            "compute_s": s.compute_s,
        }
        for g in gateways
        for s in g.stats.screens
    ]
    return {"backdoor": out, "detection": {"screens": screens, "by_version": detection}}


def _stamped(attack: np.ndarray, stamp_labels: list[str] | set[str]) -> np.ndarray:
    """Which trace `attack` values include one of the trigger attacks (labels are joined by "+")."""
    labels = set(stamp_labels)
    return np.fromiter((bool(labels.intersection(a.split("+"))) for a in attack), dtype=bool, count=len(attack))


def _detection(gateways: list[Any], version: int, stamped_rows: np.ndarray) -> dict[str, Any] | None:
    """FAR at preset FRRs and AUROC of STRIP on the frames the gateways screened for `version`; thresholds
    from the entropies of the gateway's clean calibration images under that model."""
    from iotbed.defenses.strip import StripDetector

    benign, trojaned = [], []
    calibration = None
    for g in gateways:
        for s in g.stats.screens:
            if s.version != version:
                continue
            stamped = stamped_rows[s.frame_ids]  # a frame's id is its trace row (TraceRecorder.new_frame)
            benign.append(s.entropies[~stamped])
            trojaned.append(s.entropies[stamped])
            if calibration is None:
                model = g.model_for(version)
                if model is not None:
                    detector = StripDetector(
                        model, g.overlays, n_blends=g.settings.n_blends, generator=torch.Generator().manual_seed(0)
                    )
                    calibration = detector.score(g.calibration).numpy()
    ben = np.concatenate(benign) if benign else np.array([])
    tro = np.concatenate(trojaned) if trojaned else np.array([])
    if calibration is None or ben.size == 0 or tro.size == 0:
        return None
    report = detection_report(calibration, ben, tro, FRR_PRESETS, method="quantile")
    return report.as_dict()


def screened_frames(trace: pa.Table, gateways: list[Any], scenario: Any) -> list[dict[str, Any]]:
    """One row per frame a gateway screened (for `strip_screens.csv` and the entropy and ROC plots)."""
    stamped = _stamped(
        trace.column("attack").to_numpy(zero_copy_only=False),
        {a.label for a in scenario.attacks if a.kind == "trigger"},
    )
    rows = []
    for g in gateways:
        for n, s in enumerate(g.stats.screens):
            for frame_id, entropy in zip(s.frame_ids.tolist(), s.entropies.tolist()):
                rows.append(
                    {
                        "screen": n,
                        "time_s": s.time_s,
                        "gateway": s.gateway,
                        "version": s.version,
                        "frame_id": frame_id,
                        "entropy_bits": entropy,
                        "boundary_bits": s.boundary,
                        "stamped": bool(stamped[frame_id]),  # a frame's id is its trace row
                        "screen_backdoored": s.backdoored,
                    }
                )
    return rows
