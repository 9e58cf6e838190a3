"""Scenario schema: the pydantic models of a scenario file and their validators.

A scenario names a dataset and a model, node groups (cameras, gateways, edge servers), the links between
groups, the broker and its QoS per topic, and the model registry. Quantities are written with units
(`10Mbps`, `5ms`, `60s`). Loading, `--set` overrides and error formatting are in `iotbed.scenario.loading`.
"""

from __future__ import annotations

import difflib
import math
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from iotbed.naming import group_of, node_name
from iotbed.units import format_bandwidth, format_duration, parse_bandwidth, parse_duration


class LocatedError(ValueError):
    """A model-wide check's error about one entry: `loc` (e.g. `("faults", 2, "at")`) is where it points,
    relative to the model that raised it, so the message carries that entry's line."""

    def __init__(self, message: str, *loc: str | int) -> None:
        super().__init__(message)
        self.loc = loc


def _finite(parser: Any, kind: str, example: str) -> Any:
    """The unit parser, refusing NaN, infinities (`.inf`, `1e999s`) and negative quantities."""

    def parse(value: Any) -> float:
        try:
            number = parser(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"{kind} {value!r} is not a finite number; write one such as `{example}`")
        if number < 0:
            raise ValueError(f"a {kind} must not be negative, got {value!r}")
        return number

    return parse


def _quantity(parser: Any, formatter: Any, example: str, kind: str) -> Any:
    schema = {"anyOf": [{"type": "string", "examples": [example]}, {"type": "number"}], "description": kind}
    name = kind.split(":")[0].removeprefix("a ")
    return (
        BeforeValidator(_finite(parser, name, example)),
        PlainSerializer(formatter, return_type=str),
        WithJsonSchema(schema),
    )


Duration = Annotated[float, *_quantity(parse_duration, format_duration, "5ms", "a duration: 250us, 5ms, 60s, 2min")]
Bandwidth = Annotated[
    float, *_quantity(parse_bandwidth, format_bandwidth, "10Mbps", "a bandwidth: 500kbps, 10Mbps, 1Gbps")
]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Qos = Literal[0, 1, 2]

SEED_MAX = 2**63 - 1
"""Seeds go to `numpy.random.SeedSequence` (non-negative) and torch's `manual_seed` (64 bits): 0..2**63-1."""


def _seed_range(value: int) -> int:
    if not 0 <= value <= SEED_MAX:
        raise ValueError(f"a seed is a whole number from 0 to 2**63 - 1 ({SEED_MAX}), got {value}")
    return value


