"""The defenses an edge server runs before its model, built from the scenario, as one preprocessor.

Each kind of scenario `defenses:` entry is served by one class in `DEFENSES`, which declares its `kind`,
builds itself from its entry (`from_spec`) and prices itself (`flops_per_image`); adding a defense is adding
its class there (and its entry model to the scenario schema). Nothing here names a particular defense.

`DefenseChain` applies its stages in order, each through `Preprocessor.defend_frames`: a stage that recovers
dropped pixels (SUPER-IoT) recovers frames that arrive pixel-dropped with their own masks and drops whole
frames itself first; every other stage sees whole images. The chain is a `Preprocessor`, so
`DefendedModel(chain, model)` is what adaptive attacks (BPDA, EOT) craft against: its estimate is the
composition of the stages' estimates (the identity for all of them).

`flops_per_image` is the compute the simulated edge charges for the chain, the sum of its stages'. The
figures are operation counts of the algorithms as implemented here (multiply-adds counted as 2), not
timings, so they scale with the device profile like the model's FLOPs do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from iotbed.defenses.base import Preprocessor
from iotbed.defenses.baselines import FeatureSqueezing, JpegCompression, MedianSmoothing, PixelDeflection
from iotbed.defenses.superiot import SuperIoT

# The defenses a scenario can put on an edge server, one class per `kind`.
DEFENSES: tuple[type[Preprocessor], ...] = (
    SuperIoT,
    JpegCompression,
    FeatureSqueezing,
    MedianSmoothing,
    PixelDeflection,
)


def _by_kind(classes: Iterable[type[Preprocessor]]) -> Mapping[str, type[Preprocessor]]:
    table: dict[str, type[Preprocessor]] = {}
    for cls in classes:
        if not cls.kind or cls.kind in table:
            raise TypeError(f"{cls.__name__} needs a scenario kind of its own, has {cls.kind!r}")
        table[cls.kind] = cls
    return MappingProxyType(table)


DEFENSE_KINDS = _by_kind(DEFENSES)


def build_stage(spec: Any, *, drop_window: int | None = None, drop_rate: float | None = None) -> Preprocessor:
    """One stage from its scenario entry. `drop_window`/`drop_rate` override a SUPER-IoT stage's own drop
    with the camera codec's, for crafting against what the camera really does."""
    cls = DEFENSE_KINDS.get(spec.kind)
    if cls is None:
        raise ValueError(f"unknown defense kind {spec.kind!r}")
    return cls.from_spec(spec, drop_window=drop_window, drop_rate=drop_rate)


@dataclass(frozen=True)
class DefenseChain(Preprocessor):
    """Stages applied in order; `forward(x, generator, masks=...)` takes per-image drop masks for frames
    that arrived pixel-dropped (`masks` (N, H, W), `dropped` (N,) saying which images have one)."""

    name: ClassVar[str] = "chain"
    stages: tuple[Preprocessor, ...] = ()

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return any(stage.randomized for stage in self.stages)

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        masks: torch.Tensor | None = None,
        dropped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for stage in self.stages:
            x = stage.defend_frames(x, generator, masks=masks, dropped=dropped)
        return x

    def defend_frames(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        masks: torch.Tensor | None = None,
        dropped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward(x, generator, masks=masks, dropped=dropped)

    def estimate_forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage.estimate_forward(x)
        return x

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "stages": [stage.params() for stage in self.stages]}

    def flops_per_image(self, shape: tuple[int, int, int]) -> float:
        return sum(stage.flops_per_image(shape) for stage in self.stages)


def build_chain(
    specs: Sequence[Any], *, drop_window: int | None = None, drop_rate: float | None = None
) -> DefenseChain:
    return DefenseChain(tuple(build_stage(s, drop_window=drop_window, drop_rate=drop_rate) for s in specs))
