"""Floating-point operation counts of one inference, to turn it into simulated compute time on IoT devices.

Only `nn.Conv2d` and `nn.Linear` are counted, as 2 x multiply-accumulates (one multiply, one add):
they dominate the cost of the CNNs here. Biases, activations, pooling, BatchNorm, `Normalize` and
softmax are left out, so the figure is a slight underestimate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from iotbed.errors import ModelError


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs (2 x MACs of Conv2d and Linear layers) for one input of `input_shape` = (C, H, W).

    Runs a forward pass on a zero batch of one, in eval mode (the caller's mode is restored), with
    hooks reading each layer's actual output size, so padding, stride and groups are accounted for.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise ModelError(f"count_flops needs an input shape (C, H, W), got {tuple(input_shape)}")
    macs = 0

    def conv_hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        # Every output element is a dot product over (in_channels / groups) x kh x kw inputs.
        macs += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Linear)
        macs += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    first = next(model.parameters(), None)
    dummy = torch.zeros(
        (1, *shape),
        dtype=first.dtype if first is not None else torch.float32,
        device=first.device if first is not None else "cpu",
    )
    try:
        model.eval()
        with torch.inference_mode():
            model(dummy)
    except RuntimeError as exc:
        raise ModelError(f"the model does not accept inputs of shape {shape}: {exc}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * macs