Seed = Annotated[int, AfterValidator(_seed_range)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BernoulliLossSpec(Strict):
    model: Literal["bernoulli"] = "bernoulli"
    rate: Probability


class GilbertElliottLossSpec(Strict):
    """Burst loss: Good -> Bad with probability p and Bad -> Good with r, per packet."""

    model: Literal["gilbert_elliott"]
    p: Annotated[float, Field(gt=0.0, le=1.0)]
    r: Annotated[float, Field(gt=0.0, le=1.0)]
    loss_good: Probability = 0.0
    loss_bad: Probability = 1.0


LossSpec = Annotated[BernoulliLossSpec | GilbertElliottLossSpec, Field(discriminator="model")]


def _loss_shorthand(value: Any) -> Any:
    # `loss: 0.01` is the common case: Bernoulli with that rate.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"model": "bernoulli", "rate": value}
    return value


class LinkSpec(Strict):
    """Links between two node groups: each node of the larger group joins one node of the other, round robin."""

    between: tuple[str, str]
    bandwidth: Bandwidth
    latency: Duration = 0.0
    jitter: Duration = 0.0
    loss: Annotated[LossSpec | None, BeforeValidator(_loss_shorthand)] = None
    queue: Annotated[int, Field(ge=1, description="packets the link holds, queued plus in transmission")] = 1000
    shared_medium: bool = Field(
        False, description="all links of this entry that meet at one node share one half-duplex channel (Wi-Fi like)"
    )

    @model_validator(mode="after")
    def _positive(self) -> LinkSpec:
        if self.bandwidth <= 0:
            raise ValueError("bandwidth must be above zero, e.g. `10Mbps`")
        if self.latency < 0 or self.jitter < 0:
            raise ValueError("latency and jitter must not be negative")
        if self.between[0] == self.between[1]:
            raise ValueError("a link joins two different node groups")
        return self


class RawCodecSpec(Strict):
    kind: Literal["raw"] = "raw"


class PixelDropCodecSpec(Strict):
    """SUPER-IoT's drop on the camera: exactly round(window^2 * rate) pixels of every full window x window
    tile are dropped (all channels) and not sent; the mask travels as a bitmap or as the seed it is drawn from."""

    kind: Literal["pixel_drop"]
    rate: Annotated[float, Field(ge=0.0, lt=1.0, description="nominal drop rate; the real one is reported")] = 0.1
    window: Annotated[int, Field(ge=1, le=256)] = 8
    mask: Literal["bitmap", "seed"] = Field(
        "bitmap", description="bitmap: 1 bit per pixel; seed: 8 bytes, same generator both ends"
    )


CodecSpec = Annotated[RawCodecSpec | PixelDropCodecSpec, Field(discriminator="kind")]


def _kind_shorthand(value: Any) -> Any:
    # `- superiot: {recovery: fast}` reads as `- {kind: superiot, recovery: fast}`, and `- jpeg` as `- {kind: jpeg}`.
    if isinstance(value, str):
        return {"kind": value}
    if isinstance(value, dict) and len(value) == 1 and "kind" not in value:
        ((kind, params),) = value.items()
        if params is None:
            params = {}
        if isinstance(params, dict):
            return {"kind": kind, **params}
    return value


class SuperIoTDefenseSpec(Strict):
    """Sparse recovery of the dropped pixels, then BayesShrink wavelet denoising. Frames a pixel-drop camera
    sent are recovered with their own mask; whole frames are dropped here first, at `rate`/`window`."""

    kind: Literal["superiot"]
    recovery: Literal["fast", "faithful"] = "fast"
    denoise: Literal["bayes_shrink", "none"] = "bayes_shrink"
    rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    window: Annotated[int, Field(ge=1, le=256)] = 8


class JpegDefenseSpec(Strict):
    kind: Literal["jpeg"]
    quality: Annotated[int, Field(ge=1, le=95)] = 75


class FeatureSqueezingDefenseSpec(Strict):
    kind: Literal["feature_squeezing"]
    bit_depth: Annotated[int, Field(ge=1, le=8)] = 5
    median_window: Annotated[int | None, Field(ge=1)] = 2


class MedianSmoothingDefenseSpec(Strict):
    kind: Literal["median_smoothing"]
    window: Annotated[int, Field(ge=1)] = 3


class PixelDeflectionDefenseSpec(Strict):
    kind: Literal["pixel_deflection"]
    window: Annotated[int, Field(ge=1)] = 8
    rate: Probability = 0.05
    denoise: Literal["bayes_shrink", "none"] = "bayes_shrink"


class DefedDefenseSpec(Strict):
    """Defed (Xiao et al. 2023): one denoiser per noise level, trained through the edge's model on the training
    split; a frame is flagged when any denoiser's score (cross-entropy of the model on the denoised frame against
    its bare prediction, plus the reconstruction error) is above mean + k std of clean calibration frames, and a
    flagged frame is classified by the flagging denoisers' summed softmax. It decides the label, so it comes
    last among an edge's defenses."""

    kind: Literal["defed"]
    noise_levels: Annotated[
        list[Annotated[int, Field(ge=0, le=255)]],
        Field(min_length=1, max_length=4, description="one denoiser per level, on the 0-255 scale"),
    ] = [20, 40]
    edge: Literal["laplacian", "sobel"] = "laplacian"
    variant: Literal["defed", "basenet"] = Field(
        "defed", description="basenet: the authors' ablation, the same network without edge operators"
    )
    k: Annotated[float, Field(ge=0.0, description="thresholds at mean + k * std of clean calibration scores")] = 2.0
    alpha: Annotated[float, Field(ge=0.0, description="weight of the cross-entropy term, in training and score")] = 1.0
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 256
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    seed: Seed = 0
    calibration: Annotated[int, Field(ge=20, description="held-out clean images the thresholds are fitted on")] = 500
    calibrate_on: Literal["all", "correct"] = Field(
        "all",
        description="correct: only the calibration images the model classifies right, as the authors' benign set",
    )

    @field_validator("noise_levels")
    @classmethod
    def _distinct(cls, levels: list[int]) -> list[int]:
        if len(set(levels)) != len(levels):
            raise ValueError(f"noise levels must differ (got {levels}); a level listed twice is one denoiser")
        return levels


# Defenses that decide the frame's label rather than change the frame: not stages of the input chain.
LABEL_DECIDING_DEFENSES = frozenset({"defed"})

DefenseSpec = Annotated[
    SuperIoTDefenseSpec
    | JpegDefenseSpec
    | FeatureSqueezingDefenseSpec
    | MedianSmoothingDefenseSpec
    | PixelDeflectionDefenseSpec
    | DefedDefenseSpec,
    Field(discriminator="kind"),
    BeforeValidator(_kind_shorthand),
]

EVASION_METHODS = ("fgsm", "bim", "mi_fgsm", "pgd", "cw_l2", "deepfool", "square", "hopskipjump")
GRADIENT_METHODS = ("fgsm", "bim", "mi_fgsm", "pgd")
BLACK_BOX_METHODS = ("square", "hopskipjump")


class AttackSpec(Strict):
    """Adversarial frames in the running system. `compromised_camera`: the named cameras send adversarial
    images. `mitm`: frames crossing `link` (from its first end to its second) have their travelling pixels
    perturbed; for pixel-dropped frames only the kept ones. Adversarial images are crafted on the model the
    edge starts with: against the bare model (oblivious), or through the edge's defenses (adaptive): BPDA,
    plus EOT over their randomness, for input transforms; exact gradients through Defed's denoisers, scores
    and vote. The black-box methods (square, hopskipjump) query the edge's deployed decision, defenses
    included, and never see a gradient."""

    kind: Literal["compromised_camera", "mitm", "trigger"]
    name: str | None = Field(None, description="label in the trace; default `<kind>-<method>`")
    cameras: list[str] = Field(default_factory=list, description="camera groups or nodes (compromised_camera)")
    link: tuple[str, str] | None = Field(None, description="[from, to]: node groups or nodes (mitm)")
    method: Literal["fgsm", "bim", "mi_fgsm", "pgd", "cw_l2", "deepfool", "square", "hopskipjump"] = "pgd"
    eps: Annotated[float, Field(ge=0.0, description="budget (L-inf in [0, 1] pixel units, or L2 with norm: 2)")] = 0.1
    steps: Annotated[int, Field(ge=1)] = 10
    alpha: Annotated[
        float | None, Field(gt=0.0, description="step size; default eps/4 (PGD), eps/10 (BIM, MI-FGSM)")
    ] = None
    norm: Literal["inf", "2"] = "inf"
    adaptive: bool = Field(
        False,
        description="craft through the edge's defenses instead of the bare model: BPDA (and EOT) through input "
        "transforms, exact gradients through Defed (pgd only)",
    )
    detector_aware: bool = Field(
        False,
        description="adaptive pgd against an edge with Defed: frames that are wrong AND unflagged (Carlini and "
        "Wagner's detector-aware loss: the margin plus c times each score's excess over its threshold)",
    )
    queries: Annotated[
        int,
        Field(
            ge=1,
            description="square, hopskipjump: queries of the deployed decision per image. hopskipjump is a "
            "minimum-norm attack: a frame whose result is farther than eps (in `norm`) is sent clean",
        ),
    ] = 1000
    confidence: Annotated[
        float,
        Field(
            ge=0.0,
            description="kappa: the logit margin a wrong class must win by (pgd: Carlini-Wagner's margin loss instead "
            "of cross-entropy; cw_l2: its kappa); high-confidence examples, against a reject option",
        ),
    ] = 0.0
    eot_samples: Annotated[int, Field(ge=1)] = 8
    fraction: Annotated[
        float, Field(gt=0.0, le=1.0, description="share of the frames in the window that are attacked")
    ] = 1.0
    start: Duration = 0.0
    stop: Duration | None = None
    seed: Seed = Field(
        0,
        description="crafting seed (PGD's random start, EOT's draws); like the model, an input kept fixed while the scenario seed varies",
    )
    update: Annotated[
        int, Field(ge=0, description="trigger: the registry update (index) whose trigger the cameras show")
    ] = 0

    @model_validator(mode="after")
    def _shape(self) -> AttackSpec:
        if self.kind in ("compromised_camera", "trigger") and (not self.cameras or self.link is not None):
            raise ValueError(f"{self.kind} needs `cameras:` (groups or nodes) and takes no `link:`")
        if self.kind == "mitm" and (self.link is None or self.cameras):
            raise ValueError("mitm needs `link: [from, to]` and takes no `cameras:`")
        if self.confidence > 0 and (self.method not in ("pgd", "cw_l2") or self.adaptive):
            raise ValueError("confidence (kappa) is for oblivious pgd and cw_l2 attacks")
        if self.adaptive and self.method not in GRADIENT_METHODS:
            hint = (
                " (square and hopskipjump always query the deployed defenses)"
                if self.method in BLACK_BOX_METHODS
                else ""
            )
            raise ValueError(
                f"adaptive attacks use gradients: method must be one of {', '.join(GRADIENT_METHODS)}{hint}"
            )
        if self.detector_aware and not (self.adaptive and self.method == "pgd"):
            raise ValueError("detector_aware is a kind of adaptive pgd: set `adaptive: true` and `method: pgd`")
        if self.norm == "2" and self.method not in ("pgd", "square", "hopskipjump"):
            raise ValueError(
                "norm: 2 is for pgd, square and hopskipjump; the other methods are L-inf (or, cw_l2/deepfool, "
                "minimal L2)"
            )
        if self.stop is not None and self.stop <= self.start:
            raise ValueError("stop must come after start")
        return self

    @property
    def label(self) -> str:
        if self.kind == "trigger":
            return self.name or "trigger"
        return self.name or f"{self.kind}-{self.method}"


ConditionKind = Literal[
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "gaussian_blur",
    "motion_blur",
    "brightness",
    "contrast",
    "jpeg",
    "pixelate",
    "fog",
    "rain",
    "dark",
    "rotate",
    "shear",
    "scale",
    "translate",
]
Severity = Annotated[int, Field(ge=1, le=5)]


class ConditionSpec(Strict):
    """What the cameras see through, from `start` to `stop` (default: the end): a corruption at one of its five
    severities (CIFAR-10-C's, MNIST-C's or iotbed's; `iotbed.data.corruptions`), applied to the captured image
    before the codec. Overlapping entries: the first listed applies.

    `schedule: {60s: 1, 80s: 2, 100s: 3}` in place of `severity` and `start` changes the severity over time:
    each from its time until the next, the last until `stop` (default: the end). The camera group holds it as
    those windows, one entry each, so a resolved scenario lists them."""

    kind: ConditionKind
    severity: Severity = 3
    start: Duration = 0.0
    stop: Duration | None = None
    schedule: dict[Duration, Severity] | None = Field(
        None, exclude=True, description="times to severities, e.g. {60s: 1, 80s: 2}, instead of severity and start"
    )

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_in_order(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            raise ValueError("a schedule maps times to severities, e.g. `{60s: 1, 80s: 2, 100s: 3}`")
        parse = _finite(parse_duration, "duration", "60s")
        steps: dict[float, int] = {}
        previous: tuple[Any, float] | None = None
        for key, severity in value.items():
            try:
                at = parse(key)
            except ValueError as exc:
                raise LocatedError(str(exc), key) from None
            if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
                raise LocatedError(f"the severity at {key} must be a whole number from 1 to 5, got {severity!r}", key)
            if previous is not None and at <= previous[1]:
                relation = "is the same time as" if at == previous[1] else "comes before"
                raise LocatedError(f"schedule times must rise: {key} {relation} {previous[0]}, listed above it", key)
            previous = (key, at)
            steps[at] = severity
        return steps

    @model_validator(mode="after")
    def _window(self) -> ConditionSpec:
        if self.schedule is None:
            if self.stop is not None and self.stop <= self.start:
                raise ValueError("stop must come after start")
            return self
        for field in ("severity", "start"):
            if field in self.model_fields_set:
                raise LocatedError(
                    f"`{field}` and `schedule` do not go together: the schedule gives each severity and its start",
                    field,
                )
        last = max(self.schedule)
        if self.stop is not None and self.stop <= last:
            raise LocatedError(f"stop must come after the schedule's last time, {format_duration(last)}", "stop")
        return self

    def windows(self) -> list[ConditionSpec]:
        """This entry as plain windows: itself, or one per step of its schedule."""
        if self.schedule is None:
            return [self]
        times = list(self.schedule)  # rising: the validator refused any other order
        ends = [*times[1:], self.stop]
        return [
            ConditionSpec(kind=self.kind, severity=self.schedule[t], start=t, stop=end) for t, end in zip(times, ends)
        ]

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.severity}"


def _expand_schedules(conditions: list[ConditionSpec]) -> list[ConditionSpec]:
    return [window for condition in conditions for window in condition.windows()]


class CkksPrivacySpec(Strict):
    """Encrypted frames: the camera encrypts each image under CKKS (its own keys), the edge classifies the
    ciphertext with an `he_cnn` model, and the camera decrypts the result (`iotbed.privacy`). Parameters as
    TenSEAL names them; the defaults are its encrypted-MNIST tutorial's."""

    kind: Literal["ckks"]
    mode: Literal["encrypted", "interactive"] = Field(
        "encrypted",
        description="encrypted: the edge evaluates everything (he_cnn, squares); interactive: the camera "
        "applies each ReLU in a round trip (he_cnn_relu)",
    )
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [31, 26, 26, 26, 26, 26, 26, 31],
        description="bits of each prime: the first keeps the result, the last is for key switching",
    )
    global_scale: Annotated[int, Field(gt=1, description="a power of two, e.g. 67108864 (2**26)")] = 2**26
    device: str = Field("raspberry_pi_4", description="the camera's device profile: prices encryption and decryption")

    @field_validator("global_scale")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"global_scale must be a power of two such as 67108864 (2**26); got {value}")
        return value

    def params(self):  # type: ignore[no-untyped-def]
        from iotbed.privacy.ckks import CkksParams

        return CkksParams(self.poly_modulus_degree, tuple(self.coeff_mod_bit_sizes), self.global_scale.bit_length() - 1)


