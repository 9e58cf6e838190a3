"""Neural Cleanse (Wang et al., S&P 2019): reverse-engineer a trigger per class, flag classes whose
trigger is anomalously small, and mitigate by unlearning.

Reverse engineering, for every class k at once (the K optimisations are batched into one forward of
B x K images per step; their schedules run side by side as vectors):

    mask m_k = (tanh(a_k) + 1) / 2  (1, H, W),  pattern p_k = (tanh(b_k) + 1) / 2  (C, H, W)
    x' = (1 - m_k) x + m_k p_k          (an `iotbed.attacks.backdoor.Trigger` with alpha 1)
    loss_k = CE(f(x'), k) + cost_k * |m_k|_1

Adam lr 0.1, betas (0.5, 0.9) as the original code. Cost schedule as the original / ART / BackdoorBench:
cost starts at `init_cost` = 1e-3; after each epoch (a pass over the clean batches), a class whose
attack success rate on its x' is >= `asr_threshold` (0.99) for `patience` (5) epochs in a row has
its cost multiplied by `cost_multiplier` (1.5), and one below it for `patience` epochs has it divided
by cost_multiplier ** 1.5 (the original's down-multiplier). The smallest-norm mask that reached the
threshold is kept; a class that never reached it keeps its last mask (and is reported as such).

Outlier detection (MAD): l = L1 norms of the K masks; median is the NumPy convention (mean of the two
middle values for even K, `np.median`); MAD = 1.4826 * median(|l - median(l)|); anomaly index
a_k = |l_k - median(l)| / MAD; class k is flagged when a_k > 2 AND l_k < median(l). (PyTorch's
`torch.median` takes the lower middle value instead; TrojanZoo issue #139 shows that this choice can
change which classes are flagged, so it is fixed and stated here.)

Mitigation (the original code's and BackdoorBench's reading of the paper): unlearning. A share
(`stamp_fraction`, 20% as in the paper) of the clean fine-tuning set, chosen with a generator, is
stamped with the reversed trigger of a flagged class (round-robin if several), labels unchanged, and
the model is fine-tuned on that set (SGD momentum 0.9, lr 0.002 cosine, 10 epochs, batch 32: the same
budget as our CoDefend unlearning, so the baselines compare like for like).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iotbed.attacks.backdoor import MultiTrigger, Trigger
from iotbed.data import ImageDataset
from iotbed.errors import IotbedError
from iotbed.models import TrainConfig, train_model

MAD_CONSISTENCY = 1.4826


class NeuralCleanseError(IotbedError):
    exit_code = 2


@dataclass(frozen=True)
class NeuralCleanseConfig:
    epochs: int = 20  # passes over the clean batches per class (all classes at once)
    batch_size: int = 64
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    patience: int = 5
    asr_threshold: float = 0.99
    anomaly_threshold: float = 2.0
    seed: int = 0


@dataclass(frozen=True, eq=False)
class NeuralCleanseResult:
    triggers: tuple[Trigger, ...]  # reversed trigger per class (alpha 1)
    l1_norms: torch.Tensor  # (K,) L1 norm of each class's mask
    reached: torch.Tensor  # (K,) bool: the class's trigger reached the ASR threshold
    final_asr: torch.Tensor  # (K,) ASR of each kept trigger on the clean batches
    anomaly_index: torch.Tensor  # (K,)
    flagged: tuple[int, ...]  # classes judged infected
    median: float
    mad: float

    @property
    def backdoored(self) -> bool:
        return bool(self.flagged)


def mad_outliers(
    norms: torch.Tensor | np.ndarray, threshold: float = 2.0
) -> tuple[np.ndarray, list[int], float, float]:
    """Anomaly indices, flagged classes (index > threshold and norm below the median), median, MAD.
    Median: numpy's (average of the two middle values)."""
    values = np.asarray(norms.detach().cpu().numpy() if isinstance(norms, torch.Tensor) else norms, dtype=np.float64)
    med = float(np.median(values))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(values - med)))
    index = np.abs(values - med) / mad if mad > 0 else np.where(values == med, 0.0, np.inf)
    flagged = [int(k) for k in np.flatnonzero((index > threshold) & (values < med))]
    return index, flagged, med, mad


