"""The `backdoor` and `detection` sections of a run's summary: what a backdoored model update did while it
was in service, when the gateways caught it, how long the repair took, and how well the screens (STRIP, SentiNet) told stamped
frames from clean ones on the frames the gateways really screened.

Times are simulated seconds. "Live" means served by the edge: a stamped frame the backdoor aims at (of a
class other than the target; of a source class for a source-specific backdoor) classified by the
backdoored version as the attacker's target is a frame the backdoor won. Everything comes from the run's
tables; the offline scores and the screens' calibration scores were measured by the runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iotbed.analysis.detection import FRR_PRESETS, detection_report
from iotbed.naming import repaired_version
from iotbed.run_tables import OFFLINE_MODELS, RepairRow, RunTables
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


def _offline(tables: RunTables, version: int, model: str) -> dict[str, Any] | None:
    found = next((o for o in tables.offline if o.version == version and o.model == model), None)
    return found.as_summary() if found is not None else None


def backdoor_sections(tables: RunTables, scenario: Any) -> dict[str, Any]:
    """`{"backdoor": ..., "detection": ...}` for a run with backdoored updates, else `{}`.

    `frames_won_by_the_backdoor` and `in_run_by_version` count only the stamped frames the backdoor is
    meant to win: those of classes other than the target, or, for a source-specific backdoor, those of
    its source classes (its stamped frames of other classes are in `non_source_stamped`). With several
    triggers, `by_trigger` splits the stamped frames by the trigger each showed."""
    if not tables.backdoors:
        return {}
    trace, events = tables.trace, tables.model_events
    attack = trace.column("attack").to_numpy(zero_copy_only=False)
    delivered = trace.column("status").to_numpy(zero_copy_only=False) == "delivered"
    version_col = trace.column("model_version").to_numpy()
    prediction = trace.column("prediction").to_numpy()
    label = trace.column("label").to_numpy()
    captured = trace.column("t_capture").to_numpy()
    image_index = trace.column("image_index").to_numpy()
    out: dict[str, Any] = {}
    by_screen: dict[str, dict[str, Any]] = {}
    kinds = sorted({s.kind for s in tables.screens}, key=lambda kind: kind != "strip")  # STRIP first
    for bd in tables.backdoors:
        version = bd.version
        stamp_labels = [a.label for a in scenario.attacks if a.kind == "trigger" and a.update == bd.update_index]
        shown = _stamped(attack, stamp_labels)  # frames that showed the trigger, delivered or not
        stamped = shown & delivered
        non_target = label != bd.target
        aimed = np.isin(label, bd.source_classes) if bd.source_classes else non_target
        won = stamped & aimed & (prediction == bd.target)
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
                "stamped_frames": int((stamped & aimed & (version_col == v)).sum()),
                "attack_success_rate": _share(stamped & aimed & (version_col == v), won),
                "clean_accuracy": _share(~shown & delivered & (version_col == v), prediction == label),
            }
            for v in sorted(set(version_col[delivered].tolist()))
        }
        repairs = [
            r.as_summary() | _purity(tables, r, shown) for r in tables.repairs if r.quarantined_version == version
        ]
        out[str(version)] = {
            "target": bd.target,
            "trigger": bd.trigger,
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
            "offline": {model: _offline(tables, version, model) for model in OFFLINE_MODELS},
        }
        in_service = stamped & (version_col == version)
        if bd.triggers:
            frame_trigger = np.asarray(bd.frame_triggers, dtype=np.int64)[image_index]
            out[str(version)]["by_trigger"] = _by_trigger(bd.triggers, frame_trigger, stamped, in_service & aimed, won)
        if bd.source_classes:
            off_source = in_service & non_target & ~aimed  # stamped frames it should leave alone
            out[str(version)]["source_classes"] = list(bd.source_classes)
            out[str(version)]["non_source_stamped"] = {
                "frames": int(off_source.sum()),
                "sent_to_target": int((off_source & (prediction == bd.target)).sum()),
                "flip_rate": _share(off_source, prediction == bd.target),
            }
        for kind in kinds:
            if bd.source_classes:
                # The screens' figures count only stamped source frames as trojaned; the other stamped frames
                # are neither benign nor trojaned and are left out.
                report = _detection(tables, version, kind, shown & aimed, ignored=shown & ~aimed)
            else:
                report = _detection(tables, version, kind, shown)
            by_screen.setdefault(kind, {})[str(version)] = report
    screens = [s.as_summary() for s in tables.screens]
    # `by_version` holds STRIP's figures, or those of the one screen the gateways ran.
    detection = by_screen[kinds[0]] if kinds else {str(bd.version): None for bd in tables.backdoors}
    return {"backdoor": out, "detection": {"screens": screens, "by_version": detection, "by_screen": by_screen}}


def _purity(tables: RunTables, repair: RepairRow, shown: np.ndarray) -> dict[str, Any]:
    """From ground truth, the share of the pooled flagged frames and of D_poison that showed the trigger. A
    gateway's notice holds the frames its first screen to find the version backdoored flagged, in the order
    it screened them."""
    flagged: list[int] = []
    for gateway in repair.gateways:
        screen = min(
            (
                s
                for s in tables.screens
                if s.gateway == gateway and s.version == repair.quarantined_version and s.backdoored
            ),
            key=lambda s: s.screen,
            default=None,
        )
        if screen is None:
            return {}
        flagged += [
            f.frame_id
            for f in tables.screened
            if f.gateway == gateway and f.screen == screen.screen and f.score <= screen.boundary
        ]
    if len(flagged) != len(repair.kept):  # the notices and the screens disagree: no purity to give
        return {}
    stamped = shown[np.array(flagged, dtype=np.int64)]
    kept = np.array(repair.kept, dtype=bool)
    return {
        "flagged_purity": _share(np.ones_like(kept), stamped),
        "d_poison_purity": _share(kept, stamped),
    }


def _by_trigger(
    names: tuple[str, ...],
    frame_trigger: np.ndarray,
    stamped: np.ndarray,
    aimed_in_service: np.ndarray,
    won: np.ndarray,
) -> dict[str, dict[str, Any]]:
    """Per trigger of several: the delivered frames that showed it, and, of those the backdoor aims at that the
    backdoored version served, the share it won."""
    out = {}
    for k, name in enumerate(names):
        shows = frame_trigger == k
        out[name] = {
            "stamped_frames": int((stamped & shows).sum()),
            "frames_won_by_the_backdoor": int((won & shows & aimed_in_service).sum()),
            "attack_success_rate_in_service": _share(aimed_in_service & shows, won),
        }
    return out


def _stamped(attack: np.ndarray, stamp_labels: list[str] | set[str]) -> np.ndarray:
    """Which trace `attack` values include one of the trigger attacks (labels are joined by "+")."""
    labels = set(stamp_labels)
    return np.fromiter((bool(labels.intersection(a.split("+"))) for a in attack), dtype=bool, count=len(attack))


def _detection(
    tables: RunTables, version: int, kind: str, stamped_rows: np.ndarray, ignored: np.ndarray | None = None
) -> dict[str, Any] | None:
    """FAR at preset FRRs and AUROC of the `kind` screens on the frames the gateways screened for `version` (but
    the `ignored` trace rows); thresholds from the scores of the first such gateway's clean calibration
    images under that model."""
    screens = {(s.gateway, s.screen) for s in tables.screens if s.version == version and s.kind == kind}
    frames = [f for f in tables.screened if (f.gateway, f.screen) in screens]
    if ignored is not None:
        frames = [f for f in frames if not ignored[f.frame_id]]
    ids = np.array([f.frame_id for f in frames], dtype=np.int64)
    scores = np.array([f.score for f in frames], dtype=np.float64)
    stamped = stamped_rows[ids]  # a frame's id is its trace row (TraceRecorder.new_frame)
    ben, tro = scores[~stamped], scores[stamped]
    calibration = None
    for gateway in dict.fromkeys(s.gateway for s in tables.screens if s.version == version and s.kind == kind):
        found = [c.score for c in tables.calibration if c.gateway == gateway and c.version == version]
        if found:
            calibration = np.array(found, dtype=np.float64)
            break
    if calibration is None or ben.size == 0 or tro.size == 0:
        return None
    report = detection_report(calibration, ben, tro, FRR_PRESETS, method="quantile")
    return report.as_dict()


def screened_frames(tables: RunTables, scenario: Any) -> list[dict[str, Any]]:
    """One row per frame a gateway screened (for `strip_screens.csv` and the entropy and ROC plots)."""
    stamped = _stamped(
        tables.trace.column("attack").to_numpy(zero_copy_only=False),
        {a.label for a in scenario.attacks if a.kind == "trigger"},
    )
    screens = {(s.gateway, s.screen): s for s in tables.screens}
    rows = []
    for f in tables.screened:
        s = screens[(f.gateway, f.screen)]
        rows.append(
            {
                "screen": f.screen,
                "time_s": s.time_s,
                "gateway": f.gateway,
                "version": s.version,
                "frame_id": f.frame_id,
                "kind": s.kind,
                "score": f.score,
                "boundary": s.boundary,
                "stamped": bool(stamped[f.frame_id]),  # a frame's id is its trace row
                "screen_backdoored": s.backdoored,
            }
        )
    return rows