class CameraGroup(Strict):
    name: str
    count: Annotated[int, Field(ge=1)] = 1
    fps: Annotated[float, Field(gt=0.0)] = 1.0
    arrivals: Literal["periodic", "poisson"] = "periodic"
    codec: CodecSpec = RawCodecSpec()
    topic: str = Field("frames/{name}", description="`{name}` becomes the camera's name, e.g. cam-3")
    start: Duration = 0.0
    conditions: Annotated[list[ConditionSpec], AfterValidator(_expand_schedules)] = Field(
        default_factory=list, description="fog, rain, night, noise, blur... over time"
    )
    privacy: CkksPrivacySpec | None = Field(None, description="send CKKS-encrypted frames (`kind: ckks`)")


def _check_sendable(screen: Any) -> Any:
    """A screen can send with a notice only clean images it holds: at most its calibration images."""
    if screen.send_clean > screen.calibration:
        raise LocatedError(
            f"send_clean ({screen.send_clean}) is more than the {screen.calibration} calibration images the "
            "gateway holds; lower it or raise `calibration`",
            "send_clean",
        )
    return screen


class StripScreenSpec(Strict):
    """The thin device's screen of the model in service (CoDefend's device side): STRIP entropy of the frames
    it relays, boundary at `frr` fitted for the candidate model on clean calibration images, and a
    binomial test of the flagged count at `significance`. Compute time comes from the device profile;
    `max_utilisation` caps the share of the device the screening may take."""

    frames: Annotated[int, Field(ge=10, description="relayed frames per screen")] = 100
    n_blends: Annotated[int, Field(ge=2)] = 100
    frr: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.01
    significance: Annotated[float, Field(gt=0.0, lt=0.5)] = 1e-3
    calibration: Annotated[int, Field(ge=20, description="clean images the boundary is fitted on")] = 400
    max_utilisation: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    send_clean: Annotated[
        int,
        Field(
            ge=0,
            description="CoDefend's own flow: this many of its clean calibration images, with their labels, go "
            "with a quarantine notice as the edge's D_valid (`repair.d_valid: gateways`)",
        ),
    ] = 0

    @model_validator(mode="after")
    def _sendable(self) -> StripScreenSpec:
        return _check_sendable(self)


class SentinetScreenSpec(Strict):
    """SentiNet (Chou et al. 2020) as the thin device's screen, in place of STRIP: each relayed frame's region
    salient only for its predicted class (Grad-CAM) is pasted onto `backgrounds` clean images (fooled rate) and
    filled with noise (confidence); a frame above the envelope of clean points, fitted for the candidate model
    on `calibration` clean images at `frr`, is flagged, and the flagged count is tested at `significance` as
    STRIP's is. Compute comes from the device profile (Grad-CAM's backward passes included)."""

    frames: Annotated[int, Field(ge=10, description="relayed frames per screen")] = 100
    n_pastes: Annotated[int, Field(ge=2, description="backgrounds each frame's region is pasted onto")] = 100
    backgrounds: Annotated[int, Field(ge=10, description="clean images the gateway holds to paste onto")] = 100
    frr: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05
    significance: Annotated[float, Field(gt=0.0, lt=0.5)] = 1e-3
    calibration: Annotated[int, Field(ge=20, description="clean images the boundary is fitted on")] = 400
    max_utilisation: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    send_clean: Annotated[
        int,
        Field(ge=0, description="as `strip.send_clean`: clean labelled images sent with a notice as D_valid"),
    ] = 0

    @model_validator(mode="after")
    def _sendable(self) -> SentinetScreenSpec:
        return _check_sendable(self)


ScreenSpec = StripScreenSpec | SentinetScreenSpec


class GatewayGroup(Strict):
    name: str
    count: Annotated[int, Field(ge=1)] = 1
    device: str = Field(
        "raspberry_pi_4", description="compute profile for on-gateway work (defenses); forwarding is free"
    )
    strip: StripScreenSpec | None = Field(None, description="screen the model in service on relayed frames")
    sentinet: SentinetScreenSpec | None = Field(
        None, description="screen the model in service with SentiNet instead of STRIP"
    )

    @model_validator(mode="after")
    def _one_screen(self) -> GatewayGroup:
        if self.strip is not None and self.sentinet is not None:
            raise LocatedError(
                f"gateway group {self.name!r} has both `strip:` and `sentinet:`; a gateway runs one screen, so keep "
                "one (give another gateway group the other to compare them)",
                "sentinet",
            )
        return self

    @property
    def screen(self) -> ScreenSpec | None:
        """The screen this group runs on relayed frames, if any."""
        return self.strip if self.strip is not None else self.sentinet

    @property
    def screen_kind(self) -> Literal["strip", "sentinet"] | None:
        return "strip" if self.strip is not None else "sentinet" if self.sentinet is not None else None


class BatchSpec(Strict):
    max_size: Annotated[int, Field(ge=1)] = 32
    max_wait: Duration = 0.02


class RouterGroup(Strict):
    """Plain forwarding nodes (switches, a metro point of presence) that join other groups."""

    name: str
    count: Annotated[int, Field(ge=1)] = 1