def reverse_engineer(
    model: nn.Module, clean: torch.Tensor, num_classes: int, config: NeuralCleanseConfig = NeuralCleanseConfig()
) -> NeuralCleanseResult:
    """Optimise one (mask, pattern) per class on `clean` images; see the module doc."""
    if clean.ndim != 4 or clean.shape[0] == 0:
        raise NeuralCleanseError(f"clean images must be a non-empty batch (N, C, H, W), got {tuple(clean.shape)}")
    gen = torch.Generator().manual_seed(config.seed)
    k = num_classes
    c, h, w = clean.shape[1:]
    # Small random start around mask ~ 0.5, as the original's random init in tanh space.
    a = (torch.rand(k, 1, h, w, generator=gen) * 2 - 1).mul_(0.5).requires_grad_(True)
    b = (torch.rand(k, c, h, w, generator=gen) * 2 - 1).mul_(0.5).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=config.lr, betas=(0.5, 0.9))
    targets = torch.arange(k)
    cost = torch.full((k,), config.init_cost)
    up = torch.zeros(k, dtype=torch.int64)
    down = torch.zeros(k, dtype=torch.int64)
    best_norm = torch.full((k,), float("inf"))
    best_mask = torch.zeros(k, 1, h, w)
    best_pattern = torch.zeros(k, c, h, w)
    best_asr = torch.zeros(k)
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        n = clean.shape[0]
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=gen)
            hits = torch.zeros(k)
            seen = 0
            for start in range(0, n, config.batch_size):
                x = clean[order[start : start + config.batch_size]].float()
                bsz = x.shape[0]
                mask = (torch.tanh(a) + 1) / 2  # (k, 1, h, w)
                pattern = (torch.tanh(b) + 1) / 2  # (k, c, h, w)
                xs = (1 - mask[:, None]) * x[None] + mask[:, None] * pattern[:, None]  # (k, bsz, c, h, w)
                logits = model(xs.flatten(0, 1)).view(k, bsz, -1)
                labels = targets.repeat_interleave(bsz)
                ce = F.cross_entropy(logits.flatten(0, 1), labels, reduction="none").view(k, bsz).mean(1)
                l1 = mask.flatten(1).sum(1)
                loss = (ce + cost * l1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                hits += (logits.argmax(-1) == targets[:, None]).float().sum(1).detach()
                seen += bsz
            asr = hits / seen
            with torch.no_grad():
                mask = (torch.tanh(a) + 1) / 2
                norm = mask.flatten(1).sum(1)
                better = (asr >= config.asr_threshold) & (norm < best_norm)
                best_norm = torch.where(better, norm, best_norm)
                best_mask[better] = mask[better]
                best_pattern[better] = ((torch.tanh(b) + 1) / 2)[better]
                best_asr = torch.where(better, asr, best_asr)
                # Cost schedule, per class.
                ok = asr >= config.asr_threshold
                up = torch.where(ok, up + 1, torch.zeros_like(up))
                down = torch.where(ok, torch.zeros_like(down), down + 1)
                raise_cost = up >= config.patience
                lower_cost = down >= config.patience
                cost = torch.where(raise_cost, cost * config.cost_multiplier, cost)
                cost = torch.where(lower_cost, cost / config.cost_multiplier**1.5, cost)
                up = torch.where(raise_cost, torch.zeros_like(up), up)
                down = torch.where(lower_cost, torch.zeros_like(down), down)
        with torch.no_grad():
            reached = torch.isfinite(best_norm)
            last_mask, last_pattern = (torch.tanh(a) + 1) / 2, (torch.tanh(b) + 1) / 2
            best_mask[~reached] = last_mask[~reached]
            best_pattern[~reached] = last_pattern[~reached]
            best_asr = torch.where(reached, best_asr, asr)
            norms = best_mask.flatten(1).sum(1)
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    index, flagged, med, mad = mad_outliers(norms, config.anomaly_threshold)
    triggers = tuple(
        Trigger(best_mask[i].clamp(0, 1), best_pattern[i].clamp(0, 1), 1.0, f"nc-reversed-class{i}") for i in range(k)
    )
    return NeuralCleanseResult(
        triggers=triggers,
        l1_norms=norms,
        reached=reached,
        final_asr=best_asr,
        anomaly_index=torch.as_tensor(index, dtype=torch.float32),
        flagged=tuple(flagged),
        median=med,
        mad=mad,
    )


DEFAULT_UNLEARN = TrainConfig(
    epochs=10, batch_size=32, lr=2e-3, lr_schedule="cosine", optimizer="sgd", momentum=0.9, seed=0
)


def unlearn(
    model: nn.Module,
    clean: ImageDataset,
    result: NeuralCleanseResult,
    *,
    stamp_fraction: float = 0.2,
    config: TrainConfig = DEFAULT_UNLEARN,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """A copy of `model` fine-tuned on `clean` with `stamp_fraction` of it stamped with the reversed
    trigger(s) of the flagged classes, labels unchanged. Without flagged classes the copy is returned
    as is (nothing to unlearn)."""
    if not 0.0 < stamp_fraction < 1.0:
        raise NeuralCleanseError(f"stamp_fraction must be in (0, 1), got {stamp_fraction}")
    repaired = copy.deepcopy(model).eval()
    if not result.flagged:
        return repaired
    gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
    trig = MultiTrigger(tuple(result.triggers[k] for k in result.flagged))
    count = max(1, int(round(stamp_fraction * len(clean))))
    chosen = torch.randperm(len(clean), generator=gen)[:count]
    images = clean.images.clone()
    images[chosen] = trig.apply(images[chosen])
    data = ImageDataset(clean.name, images, clean.labels, clean.classes, f"{clean.source} [nc unlearning]")
    train_model(repaired, data, config, progress=False, reinit=False)
    return repaired.eval()
