"""CoDefend (Liu et al., Ad Hoc Networks 2021): the edge side. STRIP on the thin device collects the
inputs it flags; the edge server learns to synthesise the trigger with a CycleGAN and "unlearns" the
backdoor by fine-tuning the model on clean and trigger-stamped images with their true labels.

No code was published, so every choice below is ours, recorded here.

Device (Alg. 1), `device_screen`: D_clean = 100 distinct clean samples with at least one per class;
each incoming frame is superimposed on EVERY sample of D_clean (STRIP additive blend, N = 100, entropy
in bits); frames with H <= the boundary go into D_poison. The paper gives no sigma for the boundary:
we derive it as STRIP does, `norm.ppf(FRR)` on benign entropies of clean calibration frames, FRR 1%.
False positives (benign frames flagged, about FRR of the clean traffic) stay in D_poison: they are a
few percent of Y and the CycleGAN's adversarial loss models the majority mode (the trigger).

Edge (Alg. 2), `train_cyclegan` + `unlearn`:

- Domains: X = D_valid (clean, labelled), Y = D_poison (flagged). G: X -> Y learns to stamp the
  trigger, F: Y -> X to remove it. D_gen = {(G(x), y_true(x)) : x in D_valid}, the label of each
  synthesised image being the true class of its source (the paper implies it; we make it explicit).
- Generator (`ResnetGenerator`): the reference CycleGAN ResNet generator (junyanz/pytorch-CycleGAN-
  and-pix2pix) sized for 28x28 and 32x32: c7s1-ngf, two stride-2 downsamplings, `n_blocks` residual
  blocks at ngf*4 channels, two transposed-conv upsamplings, c7s1-C, tanh; instance norm (no affine,
  no running stats), reflection padding, no resize or crop. Images enter as 2x - 1 and leave as
  (tanh + 1) / 2, so G maps [0, 1] to [0, 1]; H and W must be multiples of 4. Defaults: ngf 16 and 4
  blocks (the reference: ngf 64, 9 blocks at 256 px, 11.4 M parameters). At 28-32 px the blocks work
  on a 7-8 px map, so 4 blocks already see the whole image; ngf 16 instead of 32 because a CycleGAN
  step runs G and F six times: at batch 8 on 28x28, one step took 0.85-0.95 s at ngf 32 / 6 blocks
  against 0.3-0.45 s at ngf 16 / 4 blocks (one core of the shared 2-core machine), i.e. 7-8 minutes
  instead of under 3 for our schedule, while ngf 16 already stamps the MNIST trigger after its
  first epoch (the BadNet sends 98% of G(x) to the target; 99-100% from epoch 2).
- Discriminator (`PatchDiscriminator`): PatchGAN, ndf 32, n_layers 2 (receptive field 34 px, i.e. the
  whole 28/32 px image; the reference n_layers 3 has 70 px and would reduce a 32 px image to a 2x2 map).
- Loss: LSGAN (MSE to 1 / 0), as the reference code (the paper writes the log-likelihood GAN loss,
  which the reference code replaced for stability); cycle L1 with lambda_cyc = 10 both ways;
  identity loss weight 0.5 (times lambda): G(y) ~ y for y already in Y. We keep it because it encodes a
  property a stamped trigger really has, idempotence (stamping an already stamped image changes
  nothing), which pushes G toward "change only the trigger region" and speeds up short schedules.
  The discriminator loss is halved, as in the reference.
- Optimiser: Adam lr 2e-4, betas (0.5, 0.999), weights N(0, 0.02), image pool of 50 past fakes per
  discriminator (returned with probability 0.5), all draws from one torch.Generator.
- Schedule: the reference (and the paper) is 200 epochs, 100 at constant lr then 100 of linear
  decay to 0, batch 1 (about 100k generator steps for 500 images). That is many hours on two CPU
  cores. The default here keeps the shape, constant then linear decay to 0 (the reference's
  `1 - max(0, epoch + 1 - n_epochs) / (n_epochs_decay + 1)`), scaled down to 4 + 4 epochs with batch
  8: 63 steps per epoch on 500 + 500 images, about 2.5 minutes for MNIST on one core. Instance norm
  makes the batch size irrelevant to the normalisation itself.
- Unlearning: fine-tune the (copied) BadNet on D_valid ∪ D_gen with true labels: SGD, momentum 0.9
  (Nesterov), lr 0.002 with cosine decay to 0, batch 32, 10 epochs, no augmentation, starting from
  the BadNet's weights (`train_model(..., reinit=False)`). The paper retrains for 100 epochs on 1000
  images with an unstated optimiser. Measured CA / ASR after (MNIST LeNet-5 BadNet at 98.33% CA with
  the same G(x), 500 + 500 images; GTSRB CNN at 96.67% and digits LeNet-5 at 97.2% with the true
  trigger standing in for G(x), 500 + 500 and 120 + 120 images):
      SGD 0.002:  MNIST 97.47 / 0.4%   GTSRB 96.57 / 0.0%   digits 95.3 / 0.6%
      SGD 0.005:  MNIST 97.33 / 0.4%   GTSRB 94.57 / 0.1%   digits 94.7 / 0.6%
      SGD 0.01:   MNIST 97.60 / 0.6%                        digits 88.3 / 0.9%
      Adam 1e-3:  MNIST 97.00 / 1.3%                        digits 94.2 / 0.6%
  Adam 1e-4 at a constant lr for 20 epochs gave digits 92.5% CA; keeping BatchNorm statistics frozen
  (momentum 0) wrecked GTSRB (24-64% CA: the weights adapt to batch statistics that eval never uses).
  The CA cost comes from fine-tuning on only ~1,000 images, not from the GAN (the true trigger costs
  about as much); differences under ~0.4 points are noise at 1,500 test images.
- Distillation (ours; the paper fine-tunes plainly): the loss adds KL(BadNet || copy) at temperature 2,
  weight 1, on the clean images only (on generated ones the BadNet answers with the backdoor), so the copy
  keeps what the BadNet learnt from its whole training set. MNIST LeNet-5, blended noise trigger (alpha
  0.1, target 7), 32 stamped frames as D_poison, the same G(x), three unlearning seeds: CA drop against
  the BadNet 1.60 / 1.40 / 1.33 points plainly, 0.60 / 0.33 / 0.20 with it, ASR 0.15-0.74% either way;
  lowering the lr (1e-3, 5e-4) or halving the epochs did not help. `distill=0` is the paper's recipe.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from iotbed.analysis.detection import ThresholdMethod
from iotbed.data import ImageDataset
from iotbed.defenses.strip import StripDetector, StripThreshold
from iotbed.errors import IotbedError
from iotbed.models import TrainConfig, predict, train_model


class CoDefendError(IotbedError):
    """CoDefend asked to run on data or settings it cannot use."""

    exit_code = 2


# -- device side ----------------------------------------------------------------------------------


def select_clean_overlays(ds: ImageDataset, n: int, generator: torch.Generator) -> torch.Tensor:
    """Positions of `n` distinct samples of `ds` with at least one per class (CoDefend's D_clean)."""
    classes = torch.unique(ds.labels)
    if n < len(classes) or n > len(ds):
        raise CoDefendError(f"D_clean needs between {len(classes)} (one per class) and {len(ds)} samples, got {n}")
    order = torch.randperm(len(ds), generator=generator)
    # The first occurrence of each class in a random order: one random sample per class.
    first = torch.stack([order[(ds.labels[order] == c).nonzero()[0, 0]] for c in classes])
    rest = order[~torch.isin(order, first)]
    return torch.cat([first, rest[: n - len(first)]]).sort().values


@dataclass(frozen=True, eq=False)
class DeviceScreen:
    flagged: torch.Tensor  # the frames put into D_poison
    flagged_idx: torch.Tensor  # their positions in the stream
    entropies: torch.Tensor  # of every frame of the stream
    threshold: StripThreshold


def device_screen(
    model: nn.Module,
    stream: torch.Tensor,
    clean_overlays: torch.Tensor,
    calibration: torch.Tensor,
    *,
    frr: float = 0.01,
    method: ThresholdMethod = "normal",
) -> DeviceScreen:
    """Alg. 1: each frame superimposed on every clean overlay (additive, N = len(overlays)); frames at
    or below the boundary fitted on `calibration` (clean frames, not in the stream) are flagged.
    `method="normal"` is STRIP's fit; where it puts the boundary below zero nothing is flagged and
    `edge_repair` refuses the empty D_poison, so switch to "quantile" then."""
    detector = StripDetector(model, clean_overlays, blend="additive", sampling="all")
    threshold = detector.calibrate(calibration, frr=frr, method=method)
    h = detector.score(stream)
    flags = detector.flag_scores(h)
    idx = flags.nonzero().flatten()
    return DeviceScreen(flagged=stream[idx], flagged_idx=idx, entropies=h, threshold=threshold)


# -- CycleGAN ---------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            nn.InstanceNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3),
            nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """The reference CycleGAN ResNet generator, [0, 1] images in and out (see the module doc)."""

    def __init__(self, channels: int, ngf: int = 32, n_blocks: int = 6) -> None:
        super().__init__()
        if channels < 1 or ngf < 1 or n_blocks < 0:
            raise CoDefendError(
                f"generator needs channels >= 1, ngf >= 1, n_blocks >= 0 (got {channels}, {ngf}, {n_blocks})"
            )
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for mult in (1, 2):
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                nn.InstanceNorm2d(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [
                nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(2.0 * x - 1.0) + 1.0) / 2.0


def _down(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1), nn.InstanceNorm2d(c_out), nn.LeakyReLU(0.2, True)]


class PatchDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake logits, one per overlapping patch (LSGAN: no sigmoid)."""

    def __init__(self, channels: int, ndf: int = 32, n_layers: int = 2) -> None:
        super().__init__()
        if n_layers < 1:
            raise CoDefendError(f"the discriminator needs n_layers >= 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += _down(ndf * prev, ndf * mult, stride=2)
        prev, mult = mult, min(2**n_layers, 8)
        layers += _down(ndf * prev, ndf * mult, stride=1)
        layers += [nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(2.0 * x - 1.0)


def _init_normal(module: nn.Module, generator: torch.Generator) -> None:
    # The reference's init_type="normal", gain 0.02, drawn from our generator.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class ImagePool:
    """Shrivastava et al.'s history of generated images: the discriminator sees a mix of current and
    past fakes, which damps oscillation. Each new image, once the pool is full, is swapped with a
    random stored one with probability 0.5 (the stored one is returned instead)."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator
        self.images: list[torch.Tensor] = []

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        out = []
        for image in batch.detach():
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif float(torch.rand((), generator=self.generator)) > 0.5:
                j = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.images[j])
                self.images[j] = image
            else:
                out.append(image)
        return torch.stack(out)