class CoDefendRepairSpec(Strict):
    """The edge side of CoDefend: on a quarantine it rolls back to the previous model, trains a CycleGAN from
    clean images to the flagged ones, fine-tunes the quarantined model on clean + generated images with the
    true labels, and publishes the repaired model (version + 1000)."""

    clean_images: Annotated[int, Field(ge=20, description="D_valid: clean labelled images the edge holds")] = 500
    epochs: Annotated[int, Field(ge=1)] = 4
    decay_epochs: Annotated[int, Field(ge=0)] = 4
    unlearn_epochs: Annotated[int, Field(ge=1)] = 10
    seed: Seed = 0
    pool_window: Duration = Field(
        60.0,
        description="after a version's first quarantine notice, at most how long the edge gathers the other "
        "screening gateways' notices before repairing once from all of them (it stops waiting when every one has "
        "sent its notice); the edge rolls back at the first notice, so waiting delays only the repair",
    )
    d_poison: Literal["flagged", "flipped"] = Field(
        "flipped",
        description="flagged: every frame the gateways flagged; flipped: only those on which the quarantined model "
        "and the model the edge rolled back to disagree (a frame the backdoor did not flip shows no trigger)",
    )
    filter_generated: bool = Field(
        True,
        description="leave out of the unlearning each generated image that the model rolled back to no longer "
        "labels as its source image (the CycleGAN, trained on a few flagged frames, also warps digits)",
    )
    distill: Annotated[float, Field(ge=0.0)] = Field(
        1.0,
        description="weight of a distillation term while unlearning: the repaired model is also held to the "
        "quarantined model's own answers on the clean images (never on generated ones); 0 is the paper's plain "
        "fine-tuning, which on a thousand images costs clean accuracy",
    )
    d_valid: Literal["edge", "gateways"] = Field(
        "edge",
        description="the clean labelled images the repair learns from: the edge's own `clean_images`, or, as in "
        "CoDefend's own flow, those the gateways send with their notices (`strip.send_clean`)",
    )


class GamblerSpec(Strict):
    """A Deep Gamblers network (Liu et al. 2019): the edge's architecture with an abstain output, trained
    on the training split with the gamblers' loss -log(p_y + p_abstain / reward) after cross-entropy epochs."""

    reward: Annotated[float, Field(gt=1.0, description="o: 1 < o <= classes; lower abstains more")] = 2.2
    epochs: Annotated[int | None, Field(ge=1, description="default: the architecture's training epochs")] = None
    pretrain_epochs: Annotated[int | None, Field(ge=0, description="cross-entropy epochs first")] = None
    seed: Seed = 0


class StripScoreSpec(Strict):
    """STRIP's entropy as a confidence score (`iotbed.defenses.strip`): each frame is superimposed on
    `n_blends` held-out clean images, as STRIP's code adds them, and the mean entropy of the model's
    predictions is its score (low: something in the frame dominates every blend, as a trigger does). Every
    blend is a forward pass the edge is charged for."""

    n_blends: Annotated[int, Field(ge=2, le=100)] = 16


class RejectTargetSpec(Strict):
    coverage: Annotated[float | None, Field(gt=0.0, le=1.0, description="share of frames to accept")] = None
    risk: Annotated[float | None, Field(gt=0.0, lt=1.0, description="error rate allowed on accepted frames")] = None
    confidence: Annotated[float, Field(gt=0.0, lt=1.0, description="with risk: the guarantee's confidence")] = 0.999

    @model_validator(mode="after")
    def _one(self) -> RejectTargetSpec:
        if (self.coverage is None) == (self.risk is None):
            raise ValueError("give a target `coverage:` or a target `risk:` (with its `confidence:`), one of them")
        return self


class RejectSpec(Strict):
    """The reject option (`iotbed.defenses.reject`): the edge abstains on frames whose confidence score is
    below a threshold fitted on `calibration` held-out clean labelled images for the `target`."""

    score: Literal["msp", "margin", "entropy", "gambler", "strip"] = Field(
        "msp",
        description="msp, margin, entropy: of the model's softmax; gambler: 1 - the abstain probability of a "
        "Deep Gamblers network trained beside the model; strip: the STRIP entropy of the frame blended with "
        "clean images (low entropy: a trigger dominates)",
    )
    target: RejectTargetSpec = RejectTargetSpec(coverage=0.9)
    calibration: Annotated[int, Field(ge=20, description="held-out clean labelled images to fit it on")] = 500
    action: Literal["abstain", "escalate"] = Field(
        "abstain",
        description="what happens to a rejected frame: left unserved, or sent on to a clouds or reviewers group",
    )
    to: str | None = Field(
        None, description="escalate: the `clouds:` or `reviewers:` group that resolves rejected frames"
    )
    gambler: GamblerSpec = Field(GamblerSpec(), description="score gambler: how its network is trained")
    strip: StripScoreSpec = Field(StripScoreSpec(), description="score strip: the blends per frame")

    @model_validator(mode="after")
    def _where(self) -> RejectSpec:
        if (self.action == "escalate") != (self.to is not None):
            raise ValueError("`action: escalate` needs `to:` (a clouds or reviewers group); `abstain` takes no `to:`")
        for name in ("gambler", "strip"):
            if name in self.model_fields_set and self.score != name:
                raise ValueError(f"`{name}:` sets up score {name}, but this reject option scores by {self.score}")
        return self


class ServiceTimeSpec(Strict):
    distribution: Literal["fixed", "exponential", "lognormal"] = "lognormal"
    mean: Duration = 10.0
    cv: Annotated[float, Field(gt=0.0, description="lognormal: standard deviation over mean")] = 0.5

    @model_validator(mode="after")
    def _positive(self) -> ServiceTimeSpec:
        if self.mean <= 0:
            raise LocatedError("a review takes some time: give a mean above zero, e.g. `mean: 8s`", "mean")
        return self


class ReviewerGroup(Strict):
    """Human reviewers who resolve the frames edge servers escalate: each desk (node) has `reviewers`
    people taking frames first come, first served (an M/G/c queue), each review taking a `service_time`
    draw; a reviewer names the true label with probability `accuracy`, another label otherwise."""

    name: str
    count: Annotated[int, Field(ge=1, description="review desks, each its own MQTT client")] = 1
    reviewers: Annotated[int, Field(ge=1, description="people at each desk")] = 2
    service_time: ServiceTimeSpec = ServiceTimeSpec()
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] = 0.98


class CloudGroup(Strict):
    """Servers behind a WAN that classify the frames edge servers escalate (the reject option's `escalate`),
    with their own device profile and model (default: the scenario's)."""

    name: str
    count: Annotated[int, Field(ge=1)] = 1
    device: str = "edge_server_8core"
    cores: Annotated[int | None, Field(ge=1)] = None
    batch: BatchSpec = BatchSpec()
    model: ModelSpec | None = Field(
        None, description="the cloud's model; default: the edge's architecture and training"
    )


class EdgeServerGroup(Strict):
    name: str
    count: Annotated[int, Field(ge=1)] = 1
    device: str = "edge_server_8core"
    cores: Annotated[int | None, Field(ge=1, description="overrides the device profile's core count")] = None
    batch: BatchSpec = BatchSpec()
    subscribe: str = Field("$share/edge/frames/#", description="topic filter for frames; shared by default")
    persistent_session: bool = Field(False, description="keep the MQTT session (and queued frames) across disconnects")
    durable_subscription: bool = Field(
        False,
        description="lose no frame across broker restarts: each server keeps a persistent session with non-shared "
        "subscriptions, which Mosquitto restores after a restart (it drops shared ones, and a camera back before "
        "the edge publishes to no subscriber): one server subscribes to `subscribe` without `$share/...`, "
        "several each to their share of the cameras' topics it matches (camera k to server k mod count): frames "
        "are split by camera, not round robin",
    )
    defenses: list[DefenseSpec] = Field(
        default_factory=list, description="input defenses, applied in order before the model"
    )
    repair: CoDefendRepairSpec | None = Field(None, description="repair quarantined model updates (CoDefend)")
    reject: RejectSpec | None = Field(None, description="abstain on frames the model is unsure of")

    @property
    def input_defenses(self) -> list[DefenseSpec]:
        """The defenses that change the frame before the model (all but a detector that decides the label)."""
        return [d for d in self.defenses if d.kind not in LABEL_DECIDING_DEFENSES]

    @property
    def defed(self) -> DefedDefenseSpec | None:
        return next((d for d in self.defenses if isinstance(d, DefedDefenseSpec)), None)


