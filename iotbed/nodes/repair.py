"""The edge side of CoDefend inside a run: real CycleGAN training and unlearning, charged as simulated
compute on the edge's device profile.

The repair runs for real (wall-clock seconds on this machine) and its result is the model the edge
publishes. The simulated time it takes is an operation count divided by the device's sustained rate:
per CycleGAN step and image pair the code runs the two generators six times (two translations, two
reconstructions, two identity mappings) and the discriminators six times (generator and discriminator
losses), and a backward pass costs about twice a forward one; unlearning is the model's forward count
times three for every training image and epoch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from iotbed.data.dataset import ImageDataset
from iotbed.defenses.codefend import DEFAULT_UNLEARN, CycleGanConfig, PatchDiscriminator, ResnetGenerator, edge_repair
from iotbed.models.flops import count_flops
from iotbed.nodes.payloads import Quarantine
from iotbed.sim.devices import DeviceProfile


@dataclass(frozen=True)
class RepairOutcome:
    model: nn.Module
    sim_seconds: float
    wall_seconds: float
    flops: float
    kept_generated: int = 0  # generated images the unlearning used


DPoisonRule = Literal["flagged", "flipped"]
DValidSource = Literal["edge", "gateways"]


def select_d_poison(
    quarantined: nn.Module, rolled_back: nn.Module, flagged: torch.Tensor, rule: DPoisonRule
) -> torch.Tensor:
    """Which flagged frames the CycleGAN learns the trigger from, as a boolean mask. `flipped` keeps the frames
    the quarantined model and the model in service before it label differently: STRIP also flags clean frames
    (genuine images of the target class most easily), and a frame the backdoor did not flip shows no trigger.
    Where no frame is flipped, every flagged frame is kept: the repair needs something to learn from."""
    keep = torch.ones(len(flagged), dtype=torch.bool)
    if rule == "flagged" or len(flagged) == 0:
        return keep
    with torch.inference_mode():
        flipped = quarantined.eval()(flagged).argmax(dim=1) != rolled_back.eval()(flagged).argmax(dim=1)
    return flipped if bool(flipped.any()) else keep


@dataclass(frozen=True)
class CoDefendRepairer:
    clean: ImageDataset  # D_valid, labelled
    cyclegan: CycleGanConfig
    unlearn_epochs: int
    device: DeviceProfile
    cores: int | None = None
    pool_window_s: float = 0.0  # at most how long the edge gathers quarantine notices before repairing
    screening_gateways: int = 1  # the pool closes early once this many gateways have sent a notice
    d_poison: DPoisonRule = "flagged"
    d_valid: DValidSource = "edge"
    filter_generated: bool = False
    distill: float = 0.0  # weight of the distillation term while unlearning (0: plain fine-tuning)

    def gateways_d_valid(self, notices: Sequence[Quarantine]) -> tuple[ImageDataset | None, int]:
        """CoDefend's own flow: the clean labelled images the gateways sent with their notices, as D_valid;
        (None, refused) where none came. A notice whose images do not match the edge's or whose labels are
        not classes of the model is refused (counted), not trusted."""
        shape = tuple(self.clean.images.shape[1:])
        classes = len(self.clean.classes)
        images, labels, refused = [], [], 0
        for notice in notices:
            if notice.valid is None or notice.valid_labels is None or not len(notice.valid):
                continue
            if tuple(notice.valid.shape[1:]) != shape or int(notice.valid_labels.max()) >= classes:
                refused += 1
                continue
            images.append(notice.valid)
            labels.append(notice.valid_labels)
        if not images:
            return None, refused
        source = f"D_valid from {', '.join(n.gateway for n in notices if n.valid is not None)}"
        return ImageDataset(self.clean.name, torch.cat(images), torch.cat(labels), self.clean.classes, source), refused

    def operations(self, model: nn.Module, flagged: int, clean: int | None = None) -> float:
        shape = (1, *self.clean.images.shape[1:])
        c = int(shape[1])
        cfg = self.cyclegan
        g = count_flops(ResnetGenerator(c, cfg.ngf, cfg.n_blocks), shape)
        d = count_flops(PatchDiscriminator(c, cfg.ndf, cfg.d_layers), shape)
        n_clean = len(self.clean) if clean is None else clean
        pairs = max(n_clean, flagged)
        gan = (cfg.epochs + cfg.decay_epochs) * pairs * 3.0 * (6 * g + 6 * d)
        model_flops = count_flops(model, shape)
        unlearn = self.unlearn_epochs * 2 * n_clean * 3.0 * model_flops
        teacher = 2 * n_clean * model_flops if self.distill > 0 else 0.0  # the quarantined model's answers, once
        return float(gan + unlearn + teacher)

    def repair(
        self,
        model: nn.Module,
        flagged: torch.Tensor,
        clean: ImageDataset | None = None,
        reference: nn.Module | None = None,
    ) -> RepairOutcome:
        """Repair `model` from D_poison `flagged` and D_valid `clean` (default: the edge's own clean set); with
        `filter_generated`, the generated images that `reference` (the model rolled back to) no longer labels
        as their source are left out of the unlearning."""
        start = time.perf_counter()
        d_valid = self.clean if clean is None else clean
        unlearn = dataclasses.replace(DEFAULT_UNLEARN, epochs=self.unlearn_epochs)
        result = edge_repair(
            model,
            d_valid,
            flagged,
            cyclegan=self.cyclegan,
            unlearn_config=unlearn,
            reference=reference if self.filter_generated else None,
            distill=self.distill,
        )
        flops = self.operations(model, len(flagged), len(d_valid))
        sim = self.device.seconds_for(1, flops, self.cores)
        return RepairOutcome(result.model, sim, time.perf_counter() - start, flops, result.kept_generated)