@dataclass(frozen=True)
class CycleGanConfig:
    """See the module doc for why each value. `epochs` at constant lr, then `decay_epochs` linear to 0."""

    ngf: int = 16
    n_blocks: int = 4
    ndf: int = 32
    d_layers: int = 2
    lambda_cyc: float = 10.0
    lambda_identity: float = 0.5
    lr: float = 2e-4
    beta1: float = 0.5
    epochs: int = 4
    decay_epochs: int = 4
    batch_size: int = 8
    pool_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.decay_epochs < 0 or self.epochs + self.decay_epochs < 1:
            raise CoDefendError(f"need epochs + decay_epochs >= 1 (got {self.epochs} + {self.decay_epochs})")
        if self.batch_size < 1 or self.pool_size < 0 or self.lr <= 0 or self.lambda_cyc < 0 or self.lambda_identity < 0:
            raise CoDefendError(f"invalid CycleGAN config: {self}")

    def lr_factor(self, epoch: int) -> float:
        """Reference `linear` policy: 1 for the first `epochs`, then down to 0 over `decay_epochs`."""
        return 1.0 - max(0, epoch + 1 - self.epochs) / (self.decay_epochs + 1)


@dataclass(frozen=True)
class CycleGanEpoch:
    epoch: int
    lr: float
    loss_g_gan: float
    loss_cycle: float
    loss_identity: float
    loss_d: float
    wall_time_s: float