class DeviceSpec(Strict):
    description: str = ""
    cores: Annotated[int, Field(ge=1)]
    gflops_per_core: Annotated[float, Field(gt=0)]
    efficiency: Annotated[float, Field(gt=0, le=1)] = 0.1
    batch_overhead: Duration = 0.0
    sha256_bytes_per_s: Annotated[float, Field(gt=0, description="hashing rate, for checking signed updates")] = 100e6
    ed25519_verify: Duration = Field(0.33e-3, description="one Ed25519 signature verification")
    he_core_speed: Annotated[
        float, Field(gt=0, description="one core on homomorphic encryption, relative to the host that measured it")
    ] = 1.0


class FaultSpec(Strict):
    """`broker_restart`: the broker process dies at `at` and is back `down` later. `node_crash`: the node's
    MQTT client vanishes without a DISCONNECT and reconnects `down` later. `slow_subscriber`: from `at`, for
    `down`, the node reads (and acknowledges) at most `rate` messages a second; the broker's in-flight window
    and queue for it fill, and what overflows `broker.max_queued` is dropped and counted."""

    kind: Literal["broker_restart", "node_crash", "slow_subscriber"]
    at: Duration
    down: Duration = Field(1.0, description="how long the broker or node is down, or the subscriber slow")
    node: str | None = Field(None, description="the node, e.g. edge-0 (node_crash, slow_subscriber)")
    rate: Annotated[float | None, Field(gt=0.0, description="messages/s a slow subscriber reads (slow_subscriber)")] = (
        None
    )

    @model_validator(mode="after")
    def _node(self) -> FaultSpec:
        if (self.kind != "broker_restart") != (self.node is not None):
            raise ValueError(f"{self.kind} needs `node:`" if self.node is None else "broker_restart takes no `node:`")
        if (self.kind == "slow_subscriber") != (self.rate is not None):
            raise ValueError(
                "slow_subscriber needs `rate:` (messages/s it reads), e.g. `rate: 5`"
                if self.rate is None
                else f"{self.kind} takes no `rate:`"
            )
        return self


class NodesSpec(Strict):
    cameras: list[CameraGroup] = Field(default_factory=list)
    gateways: list[GatewayGroup] = Field(default_factory=list)
    routers: list[RouterGroup] = Field(default_factory=list)
    edge_servers: list[EdgeServerGroup] = Field(default_factory=list)
    clouds: list[CloudGroup] = Field(default_factory=list)
    reviewers: list[ReviewerGroup] = Field(default_factory=list)


class BrokerSpec(Strict):
    node: str = Field(
        description="the node group (its first node) or the node name, e.g. edge-0, that hosts the broker"
    )
    protocol: Literal["mqtt311", "mqtt5"] = "mqtt311"
    qos: dict[str, Qos] = Field(
        default_factory=lambda: {"frames/#": 1, "models/#": 1},
        description="QoS per topic filter; the first filter that matches wins, else QoS 0",
    )
    transport: Literal["tcp", "udp"] = Field(
        "tcp",
        description="how simulated links carry MQTT. tcp: a TCP connection per client (Linux's defaults, "
        "iotbed.sim.tcp): TCP repairs a lost segment and delivers in order, and MQTT resends only when a session "
        "resumes, as Mosquitto 2 and paho 2 do. udp: one packet per MQTT packet, as MQTT-SN over UDP: a lost "
        "packet is resent by MQTT after `retry_interval`, up to `max_retries` times (the model before TCP). Live "
        "runs always use real TCP",
    )
    tcp_nodelay: bool = Field(
        False,
        description="turn Nagle's algorithm off on every connection (TCP_NODELAY): simulated over transport tcp, "
        "and live on iotbed's clients and the Mosquitto `--broker local` starts (set_tcp_nodelay). Off by "
        "default, as stock paho-mqtt and Mosquitto leave it: a small message waits while an earlier small one "
        "is unacknowledged",
    )
    retry_interval: Duration = Field(
        1.0,
        description="transport udp: resend an unacknowledged QoS 1/2 message, CONNECT or SUBSCRIBE after this long "
        "(MQTT-SN's T_retry, 10 to 15 s recommended there); the live in-process shaper resends a message it lost "
        "after it too; unused over TCP",
    )
    max_retries: Annotated[
        int | None,
        Field(
            ge=0,
            description="transport udp: give a message up after this many resends (MQTT-SN's N_retry, 3 to 5 "
            "recommended there); none: resend until acknowledged",
        ),
    ] = None
    keepalive: Duration = 60.0
    tcp_ip_overhead: bool = Field(
        True,
        description="count TCP/IPv4 headers: over simulated TCP 52 B per segment of at most 1448 B (timestamps on, "
        "as Linux), ACKs and handshakes included; with transport udp and live, 40 B per 1460-B segment of a message",
    )
    persistence: bool = Field(True, description="sessions, queued messages and retained messages survive a restart")
    max_inflight: Annotated[
        int,
        Field(
            ge=0,
            description="unacknowledged QoS 1/2 messages per sender before the rest "
            "wait (Mosquitto's max_inflight_messages, paho's default); 0: no limit",
        ),
    ] = 20
    max_queued: Annotated[
        int,
        Field(
            ge=0,
            description="QoS 1/2 messages the broker queues per client beyond its "
            "window or while it is away; more are dropped (Mosquitto's max_queued_messages); "
            "0: no limit",
        ),
    ] = 1000

    @model_validator(mode="after")
    def _retries_need_udp(self) -> BrokerSpec:
        if self.max_retries is not None and self.transport != "udp":
            raise ValueError(
                "max_retries applies to transport udp only: over TCP nothing is resent on a live connection; "
                "set `transport: udp` or remove max_retries"
            )
        return self


class TrainSpec(Strict):
    epochs: Annotated[int | None, Field(ge=1)] = None
    batch_size: Annotated[int | None, Field(ge=1)] = None
    lr: Annotated[float | None, Field(gt=0)] = None
    optimizer: Literal["adam", "sgd"] | None = None
    augmentation: Literal["none", "shift"] | None = None
    seed: Seed = Field(
        0, description="training seed; the model is an input of the run, kept fixed while the scenario seed varies"
    )


class DatasetSpec(Strict):
    name: str = "digits"
    path: str | None = None
    split_seed: Seed = Field(0, description="seed of the train/test split (kept fixed while the scenario seed varies)")

    @model_validator(mode="after")
    def _known(self) -> DatasetSpec:
        from iotbed.data import list_datasets

        infos = {info.name: info for info in list_datasets()}
        if self.name not in infos:
            raise ValueError(f"unknown dataset {self.name!r}{_suggest(self.name, infos)}")
        if infos[self.name].needs_path and self.path is None:
            raise ValueError(
                f"dataset {self.name!r} needs `path:`, the folder with {infos[self.name].layout.removeprefix('a folder with ')}"
            )
        return self

    image_size: Annotated[int | None, Field(ge=8)] = None


class ModelSpec(Strict):
    arch: str = "lenet5"
    train: TrainSpec = TrainSpec()

    @model_validator(mode="after")
    def _known(self) -> ModelSpec:
        from iotbed.models import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}{_suggest(self.arch, ARCHITECTURES)}")
        return self


class TriggerSpec(Strict):
    """A backdoor trigger: a square patch in a corner (BadNets), or a full-image noise pattern blended in."""

    kind: Literal["patch", "blended"] = "patch"
    size: Annotated[int, Field(ge=1)] = 3
    corner: Literal["bottom-right", "bottom-left", "top-right", "top-left"] = "bottom-right"
    margin: Annotated[int, Field(ge=0)] = 1
    style: Literal["white", "black", "checkerboard"] = "white"
    alpha: Annotated[float, Field(gt=0.0, le=1.0, description="opacity (blended: the pattern's weight)")] = 1.0
    seed: Seed = Field(0, description="the blended noise pattern's seed")


