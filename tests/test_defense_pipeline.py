"""The edge's defense chain built from scenario entries: the stages each kind gives, the compute the simulated
edge charges for them (pinned), the error for an unknown kind, and a chain mixing mask-aware and plain stages."""

from __future__ import annotations

import typing
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from iotbed.codecs.pixel_drop import drop_mask
from iotbed.defenses.base import Preprocessor
from iotbed.defenses.baselines import FeatureSqueezing, JpegCompression, MedianSmoothing, PixelDeflection
from iotbed.defenses.pipeline import DEFENSE_KINDS, DEFENSES, DefenseChain, build_chain, build_stage
from iotbed.defenses.superiot import SuperIoT
from iotbed.scenario.schema import (
    LABEL_DECIDING_DEFENSES,
    DefenseSpec,
    FeatureSqueezingDefenseSpec,
    JpegDefenseSpec,
    MedianSmoothingDefenseSpec,
    PixelDeflectionDefenseSpec,
    SuperIoTDefenseSpec,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS: dict[str, Any] = {
    "superiot": SuperIoTDefenseSpec,
    "jpeg": JpegDefenseSpec,
    "feature_squeezing": FeatureSqueezingDefenseSpec,
    "median_smoothing": MedianSmoothingDefenseSpec,
    "pixel_deflection": PixelDeflectionDefenseSpec,
}

# (kind, entry parameters, build overrides, the stage, FLOPs on 1x28x28, FLOPs on 3x32x32). The figures are
# what the kind/isinstance ladders in pipeline.py gave before each class priced itself; they must not move.
CASES: list[tuple[str, dict[str, Any], dict[str, Any], Preprocessor, float, float]] = [
    ("superiot", {}, {}, SuperIoT(8, 0.1, "fast", "bayes_shrink"), 1869952.0, 9928704.0),
    ("superiot", {"recovery": "faithful"}, {}, SuperIoT(8, 0.1, "faithful", "bayes_shrink"), 22149760.0, 118087680.0),
    ("superiot", {"denoise": "none"}, {}, SuperIoT(8, 0.1, "fast", None), 1838592.0, 9805824.0),
    (
        "superiot",
        {"recovery": "faithful", "denoise": "none", "window": 4, "rate": 0.25},
        {},
        SuperIoT(4, 0.25, "faithful", None),
        10035200.0,
        39321600.0,
    ),
    (
        "superiot",
        {},
        {"drop_window": 4, "drop_rate": 0.3},
        SuperIoT(4, 0.3, "fast", "bayes_shrink"),
        727552.0,
        2850816.0,
    ),
    (
        "superiot",
        {"recovery": "faithful"},
        {"drop_window": 4, "drop_rate": 0.3},
        SuperIoT(4, 0.3, "faithful", "bayes_shrink"),
        12575360.0,
        49274880.0,
    ),
    ("jpeg", {}, {}, JpegCompression(75), 54880.0, 215040.0),
    ("jpeg", {"quality": 30}, {"drop_window": 4, "drop_rate": 0.3}, JpegCompression(30), 54880.0, 215040.0),
    ("feature_squeezing", {}, {}, FeatureSqueezing(5, 2), 7840.0, 30720.0),
    ("feature_squeezing", {"bit_depth": 4, "median_window": None}, {}, FeatureSqueezing(4, None), 1568.0, 6144.0),
    ("feature_squeezing", {"median_window": 1}, {}, FeatureSqueezing(5, 1), 2352.0, 9216.0),
    ("feature_squeezing", {"median_window": 3}, {}, FeatureSqueezing(5, 3), 23934.990810176954, 93786.08643987705),
    ("median_smoothing", {}, {}, MedianSmoothing(3), 22366.990810176954, 87642.08643987705),
    ("median_smoothing", {"window": 1}, {}, MedianSmoothing(1), 784.0, 3072.0),
    ("median_smoothing", {"window": 5}, {}, MedianSmoothing(5), 91019.5813195846, 356648.1553746988),
    ("pixel_deflection", {}, {}, PixelDeflection(8, 0.05, "bayes_shrink"), 31750.0, 124410.0),
    ("pixel_deflection", {"denoise": "none"}, {}, PixelDeflection(8, 0.05, None), 390.0, 1530.0),
    ("pixel_deflection", {"window": 4, "rate": 0.1}, {}, PixelDeflection(4, 0.1, "bayes_shrink"), 32140.0, 125940.0),
]
# The entries above without overrides in one chain, as the ladders priced it.
CHAIN_FLOPS = (36162529.56293994, 178197956.32825446)


def _spec(kind: str, params: dict[str, Any]) -> Any:
    return SPECS[kind](kind=kind, **params)


@pytest.mark.parametrize(("kind", "params", "overrides", "stage", "grey", "rgb"), CASES)
def test_each_kind_builds_its_stage_and_keeps_its_flop_figures(
    kind: str, params: dict[str, Any], overrides: dict[str, Any], stage: Preprocessor, grey: float, rgb: float
) -> None:
    built = build_stage(_spec(kind, params), **overrides)
    assert type(built) is type(stage) and built == stage
    assert built.flops_per_image((1, 28, 28)) == grey
    assert built.flops_per_image((3, 32, 32)) == rgb
    chain = build_chain([_spec(kind, params)], **overrides)
    assert chain.stages == (stage,)
    assert chain.flops_per_image((1, 28, 28)) == grey and chain.flops_per_image((3, 32, 32)) == rgb


def test_a_chain_costs_the_sum_of_its_stages() -> None:
    chain = build_chain([_spec(kind, params) for kind, params, overrides, *_ in CASES if not overrides])
    assert (chain.flops_per_image((1, 28, 28)), chain.flops_per_image((3, 32, 32))) == CHAIN_FLOPS
    assert build_chain([]).flops_per_image((3, 32, 32)) == 0


def test_every_scenario_kind_has_its_class_and_unknown_kinds_fail() -> None:
    union = typing.get_args(typing.get_args(DefenseSpec)[0])
    schema_kinds = {typing.get_args(spec.model_fields["kind"].annotation)[0] for spec in union}
    # Defed decides the label: the runner puts it behind the model, it is no stage of the input chain
    assert LABEL_DECIDING_DEFENSES <= schema_kinds
    assert set(DEFENSE_KINDS) == schema_kinds - LABEL_DECIDING_DEFENSES == {cls.kind for cls in DEFENSES}
    assert all(DEFENSE_KINDS[cls.kind] is cls for cls in DEFENSES)
    with pytest.raises(ValueError, match="unknown defense kind 'defed'"):
        build_stage(SimpleNamespace(kind="defed"))
    with pytest.raises(ValueError, match="unknown defense kind 'chain'"):
        build_chain([_spec("jpeg", {}), SimpleNamespace(kind="chain")])


def test_a_mixed_chain_gives_the_recovery_stage_the_masks_and_the_others_whole_images() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 3, 16, 16, generator=g)
    masks = drop_mask(5, 16, 16, 8, 0.2, g)
    dropped = torch.tensor([True, False, True, True, False])
    frames = x.masked_fill((masks & dropped[:, None, None])[:, None], 0)
    squeeze, recover, smooth = FeatureSqueezing(), SuperIoT(ws=8, rate=0.2), MedianSmoothing()
    chain = DefenseChain((squeeze, recover, smooth))
    out = chain.forward(frames, torch.Generator().manual_seed(5), masks=masks, dropped=dropped)

    mid = squeeze(frames)
    expect = mid.clone()
    expect[dropped] = recover.restore(mid[dropped], masks[dropped])
    expect[~dropped] = recover(mid[~dropped], torch.Generator().manual_seed(5))
    assert torch.equal(out, smooth(expect))
    # without masks every stage sees whole images, the recovery stage dropping them itself
    plain = chain.forward(x, torch.Generator().manual_seed(6))
    assert torch.equal(plain, smooth(recover(squeeze(x), torch.Generator().manual_seed(6))))
    all_dropped = torch.ones(5, dtype=torch.bool)
    out = chain.forward(frames, None, masks=masks, dropped=all_dropped)
    assert torch.equal(out, smooth(recover.restore(squeeze(frames), masks)))
