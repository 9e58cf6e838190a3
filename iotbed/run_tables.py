"""What a run produces, as plain tables: everything `iotbed.analysis` reads.

A runtime turns its nodes into these once the run is over (`iotbed.tabulate`); the models' offline
evaluation and STRIP's calibration scores are computed there too, so analysis needs no node and runs no
model. Rows are frozen dataclasses of numbers and strings (and the link and client rows plain dicts), so a
live worker process sends its share back as it is and the parent concatenates the shares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from iotbed.sim.trace import ModelEvent

# The models evaluated offline for each backdoored update, in the order the summary lists them.
OFFLINE_MODELS = ("clean_model", "backdoored", "repaired")


@dataclass(frozen=True)
class EdgeRow:
    """An edge server's tallies at the end of the run."""

    name: str
    batches: int
    busy_s: float
    model_version: int  # the version it served last
    unknown_frames: int  # frames with an id no camera handed out


@dataclass(frozen=True)
class ReviewerRow:
    """A review desk's tallies at the end of the run."""

    name: str
    reviewers: int
    reviewed: int
    busy_s: float  # reviewer-seconds spent reviewing
    waited_s: float  # summed time frames queued before a reviewer took them
    max_queue: int
    waiting_at_end: int
    unknown_frames: int  # escalations no edge of this run sent: forged or replayed


@dataclass(frozen=True)
class ScreenRow:
    """One screen (STRIP or SentiNet) by a gateway."""

    gateway: str
    screen: int  # its place among the gateway's screens, from 0
    time_s: float
    version: int
    frames: int
    flagged: int
    p_value: float
    backdoored: bool
    compute_s: float
    boundary: float  # a frame is flagged when its score is at or below this
    kind: str = "strip"  # the screen: strip or sentinet

    def as_summary(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "gateway": self.gateway,
            "version": self.version,
            "frames": self.frames,
            "flagged": self.flagged,
            "p_value": self.p_value,
            "backdoored": self.backdoored,
            "compute_s": self.compute_s,
            "kind": self.kind,
        }


@dataclass(frozen=True)
class ScreenedFrame:
    """A frame one screen scored."""

    gateway: str
    screen: int
    frame_id: int  # the frame's trace row
    score: float  # STRIP's entropy in bits, or SentiNet's negated excess: low = trojaned


@dataclass(frozen=True)
class CalibrationScore:
    """The screen's score (as `ScreenedFrame.score`) of one of a gateway's clean calibration images under a
    backdoored version: where the detection report fits its thresholds."""

    gateway: str
    version: int
    score: float


@dataclass(frozen=True)
class RepairRow:
    """A CoDefend repair an edge server published."""

    edge: str
    quarantined_version: int
    version: int
    flagged: int  # frames in the pooled notices
    started_s: float
    published_s: float
    sim_seconds: float
    wall_seconds: float
    flops: float
    gateways: tuple[str, ...] = ()  # whose notices were pooled, in arrival order
    kept: tuple[bool, ...] = ()  # per pooled flagged frame, in that order: whether D_poison took it
    d_valid: int = 0  # clean labelled images the repair learned from
    d_valid_from: str = "edge"  # the edge's own, or the gateways' (sent with their notices)
    d_valid_refused: int = 0  # notices whose clean images the edge refused (wrong shape or labels)
    kept_generated: int = 0  # generated images (D_gen) the unlearning used

    def as_summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["edge"], out["kept"]
        out["gateways"] = list(self.gateways)
        out["d_poison"] = sum(self.kept)
        return out


@dataclass(frozen=True)
class OfflineScore:
    """A model's backdoor metrics on the whole test split, measured after the run."""

    version: int  # the backdoored update whose trigger and target are measured
    model: str  # one of OFFLINE_MODELS
    clean_accuracy: float
    attack_success_rate: float
    robust_accuracy: float
    n_clean: int
    n_triggered: int
    # several triggers: each one's ASR alone on every image the backdoor aims at, by trigger name
    attack_success_rate_by_trigger: dict[str, float] = field(default_factory=dict)
    # source-specific: stamped images of the other non-target classes sent to the target
    non_source_flip_rate: float | None = None
    n_non_source: int = 0

    def as_summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["version"], out["model"]
        if not self.attack_success_rate_by_trigger:
            del out["attack_success_rate_by_trigger"]
        if self.non_source_flip_rate is None:
            del out["non_source_flip_rate"], out["n_non_source"]
        return out


@dataclass(frozen=True)
class BackdoorUpdate:
    """A registry update that is a BadNet."""

    version: int
    update_index: int
    target: int
    trigger: str
    triggers: tuple[str, ...] = ()  # several triggers: their names, in order
    frame_triggers: tuple[int, ...] = ()  # several triggers: which one each test image shows when stamped
    source_classes: tuple[int, ...] = ()  # source-specific: the classes the trigger flips


@dataclass(frozen=True)
class AttackCount:
    """How many frames an attack changed in one process."""

    label: str
    frames_attacked: int


@dataclass
class NodeTables:
    """What the nodes of one process recorded: a whole run's, or one live worker's share of it."""

    edges: list[EdgeRow] = field(default_factory=list)
    reviewers: list[ReviewerRow] = field(default_factory=list)
    model_events: list[ModelEvent] = field(default_factory=list)
    screens: list[ScreenRow] = field(default_factory=list)
    screened: list[ScreenedFrame] = field(default_factory=list)
    calibration: list[CalibrationScore] = field(default_factory=list)
    repairs: list[RepairRow] = field(default_factory=list)
    offline: list[OfflineScore] = field(default_factory=list)
    attacks: list[AttackCount] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)  # one per link direction (links.csv)
    clients: list[dict[str, Any]] = field(default_factory=list)  # live runs: each MQTT client's counters

    @classmethod
    def concat(cls, parts: list[NodeTables]) -> NodeTables:
        return cls(
            **{f.name: [row for part in parts for row in getattr(part, f.name)] for f in dataclasses.fields(cls)}
        )


@dataclass(kw_only=True)
class RunTables(NodeTables):
    """A whole run: its nodes' tables, the trace, the broker's counters and the backdoored updates."""

    trace: pa.Table
    broker: dict[str, Any] = field(default_factory=dict)
    backdoors: list[BackdoorUpdate] = field(default_factory=list)

    @classmethod
    def of(
        cls, nodes: NodeTables, *, trace: pa.Table, broker: dict[str, Any], backdoors: list[BackdoorUpdate]
    ) -> RunTables:
        shared = {f.name: getattr(nodes, f.name) for f in dataclasses.fields(NodeTables)}
        return cls(trace=trace, broker=broker, backdoors=backdoors, **shared)

    def frames_attacked(self, label: str) -> int:
        return sum(a.frames_attacked for a in self.attacks if a.label == label)