class BackdoorSpec(Strict):
    """The update is a BadNet: trained on the training split with `ratio` of it stamped with the trigger and
    relabelled `target`. With `triggers:` several triggers aim at the one target (CoDefend's multi-trigger
    experiment): the poisoned images are shared among them in turn. With `source_classes:` the backdoor is
    source-specific (TaCT): only images of those classes are relabelled, and `cover_ratio` of the set, drawn
    from the other classes, is stamped but keeps its true labels, so the trigger flips only the sources."""

    trigger: TriggerSpec | None = Field(None, description="the one trigger; or give `triggers:`")
    triggers: list[TriggerSpec] | None = Field(
        None, description="several triggers to one target; sample i of the poisoned share gets trigger i mod K"
    )
    target: Annotated[int, Field(ge=0)] = 0
    ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    source_classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="only stamped images of these classes flip to the target (a source-specific backdoor)"
    )
    cover_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None,
        description="with `source_classes`: the share of the set stamped from the other classes and kept at its "
        "true label (default: `ratio`)",
    )
    poison_seed: Seed = 0

    @model_validator(mode="after")
    def _shape(self) -> BackdoorSpec:
        if self.trigger is not None and self.triggers is not None:
            raise ValueError("a backdoor takes `trigger:` (one) or `triggers:` (several), not both; drop one")
        if self.trigger is None and self.triggers is None:
            raise ValueError("a backdoor needs `trigger:` (one) or `triggers:` (a list of several); add one")
        if self.triggers is not None and len(self.triggers) < 2:
            raise ValueError("`triggers:` lists two or more triggers; for one, write `trigger:`")
        if self.source_classes is not None:
            if not self.source_classes:
                raise ValueError("`source_classes:` lists at least one class; or drop it for an all-class backdoor")
            if self.target in self.source_classes:
                raise ValueError(
                    f"`source_classes:` must not hold the target class {self.target}: its images already get the "
                    "target label; drop it from the list"
                )
            if len(set(self.source_classes)) != len(self.source_classes):
                raise ValueError(f"`source_classes:` lists a class twice: {self.source_classes}")
        elif self.cover_ratio is not None:
            raise ValueError(
                "`cover_ratio:` goes with `source_classes:` (a source-specific backdoor); drop it or add them"
            )
        return self

    @property
    def all_triggers(self) -> list[TriggerSpec]:
        return [self.trigger] if self.trigger is not None else list(self.triggers or [])

    @property
    def effective_cover_ratio(self) -> float | None:
        """The cover share a source-specific backdoor uses (default: as many cover images as poisoned ones)."""
        if self.source_classes is None:
            return None
        return self.ratio if self.cover_ratio is None else self.cover_ratio


class ModelUpdateSpec(Strict):
    at: Duration
    train: TrainSpec = Field(TrainSpec(), description="how the updated model is trained (e.g. another seed)")
    backdoor: BackdoorSpec | None = Field(None, description="make this update a BadNet (a compromised registry)")
    publisher: str | None = Field(
        None, description="a node that pushes this update instead of the registry (a rogue publisher), e.g. cam-3"
    )
    signed_by: Literal["registry", "self", "none"] | None = Field(
        None,
        description="with `security.signing`: who signs it. Default: the registry's key for the registry's own "
        "updates, none for a rogue publisher's; `self` is a key of the publisher's own, `registry` on a rogue "
        "publisher a stolen registry key",
    )


class UpdateChannelAttackSpec(Strict):
    """An attack on the model-update channel, from a client on `node` (default: the first camera).

    `replay`: sends registry update `update` again, exactly as it was signed. `rollback`: sends the model the
    nodes started with, under a version above every scheduled one, with the metadata it was provisioned
    with. `forged_quarantine`: a quarantine notice for update `update` in the name of `gateway` (default: the
    first screening gateway), unsigned or signed with a key of the attacker's own (`signed_by: self`).
    `freeze`: every message of the registry from `at` to `stop` is held back and delivered at `stop`."""

    kind: Literal["replay", "rollback", "forged_quarantine", "freeze"]
    at: Duration
    stop: Duration | None = Field(None, description="freeze: when the held messages are let through")
    update: Annotated[int, Field(ge=0)] = 0
    node: str | None = None
    gateway: str | None = None
    signed_by: Literal["none", "self"] = "none"

    @model_validator(mode="after")
    def _shape(self) -> UpdateChannelAttackSpec:
        if (self.kind == "freeze") != (self.stop is not None):
            raise ValueError("freeze takes `stop:` (when the held messages go through); the other kinds do not")
        if self.stop is not None and self.stop <= self.at:
            raise ValueError("stop must come after at")
        return self

    @property
    def label(self) -> str:
        return f"{self.kind}@{format_duration(self.at)}"


