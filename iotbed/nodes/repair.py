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
from dataclasses import dataclass

import torch
from torch import nn

from iotbed.data.dataset import ImageDataset
from iotbed.defenses.codefend import DEFAULT_UNLEARN, CycleGanConfig, PatchDiscriminator, ResnetGenerator, edge_repair
from iotbed.models.flops import count_flops
from iotbed.sim.devices import DeviceProfile


@dataclass(frozen=True)
class RepairOutcome:
    model: nn.Module
    sim_seconds: float
    wall_seconds: float
    flops: float


@dataclass(frozen=True)
class CoDefendRepairer:
    clean: ImageDataset  # D_valid, labelled
    cyclegan: CycleGanConfig
    unlearn_epochs: int
    device: DeviceProfile
    cores: int | None = None

    def operations(self, model: nn.Module, flagged: int) -> float:
        shape = (1, *self.clean.images.shape[1:])
        c = int(shape[1])
        cfg = self.cyclegan
        g = count_flops(ResnetGenerator(c, cfg.ngf, cfg.n_blocks), shape)
        d = count_flops(PatchDiscriminator(c, cfg.ndf, cfg.d_layers), shape)
        pairs = max(len(self.clean), flagged)
        gan = (cfg.epochs + cfg.decay_epochs) * pairs * 3.0 * (6 * g + 6 * d)
        unlearn = self.unlearn_epochs * 2 * len(self.clean) * 3.0 * count_flops(model, shape)
        return float(gan + unlearn)

    def repair(self, model: nn.Module, flagged: torch.Tensor) -> RepairOutcome:
        start = time.perf_counter()
        unlearn = dataclasses.replace(DEFAULT_UNLEARN, epochs=self.unlearn_epochs)
        result = edge_repair(model, self.clean, flagged, cyclegan=self.cyclegan, unlearn_config=unlearn)
        flops = self.operations(model, len(flagged))
        sim = self.device.seconds_for(1, flops, self.cores)
        return RepairOutcome(result.model, sim, time.perf_counter() - start, flops)
