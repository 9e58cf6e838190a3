"""Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the last convolutional layer's channels
that clean data leaves dormant (a backdoor tends to live in them), then fine-tune on clean data.

- Activation: the output of the first ReLU after the model's LAST `nn.Conv2d` (in module order), i.e.
  after BatchNorm where there is one; mean over clean images and positions, per channel.
- Pruning order: increasing mean activation. Channels are pruned one at a time while clean
  accuracy on the validation images stays within `max_accuracy_drop` (default 0.05 = 5 points, the
  paper stops near a 4% drop) of the unpruned model's; the last channel that broke the limit is put
  back.
- A pruned channel is zeroed in the weights themselves (conv weight and bias, and the following
  BatchNorm's weight and bias), so the model stays a plain architecture that saves as safetensors.
  During fine-tuning, gradient hooks keep those entries at zero (their gradient is masked, so no
  optimiser step moves them while weight decay is 0), and are removed afterwards.
- Fine-tuning: SGD momentum 0.9, lr 0.002 with cosine decay, 10 epochs, batch 32, on the clean set
  (the same budget as our CoDefend and Neural Cleanse unlearning). With SGD, momentum and no
  weight decay, a zero gradient leaves a zeroed weight at zero.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from iotbed.data import ImageDataset
from iotbed.errors import IotbedError
from iotbed.models import TrainConfig, evaluate, train_model


class FinePruningError(IotbedError):
    exit_code = 2


@dataclass(frozen=True, eq=False)
class FinePruningResult:
    model: nn.Module  # pruned and fine-tuned copy
    pruned_model: nn.Module  # pruned copy before fine-tuning
    pruned_channels: tuple[int, ...]
    n_channels: int
    base_accuracy: float  # on the validation set, before pruning
    pruned_accuracy: float  # after pruning, before fine-tuning


def _last_conv(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, nn.Module | None]:
    modules = list(model.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise FinePruningError(f"{type(model).__name__} has no Conv2d layer to prune")
    i = convs[-1]
    bn = relu = None
    for m in modules[i + 1 :]:
        if isinstance(m, nn.BatchNorm2d) and bn is None and relu is None:
            bn = m
        if isinstance(m, nn.ReLU):
            relu = m
            break
    return modules[i], bn, relu  # type: ignore[return-value]


@torch.inference_mode()
def channel_activations(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Mean activation per channel of the last conv layer (after its BN and ReLU) over `images`."""
    conv, bn, relu = _last_conv(model)
    tap = relu if relu is not None else (bn if bn is not None else conv)
    total = torch.zeros(conv.out_channels, dtype=torch.float64)
    grabbed: list[torch.Tensor] = []
    handle = tap.register_forward_hook(lambda _m, _i, out: grabbed.append(out.detach()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            grabbed.clear()
            model(images[start : start + batch_size].float())
            total += grabbed[0].double().mean(dim=(2, 3)).sum(0)
    finally:
        handle.remove()
        model.train(was_training)
    return (total / len(images)).float()


def _zero_channels(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, channels: list[int]) -> None:
    with torch.no_grad():
        conv.weight[channels] = 0.0
        if conv.bias is not None:
            conv.bias[channels] = 0.0
        if bn is not None:
            bn.weight[channels] = 0.0
            bn.bias[channels] = 0.0


def prune_by_activation(
    model: nn.Module, clean: ImageDataset, *, max_accuracy_drop: float = 0.05
) -> tuple[nn.Module, list[int], float, float]:
    """A copy with the most dormant last-conv channels zeroed while accuracy on `clean` stays within
    `max_accuracy_drop` of the original. Returns (copy, pruned channels, base acc, pruned acc)."""
    if not 0.0 <= max_accuracy_drop < 1.0:
        raise FinePruningError(f"max_accuracy_drop must be in [0, 1), got {max_accuracy_drop}")
    pruned = copy.deepcopy(model).eval()
    conv, bn, _ = _last_conv(pruned)
    order = torch.argsort(channel_activations(pruned, clean.images)).tolist()
    base = evaluate(pruned, clean)
    kept_acc = base
    chosen: list[int] = []
    # Keep at least one channel: a layer with none left is no longer a classifier.
    for ch in order[:-1]:
        trial = copy.deepcopy(pruned)
        t_conv, t_bn, _ = _last_conv(trial)
        _zero_channels(t_conv, t_bn, chosen + [ch])
        acc = evaluate(trial, clean)
        if base - acc > max_accuracy_drop:
            break
        chosen.append(ch)
        kept_acc = acc
    _zero_channels(conv, bn, chosen)
    return pruned, chosen, base, kept_acc


DEFAULT_FINE_TUNE = TrainConfig(
    epochs=10, batch_size=32, lr=2e-3, lr_schedule="cosine", optimizer="sgd", momentum=0.9, seed=0
)


def fine_prune(
    model: nn.Module,
    clean: ImageDataset,
    *,
    max_accuracy_drop: float = 0.05,
    config: TrainConfig = DEFAULT_FINE_TUNE,
    validation: ImageDataset | None = None,
) -> FinePruningResult:
    """Prune (judged on `validation`, default `clean`), then fine-tune on `clean` with the pruned
    channels held at zero. The input model is untouched."""
    val = validation if validation is not None else clean
    pruned, channels, base, pruned_acc = prune_by_activation(model, val, max_accuracy_drop=max_accuracy_drop)
    tuned = copy.deepcopy(pruned)
    conv, bn, _ = _last_conv(tuned)
    keep = torch.ones(conv.out_channels)
    keep[channels] = 0.0
    handles = []
    for p, shape in ((conv.weight, (-1, 1, 1, 1)), (conv.bias, (-1,))) + (
        ((bn.weight, (-1,)), (bn.bias, (-1,))) if bn is not None else ()
    ):
        if p is not None:
            mask = keep.view(shape)
            handles.append(p.register_hook(lambda g, m=mask: g * m))
    try:
        train_model(tuned, clean, config, progress=False, reinit=False)
    finally:
        for h in handles:
            h.remove()
    return FinePruningResult(
        model=tuned.eval(),
        pruned_model=pruned,
        pruned_channels=tuple(channels),
        n_channels=conv.out_channels,
        base_accuracy=base,
        pruned_accuracy=pruned_acc,
    )