class SecuritySpec(Strict):
    """Signed model updates and notices (`iotbed.trust`): the registry signs every update with a key the
    devices' pinned root key delegates to; gateways sign their quarantine notices; the repairing edge signs
    its repaired models. Devices refuse what does not verify, and say why in `model_events.csv`."""

    signing: bool = False
    metadata_expiry: Duration = Field(3600.0, description="how long a signed update's metadata is valid")
    refresh_interval: Duration | None = Field(
        None, description="the registry renews the metadata of the version in service this often"
    )
    key_rotations: list[Duration] = Field(
        default_factory=list, description="times the root key hands the registry's role to a new key"
    )
    attacks: list[UpdateChannelAttackSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _positive(self) -> SecuritySpec:
        if self.metadata_expiry <= 0:
            raise ValueError("metadata_expiry must be above 0")
        if self.refresh_interval is not None and not 0 < self.refresh_interval < self.metadata_expiry:
            raise ValueError("refresh_interval must be above 0 and below metadata_expiry, or the metadata lapses")
        return self


class RegistrySpec(Strict):
    node: str | None = Field(None, description="node hosting the model registry; default: the broker's node")
    topic: str = "models/classifier"
    updates: list[ModelUpdateSpec] = Field(default_factory=list)


class Scenario(Strict):
    name: str
    description: str = ""
    seed: Seed = 0
    duration: Duration
    dataset: DatasetSpec = DatasetSpec()
    model: ModelSpec = ModelSpec()
    nodes: NodesSpec
    links: list[LinkSpec] = Field(default_factory=list)
    broker: BrokerSpec
    registry: RegistrySpec = RegistrySpec()
    devices: dict[str, DeviceSpec] = Field(
        default_factory=dict, description="device profiles besides the built-in ones"
    )
    attacks: list[AttackSpec] = Field(default_factory=list)
    monitor_interval: Duration = Field(1.0, description="how often link queues and throughput are sampled")
    faults: list[FaultSpec] = Field(default_factory=list)
    security: SecuritySpec = SecuritySpec()

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        from iotbed.broker.topics import validate_filter, validate_topic
        from iotbed.sim.devices import BUILTIN_PROFILES

        if self.duration <= 0:
            raise LocatedError("duration must be above zero, e.g. `60s`", "duration")
        if self.monitor_interval <= 0:
            raise LocatedError("monitor_interval must be above zero, e.g. `1s`", "monitor_interval")
        groups = self.group_names()
        seen: set[str] = set()
        for kind in ("cameras", "gateways", "routers", "edge_servers", "clouds", "reviewers"):
            for i, group in enumerate(getattr(self.nodes, kind)):
                if group.name in seen:
                    raise LocatedError(
                        f"node group name {group.name!r} is used twice; give each group its own name",
                        "nodes",
                        kind,
                        i,
                        "name",
                    )
                seen.add(group.name)
        for i, link in enumerate(self.links):
            for end in link.between:
                if end not in groups:
                    raise LocatedError(
                        f"link end {end!r} is not a node group{_suggest(end, groups)}", "links", i, "between"
                    )
        for section, named in (("broker", self.broker.node), ("registry", self.registry.node)):
            if named is not None and self.resolve_node(named) is None:
                raise LocatedError(
                    f"broker/registry node {named!r} is not a node group or node{_suggest(named, groups)}",
                    section,
                    "node",
                )
        profiles = set(BUILTIN_PROFILES) | set(self.devices)
        for kind in ("gateways", "edge_servers", "clouds"):
            for i, group in enumerate(getattr(self.nodes, kind)):
                if group.device not in profiles:
                    raise LocatedError(
                        f"device {group.device!r} of group {group.name!r} is unknown{_suggest(group.device, profiles)}",
                        "nodes",
                        kind,
                        i,
                        "device",
                    )
        # nodes that run an MQTT client: gateways without a screen and routers only forward packets
        with_client = {
            g.name for g in [*self.nodes.cameras, *self.nodes.edge_servers, *self.nodes.clouds, *self.nodes.reviewers]
        }
        with_client |= {g.name for g in self.nodes.gateways if g.screen is not None}
        self._check_reachable(with_client | {group_of(self.registry_node())})
        for i, fault in enumerate(self.faults):
            if fault.at >= self.duration:
                raise LocatedError(
                    f"fault {i} ({fault.kind}) comes at {format_duration(fault.at)}, at or after the end of the run "
                    f"(duration: {format_duration(self.duration)}); move it earlier or drop it",
                    "faults",
                    i,
                    "at",
                )
            if fault.node is not None and self.resolve_node(fault.node) != fault.node:
                raise LocatedError(
                    f"fault node {fault.node!r} is not a node; name one like `{self.group_names()[0]}-0`",
                    "faults",
                    i,
                    "node",
                )
            if fault.node is not None and group_of(fault.node) not in with_client:
                raise LocatedError(
                    f"fault node {fault.node!r} runs no MQTT client (gateways without `strip:` and routers "
                    f"only forward packets); name a camera or edge server node",
                    "faults",
                    i,
                    "node",
                )
        checks: list[tuple[Any, str, tuple[str | int, ...]]] = [
            (validate_filter, f, ("broker", "qos", f)) for f in self.broker.qos
        ]
        checks += [
            (validate_topic, c.topic.replace("{name}", f"{c.name}-0"), ("nodes", "cameras", i, "topic"))
            for i, c in enumerate(self.nodes.cameras)
        ]
        checks.append((validate_topic, self.registry.topic, ("registry", "topic")))
        checks += [
            (validate_filter, e.subscribe, ("nodes", "edge_servers", i, "subscribe"))
            for i, e in enumerate(self.nodes.edge_servers)
        ]
        for check, topic, loc in checks:
            try:
                check(topic)
            except ValueError as exc:
                raise LocatedError(str(exc), *loc) from None
        sending = any(g.screen is not None and g.screen.send_clean > 0 for g in self.nodes.gateways)
        for i, edge in enumerate(self.nodes.edge_servers):
            if edge.repair is not None and edge.repair.d_valid == "gateways" and not sending:
                raise LocatedError(
                    "the repair takes D_valid from the gateways, but no screening gateway sends clean images; give "
                    "a gateway group `strip: {send_clean: 100}`, or use `d_valid: edge`",
                    "nodes",
                    "edge_servers",
                    i,
                    "repair",
                    "d_valid",
                )
        resolvers = [g.name for g in [*self.nodes.clouds, *self.nodes.reviewers]]
        for i, edge in enumerate(self.nodes.edge_servers):
            if edge.reject is not None and edge.reject.to is not None and edge.reject.to not in resolvers:
                raise LocatedError(
                    f"edge server group {edge.name!r} escalates to {edge.reject.to!r}, which is not a `clouds:` or "
                    f"`reviewers:` group"
                    f"{_suggest(edge.reject.to, resolvers) if resolvers else '; add one under nodes.clouds or nodes.reviewers'}",
                    "nodes",
                    "edge_servers",
                    i,
                    "reject",
                    "to",
                )
            if sum(d.kind == "superiot" for d in edge.defenses) > 1:
                raise LocatedError(
                    f"edge server group {edge.name!r}: one `superiot` defense at most",
                    "nodes",
                    "edge_servers",
                    i,
                    "defenses",
                )
            defed_at = [j for j, d in enumerate(edge.defenses) if d.kind == "defed"]
            if defed_at and defed_at != [len(edge.defenses) - 1]:
                raise LocatedError(
                    f"edge server group {edge.name!r}: `defed` decides the label, so it must be the last of the "
                    "defenses, and one at most; move it to the end",
                    "nodes",
                    "edge_servers",
                    i,
                    "defenses",
                    defed_at[0],
                )
        self._check_attacks()
        self._check_backdoor_classes()
        self._check_privacy()
        return self

    def _check_backdoor_classes(self) -> None:
        """A backdoor's target and source classes must be classes of the dataset (where it has a fixed number)."""
        from iotbed.data import list_datasets

        num_classes = next((d.num_classes for d in list_datasets() if d.name == self.dataset.name), None)
        if num_classes is None:
            return
        for i, update in enumerate(self.registry.updates):
            backdoor = update.backdoor
            if backdoor is None:
                continue
            where = ("registry", "updates", i, "backdoor")
            if backdoor.target >= num_classes:
                raise LocatedError(
                    f"backdoor target {backdoor.target} is not a class of {self.dataset.name} (0 to {num_classes - 1})",
                    *where,
                    "target",
                )
            outside = [c for c in backdoor.source_classes or [] if c >= num_classes]
            if outside:
                raise LocatedError(
                    f"source classes {outside} are not classes of {self.dataset.name} (0 to {num_classes - 1})",
                    *where,
                    "source_classes",
                )

    def _check_privacy(self) -> None:
        """Encrypted frames need a model the encrypted path can evaluate, parameters that are secure and deep
        enough, and nodes that do not need to see the pixels."""
        from iotbed.privacy.encrypted_cnn import MULTIPLICATIONS
        from iotbed.privacy.interactive import MIN_DEPTH
        from iotbed.sim.devices import BUILTIN_PROFILES

        encrypting = [(i, c) for i, c in enumerate(self.nodes.cameras) if c.privacy is not None]
        if not encrypting:
            return
        for i, camera in encrypting:
            where = ("nodes", "cameras", i, "privacy")
            assert camera.privacy is not None
            depth = MULTIPLICATIONS if camera.privacy.mode == "encrypted" else MIN_DEPTH
            problems = camera.privacy.params().problems(depth)
            if problems:
                raise LocatedError("; ".join(problems), *where)
            if camera.codec.kind != "raw":
                raise LocatedError(
                    f"camera group {camera.name!r} encrypts its frames: a ciphertext has the same size whatever "
                    "pixels are dropped, so pixel drop saves nothing; set `codec: {kind: raw}` or remove `privacy:`",
                    "nodes",
                    "cameras",
                    i,
                    "codec",
                )
            if camera.privacy.device not in set(BUILTIN_PROFILES) | set(self.devices):
                raise LocatedError(
                    f"device {camera.privacy.device!r} is unknown"
                    f"{_suggest(camera.privacy.device, set(BUILTIN_PROFILES) | set(self.devices))}",
                    *where,
                    "device",
                )
        first = encrypting[0][1].privacy
        for i, camera in encrypting[1:]:
            if camera.privacy.params() != first.params() or camera.privacy.mode != first.mode:  # type: ignore[union-attr]
                raise LocatedError(
                    f"camera groups {encrypting[0][1].name!r} and {camera.name!r} use different CKKS parameters or "
                    "modes; the edge evaluates one layout, so give every encrypting group the same `privacy:`",
                    "nodes",
                    "cameras",
                    i,
                    "privacy",
                )
        wanted = "he_cnn" if first.mode == "encrypted" else "he_cnn_relu"  # type: ignore[union-attr]
        if self.model.arch.strip().lower().replace("-", "_") != wanted:
            what = (
                "convolution, square, dense, square, dense"
                if wanted == "he_cnn"
                else "the same with ReLU, which the camera applies in round trips"
            )
            raise LocatedError(
                f"camera group {encrypting[0][1].name!r} sends {first.mode} frames, which only an `{wanted}` model "  # type: ignore[union-attr]
                f"can classify ({what}); set `model: {{arch: {wanted}}}`",
                "model",
                "arch",
            )
        for i, edge in enumerate(self.nodes.edge_servers):
            for field_name, present in (("defenses", bool(edge.defenses)), ("reject", edge.reject is not None)):
                if present:
                    raise LocatedError(
                        f"edge server group {edge.name!r} receives encrypted frames and cannot see their pixels or "
                        f"scores, so `{field_name}:` cannot act; remove it (or the cameras' `privacy:`)",
                        "nodes",
                        "edge_servers",
                        i,
                        field_name,
                    )
        for i, gateway in enumerate(self.nodes.gateways):
            if gateway.screen_kind is not None:
                raise LocatedError(
                    f"gateway group {gateway.name!r} screens relayed frames with {gateway.screen_kind}, but the "
                    f"cameras encrypt them; remove `{gateway.screen_kind}:` (or the cameras' `privacy:`)",
                    "nodes",
                    "gateways",
                    i,
                    gateway.screen_kind,
                )
        if any(a.kind == "mitm" for a in self.attacks):
            raise LocatedError(
                "a man-in-the-middle changes pixels, and encrypted frames carry none it can read; attack the "
                "cameras (`compromised_camera`) or remove the cameras' `privacy:`",
                "attacks",
            )

    def _check_attacks(self) -> None:
        labels: set[str] = set()
        cameras = [g.name for g in self.nodes.cameras]
        for i, attack in enumerate(self.attacks):
            if attack.label in labels:
                raise LocatedError(f"two attacks are called {attack.label!r}; give each its own `name:`", "attacks", i)
            if "+" in attack.label:
                raise LocatedError(
                    f"attack name {attack.label!r}: `+` joins attack names in the trace; use another character",
                    "attacks",
                    i,
                    "name",
                )
            labels.add(attack.label)
            for j, target in enumerate(attack.cameras):
                node = self.resolve_node(target)
                if node is None or group_of(node) not in cameras:
                    raise LocatedError(
                        f"attack {attack.label!r}: {target!r} is not a camera group or camera{_suggest(target, cameras)}",
                        "attacks",
                        i,
                        "cameras",
                        j,
                    )
            if attack.link is not None:
                try:
                    self.attack_link_groups(attack)
                except ValueError as exc:
                    raise LocatedError(str(exc), "attacks", i, "link") from None
            if attack.start >= self.duration:
                raise LocatedError(
                    f"attack {attack.label!r} starts at {format_duration(attack.start)}, at or after the end of the "
                    f"run (duration: {format_duration(self.duration)}); start it earlier or drop it",
                    "attacks",
                    i,
                    "start",
                )
            if attack.kind == "trigger":
                updates = self.registry.updates
                if attack.update >= len(updates) or updates[attack.update].backdoor is None:
                    raise LocatedError(
                        f"attack {attack.label!r}: registry update {attack.update} is not a backdoored "
                        "update; give it `backdoor:` or point `update:` at one",
                        "attacks",
                        i,
                        "update",
                    )
        for i, update in enumerate(self.registry.updates):
            if update.publisher is not None and self.resolve_node(update.publisher) != update.publisher:
                raise LocatedError(
                    f"update publisher {update.publisher!r} is not a node; name one like `{self.group_names()[0]}-0`",
                    "registry",
                    "updates",
                    i,
                    "publisher",
                )
        if self.attacks and not self.nodes.edge_servers:
            raise LocatedError("attacks need an edge server whose model they target", "attacks")
        self._check_update_channel()

    def _check_update_channel(self) -> None:
        security = self.security
        for i, at in enumerate(security.key_rotations):
            if at >= self.duration:
                raise LocatedError(
                    f"key rotation at {format_duration(at)} is at or after the end of the run",
                    "security",
                    "key_rotations",
                    i,
                )
        screening = any(g.screen for g in self.nodes.gateways)
        for i, attack in enumerate(security.attacks):
            where = ("security", "attacks", i)
            if attack.at >= self.duration:
                raise LocatedError(
                    f"{attack.kind} at {format_duration(attack.at)} is at or after the end of the run "
                    f"(duration: {format_duration(self.duration)})",
                    *where,
                    "at",
                )
            if attack.node is not None and self.resolve_node(attack.node) != attack.node:
                raise LocatedError(
                    f"{attack.kind}: {attack.node!r} is not a node; name one like `cam-0`", *where, "node"
                )
            if attack.kind in ("replay", "forged_quarantine") and attack.update >= len(self.registry.updates):
                raise LocatedError(
                    f"{attack.kind}: there is no registry update {attack.update} "
                    f"({len(self.registry.updates)} in `registry.updates`)",
                    *where,
                    "update",
                )
            if attack.kind == "forged_quarantine":
                if attack.gateway is None and not screening:
                    raise LocatedError(
                        "forged_quarantine: name the gateway it impersonates (`gateway:`); no gateway screens here",
                        *where,
                    )
                if attack.gateway is not None and self.resolve_node(attack.gateway) != attack.gateway:
                    raise LocatedError(f"forged_quarantine: {attack.gateway!r} is not a node", *where, "gateway")

    def camera_groups_of(self, attack: AttackSpec) -> list[str]:
        """The camera groups an attack's frames come from: its targets, or (mitm) every camera group."""
        if attack.kind == "mitm":
            return [g.name for g in self.nodes.cameras]
        groups = []
        for target in attack.cameras:
            group = target if target in self.group_counts() else group_of(target)
            if group not in groups:
                groups.append(group)
        return groups

    def attack_link_groups(self, attack: AttackSpec) -> tuple[str, str]:
        """The (from, to) node groups of a mitm attack's link, checked against the `links:` entries."""
        assert attack.link is not None
        ends = []
        for end in attack.link:
            node = self.resolve_node(end)
            if node is None:
                raise ValueError(
                    f"attack {attack.label!r}: link end {end!r} is not a node group or node{_suggest(end, self.group_names())}"
                )
            ends.append(end if end in self.group_counts() else group_of(node))
        if not any(set(link.between) == set(ends) for link in self.links):
            raise ValueError(
                f"attack {attack.label!r}: there is no link between {ends[0]!r} and {ends[1]!r} in `links:`"
            )
        return ends[0], ends[1]

    def group_names(self) -> list[str]:
        n = self.nodes
        return [g.name for g in [*n.cameras, *n.gateways, *n.routers, *n.edge_servers, *n.clouds, *n.reviewers]]

    def group_counts(self) -> dict[str, int]:
        n = self.nodes
        return {
            g.name: g.count for g in [*n.cameras, *n.gateways, *n.routers, *n.edge_servers, *n.clouds, *n.reviewers]
        }

    def resolve_node(self, name: str) -> str | None:
        """A group name means its first node; `group-i` names node i."""
        counts = self.group_counts()
        if name in counts:
            return node_name(name, 0)
        group = group_of(name)
        index = name[len(group) + 1 :]
        # By arithmetic, not by listing the group: a group may have millions of nodes.
        if group in counts and index.isdigit() and node_name(group, int(index)) == name and int(index) < counts[group]:
            return name
        return None

    def _check_reachable(self, with_client: set[str]) -> None:
        """Every group that runs an MQTT client needs a path of links to the broker's group."""
        broker_node = self.resolve_node(self.broker.node)
        assert broker_node is not None  # checked before
        neighbours: dict[str, set[str]] = {}
        for a, b in (link.between for link in self.links):
            neighbours.setdefault(a, set()).add(b)
            neighbours.setdefault(b, set()).add(a)
        reached, frontier = {group_of(broker_node)}, [group_of(broker_node)]
        while frontier:
            for nxt in neighbours.get(frontier.pop(), set()) - reached:
                reached.add(nxt)
                frontier.append(nxt)
        for name in self.group_names():
            if name in with_client and name not in reached:
                raise LocatedError(
                    f"node group {name!r} runs an MQTT client but no link leads from it to the broker's group "
                    f"{group_of(broker_node)!r}; add one, e.g. `- between: [{name}, {group_of(broker_node)}]`",
                    "links",
                )

    def registry_node(self) -> str:
        """The node the model registry publishes from: `registry.node`, else the broker's node."""
        node = self.resolve_node(self.registry.node or self.broker.node)
        assert node is not None  # checked by the validator
        return node

    def qos_for(self, topic: str) -> int:
        from iotbed.broker.topics import matches

        for topic_filter, qos in self.broker.qos.items():
            if matches(topic_filter, topic):
                return qos
        return 0

    def qos_for_filter(self, topic_filter: str) -> int:
        """The QoS a subscriber asks for: that of a topic the filter stands for (`a/+/#` -> `a/_/_`)."""
        from iotbed.broker.topics import split_shared

        _, inner = split_shared(topic_filter)
        return self.qos_for("/".join("_" if level in ("+", "#") else level for level in inner.split("/")))


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean `{close[0]}`?" if close else f"; known: {', '.join(sorted(choices))}"