@dataclass(frozen=True, eq=False)
class CycleGanResult:
    g: ResnetGenerator  # X (clean) -> Y (triggered), eval mode
    f: ResnetGenerator  # Y -> X
    history: tuple[CycleGanEpoch, ...]
    config: CycleGanConfig
    wall_time_s: float


def _lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))


def train_cyclegan(
    clean: torch.Tensor,
    poisoned: torch.Tensor,
    config: CycleGanConfig = CycleGanConfig(),
    *,
    progress: Callable[[CycleGanEpoch, nn.Module], None] | None = None,
) -> CycleGanResult:
    """Unpaired CycleGAN between X = `clean` and Y = `poisoned` images (both (N, C, H, W) in [0, 1])."""
    for what, t in (("clean", clean), ("poisoned", poisoned)):
        if t.ndim != 4 or t.shape[0] == 0:
            raise CoDefendError(f"{what} images must be a non-empty batch (N, C, H, W), got {tuple(t.shape)}")
    if clean.shape[1:] != poisoned.shape[1:]:
        raise CoDefendError(
            f"clean {tuple(clean.shape[1:])} and poisoned {tuple(poisoned.shape[1:])} images differ in shape"
        )
    c, h, w = clean.shape[1:]
    if h % 4 or w % 4:
        raise CoDefendError(f"the generator halves the image twice; H and W must be multiples of 4, got {h}x{w}")
    gen = torch.Generator().manual_seed(config.seed)
    g, f = ResnetGenerator(c, config.ngf, config.n_blocks), ResnetGenerator(c, config.ngf, config.n_blocks)
    d_y, d_x = PatchDiscriminator(c, config.ndf, config.d_layers), PatchDiscriminator(c, config.ndf, config.d_layers)
    for net in (g, f, d_y, d_x):
        _init_normal(net, gen)
    opt_g = torch.optim.Adam([*g.parameters(), *f.parameters()], lr=config.lr, betas=(config.beta1, 0.999))
    opt_d = torch.optim.Adam([*d_y.parameters(), *d_x.parameters()], lr=config.lr, betas=(config.beta1, 0.999))
    pool_y, pool_x = ImagePool(config.pool_size, gen), ImagePool(config.pool_size, gen)
    x_all, y_all = clean.float(), poisoned.float()
    n = max(len(x_all), len(y_all))
    steps = -(-n // config.batch_size)
    lam, lam_id = config.lambda_cyc, config.lambda_cyc * config.lambda_identity
    history: list[CycleGanEpoch] = []
    start = time.perf_counter()
    for net in (g, f, d_y, d_x):
        net.train()
    for epoch in range(config.epochs + config.decay_epochs):
        t0 = time.perf_counter()
        lr = config.lr * config.lr_factor(epoch)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = lr
        # The larger domain is walked in a random order; the smaller is resampled to the same length.
        ix = torch.randperm(n, generator=gen) % len(x_all)
        iy = torch.randperm(n, generator=gen) % len(y_all)
        sums = torch.zeros(4)
        for s in range(steps):
            real_x = x_all[ix[s * config.batch_size : (s + 1) * config.batch_size]]
            real_y = y_all[iy[s * config.batch_size : (s + 1) * config.batch_size]]
            # Generators: discriminators frozen so their gradients are not accumulated.
            for d in (d_y, d_x):
                d.requires_grad_(False)
            fake_y, fake_x = g(real_x), f(real_y)
            loss_gan = _lsgan(d_y(fake_y), True) + _lsgan(d_x(fake_x), True)
            loss_cyc = lam * (F.l1_loss(f(fake_y), real_x) + F.l1_loss(g(fake_x), real_y))
            loss_idt = torch.zeros(())
            if lam_id > 0:  # identity: G leaves stamped images alone, F clean ones
                loss_idt = lam_id * (F.l1_loss(g(real_y), real_y) + F.l1_loss(f(real_x), real_x))
            opt_g.zero_grad(set_to_none=True)
            (loss_gan + loss_cyc + loss_idt).backward()
            opt_g.step()
            # Discriminators: real vs pooled fakes, halved as in the reference.
            for d in (d_y, d_x):
                d.requires_grad_(True)
            py, px = pool_y.query(fake_y), pool_x.query(fake_x)
            loss_d = 0.5 * (_lsgan(d_y(real_y), True) + _lsgan(d_y(py), False)) + 0.5 * (
                _lsgan(d_x(real_x), True) + _lsgan(d_x(px), False)
            )
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            sums += torch.tensor([loss_gan.item(), loss_cyc.item(), loss_idt.item(), loss_d.item()])
        sums /= steps
        record = CycleGanEpoch(epoch + 1, lr, *(float(v) for v in sums), time.perf_counter() - t0)
        history.append(record)
        if progress is not None:
            g.eval()  # the callback may run G (e.g. to watch the synthesised trigger); give it eval mode
            progress(record, g)
            g.train()
    for net in (g, f, d_y, d_x):
        net.eval()
    return CycleGanResult(g, f, tuple(history), config, time.perf_counter() - start)


@torch.inference_mode()
def synthesize(g: nn.Module, clean: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """G(x) for every clean image, clamped to [0, 1] (tanh output can round a hair outside)."""
    g.eval()
    return torch.cat([g(clean[i : i + batch_size].float()) for i in range(0, len(clean), batch_size)]).clamp_(0.0, 1.0)


# -- unlearning -------------------------------------------------------------------------------------

DEFAULT_UNLEARN = TrainConfig(
    epochs=10, batch_size=32, lr=2e-3, lr_schedule="cosine", optimizer="sgd", momentum=0.9, seed=0
)


# Distillation on D_valid while unlearning: weight of the term and its temperature (Hinton et al.'s T^2 scaling).
DEFAULT_DISTILL = 1.0
DISTILL_TEMPERATURE = 2.0


def distillation_loss(
    teacher_logits: torch.Tensor, distilled: torch.Tensor, weight: float, temperature: float = DISTILL_TEMPERATURE
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy on the labels plus `weight` x T^2 x KL(teacher || student) at temperature T on the samples
    `distilled` marks (a boolean mask over the training set), scaled by their share of the batch."""
    soft = F.softmax(teacher_logits / temperature, dim=1)

    def loss(logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits, labels)
        chosen = distilled[idx]
        if weight > 0 and bool(chosen.any()):
            log_p = F.log_softmax(logits[chosen] / temperature, dim=1)
            kl = F.kl_div(log_p, soft[idx][chosen], reduction="batchmean") * temperature**2
            total = total + weight * kl * chosen.float().mean()
        return total

    return loss


def unlearn(
    model: nn.Module,
    clean: ImageDataset,
    synthesized: torch.Tensor,
    config: TrainConfig = DEFAULT_UNLEARN,
    keep: torch.Tensor | None = None,
    distill: float = DEFAULT_DISTILL,
) -> nn.Module:
    """A copy of `model` fine-tuned on `clean` ∪ (`synthesized`, clean.labels): D_valid ∪ D_gen; with `keep`
    (a boolean mask over the generated images), only the kept ones join D_gen. With `distill` > 0 the copy is
    also held to `model`'s own answers on the clean images (never on the generated ones, where `model` answers
    with the backdoor): fine-tuning on a thousand images otherwise drifts from what the model had learnt from
    its whole training set."""
    if distill < 0:
        raise CoDefendError(f"distill weight must be >= 0, got {distill}")
    if synthesized.shape != clean.images.shape:
        raise CoDefendError(
            f"synthesized images {tuple(synthesized.shape)} must pair one-to-one with the clean set "
            f"{tuple(clean.images.shape)}"
        )
    if keep is None:
        keep = torch.ones(len(clean), dtype=torch.bool)
    data = ImageDataset(
        clean.name,
        torch.cat([clean.images, synthesized[keep].float().clamp(0.0, 1.0)]),
        torch.cat([clean.labels, clean.labels[keep]]),
        clean.classes,
        f"{clean.source} [codefend D_valid+D_gen]",
    )
    repaired = copy.deepcopy(model)
    indexed_loss = None
    if distill > 0:
        with torch.no_grad():  # log-probabilities are logits up to a per-image constant, which softmax ignores
            teacher = predict(model, data.images)[1].clamp_min(1e-12).log()
        is_clean = torch.zeros(len(data), dtype=torch.bool)
        is_clean[: len(clean)] = True
        indexed_loss = distillation_loss(teacher, is_clean, distill)
    train_model(repaired, data, config, progress=False, reinit=False, indexed_loss=indexed_loss)
    return repaired.eval()


@dataclass(frozen=True, eq=False)
class RepairResult:
    model: nn.Module  # the repaired copy; the input model is untouched
    cyclegan: CycleGanResult
    synthesized: torch.Tensor  # D_gen images, paired with clean.labels
    wall_time_s: float
    timings: dict[str, float] = field(default_factory=dict)
    kept_generated: int = 0  # the generated images that joined D_gen

    def summary(self) -> dict[str, object]:
        return {"cyclegan": asdict(self.cyclegan.config), "wall_time_s": self.wall_time_s, "timings": self.timings}


def edge_repair(
    model: nn.Module,
    clean: ImageDataset,
    flagged: torch.Tensor,
    *,
    cyclegan: CycleGanConfig = CycleGanConfig(),
    unlearn_config: TrainConfig = DEFAULT_UNLEARN,
    progress: Callable[[CycleGanEpoch, nn.Module], None] | None = None,
    reference: nn.Module | None = None,
    distill: float = DEFAULT_DISTILL,
) -> RepairResult:
    """Alg. 2: CycleGAN X = `clean` (D_valid, labelled) -> Y = `flagged` (D_poison), D_gen = G(X) with
    the true labels of X, then fine-tune a copy of `model` on D_valid ∪ D_gen.

    With a `reference` model (one without the backdoor, e.g. the version the edge rolled back to), a
    generated image joins D_gen only if the reference still gives it its source image's label: trained on a
    few dozen flagged frames, the CycleGAN also pulls digits towards those frames' shapes, and such images
    would teach the repaired model wrong labels (measured on MNIST: the clean model recognised only 52-81% of
    the generated images; keeping those cut the clean-accuracy loss from about 2 points to about 1.2)."""
    if len(flagged) == 0:
        raise CoDefendError("D_poison is empty: the device flagged no frames, there is no trigger to learn")
    t0 = time.perf_counter()
    gan = train_cyclegan(clean.images, flagged, cyclegan, progress=progress)
    t1 = time.perf_counter()
    fake = synthesize(gan.g, clean.images)
    keep = None
    if reference is not None:
        with torch.inference_mode():
            keep = reference.eval()(fake).argmax(dim=1) == clean.labels
    repaired = unlearn(model, clean, fake, unlearn_config, keep, distill)
    t2 = time.perf_counter()
    return RepairResult(
        model=repaired,
        cyclegan=gan,
        synthesized=fake,
        wall_time_s=t2 - t0,
        timings={"cyclegan_s": t1 - t0, "synthesize_and_unlearn_s": t2 - t1},
        kept_generated=int(keep.sum()) if keep is not None else len(fake),
    )
