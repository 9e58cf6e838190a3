"""Adaptive attacks on preprocessing defenses (Athalye et al. 2018), and a cache of adversarial examples.

- BPDA: attack the `DefendedModel` itself. Its forward runs the real defense and its backward goes
  through the defense's `estimate_forward` (the identity by default), so PGD/BIM against it are BPDA.
- EOT: for random defenses (SUPER-IoT's drop mask, pixel deflection) average the gradient over
  `n_samples` independent draws. `eot_gradient` does it in one batched pass by repeating the batch
  n times; the defended model draws fresh randomness for every image of the repeated batch.

`cached_attack` stores results as safetensors under `<cache dir>/adversarial/<key>.safetensors`, the
key a sha256 of the model's weights (and defense parameters), the attack's name and parameters, the
seed and the input bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from iotbed.attacks.evasion import GradFn, Norm, bim, pgd
from iotbed.defenses.base import DefendedModel
from iotbed.errors import IotbedError
from iotbed.models.cache import resolve_cache_dir

# Bump when a change to an attack makes cached adversarial examples wrong.
ADV_CACHE_VERSION = 1


def _check_defended(model: nn.Module) -> DefendedModel:
    if not isinstance(model, DefendedModel):
        raise ValueError(
            f"adaptive attacks need a DefendedModel (preprocessor + classifier), got {type(model).__name__}"
        )
    return model


def eot_gradient(model: nn.Module, n_samples: int, *, targeted: bool = False, max_batch: int = 4096) -> GradFn:
    """A `grad_fn` for the evasion attacks: the gradient of the cross-entropy averaged over
    `n_samples` random draws of `model`'s randomness (EOT), computed on the batch repeated n times
    (in pieces of at most `max_batch` images)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a whole number >= 1, got {n_samples!r}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")

    def grad_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        per_pass = max(1, max_batch // max(x.shape[0], 1))
        done = 0
        while done < n_samples:
            reps = min(per_pass, n_samples - done)
            xr = x.detach().repeat(reps, 1, 1, 1).requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(xr), y.long().repeat(reps), reduction="sum")
                (g,) = torch.autograd.grad(-loss if targeted else loss, xr)
            total += g.view(reps, *x.shape).sum(0)
            done += reps
        return total / n_samples

    return grad_fn


def bpda_pgd(
    defended: DefendedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    norm: Norm = "inf",
    eot_samples: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    targeted: bool = False,
) -> torch.Tensor:
    """PGD through the defense: BPDA gradients, averaged over `eot_samples` draws (EOT) if > 1."""
    _check_defended(defended)
    grad_fn = eot_gradient(defended, eot_samples, targeted=targeted) if eot_samples != 1 else None
    return pgd(
        defended,
        x,
        y,
        eps=eps,
        alpha=alpha,
        steps=steps,
        norm=norm,
        random_start=random_start,
        generator=generator,
        targeted=targeted,
        grad_fn=grad_fn,
    )


def bpda_bim(
    defended: DefendedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float | None = None,
    steps: int = 10,
    eot_samples: int = 1,
    targeted: bool = False,
) -> torch.Tensor:
    """BIM through the defense: BPDA gradients, averaged over `eot_samples` draws (EOT) if > 1."""
    _check_defended(defended)
    grad_fn = eot_gradient(defended, eot_samples, targeted=targeted) if eot_samples != 1 else None
    return bim(defended, x, y, eps=eps, alpha=alpha, steps=steps, targeted=targeted, grad_fn=grad_fn)


# --- the adversarial-example cache ---------------------------------------------------------------


def _tensor_digest(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def model_digest(model: nn.Module) -> str:
    """sha256 of a model's class, parameters and buffers; plus, for a DefendedModel, the defense's
    parameters and the state of its generator (so a random defense keys on where its stream stands)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _tensor_digest(h, tensor)
    if isinstance(model, DefendedModel):
        h.update(json.dumps(model.params(), sort_keys=True, default=str).encode())
        if model.generator is not None:
            _tensor_digest(h, model.generator.get_state())
    return h.hexdigest()


def _canonical(params: dict[str, Any]) -> str:
    try:
        return json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except TypeError as exc:
        raise ValueError(f"cached_attack parameters must be JSON values (numbers, strings, lists): {exc}") from None


def adversarial_cache_key(
    attack_name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: dict[str, Any], seed: int | None
) -> str:
    h = hashlib.sha256()
    header = {
        "version": ADV_CACHE_VERSION,
        "attack": attack_name,
        "params": params,
        "seed": seed,
        "model": model_digest(model),
    }
    h.update(_canonical(header).encode())
    _tensor_digest(h, x)
    _tensor_digest(h, y)
    return h.hexdigest()


def cached_attack(
    attack: Callable[..., torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    **params: Any,
) -> torch.Tensor:
    """`attack(model, x, y, **params)`, from the cache when this exact call was made before.

    With `seed`, the attack also gets `generator=torch.Generator().manual_seed(seed)`. `params` must
    be JSON values (they enter the key). The cache dir is `cache_dir`, else $IOTBED_CACHE_DIR, else the
    user cache dir; files are written by atomic rename. A random defended model keys on its
    generator's current state; a cache hit does not advance that generator.
    """
    if not callable(attack):
        raise ValueError("attack must be a callable attack(model, x, y, **params)")
    attack_name = name or f"{attack.__module__}.{attack.__qualname__}"
    key = adversarial_cache_key(attack_name, model, x, y, json.loads(_canonical(params)), seed)
    folder = resolve_cache_dir(cache_dir) / "adversarial"
    path = folder / f"{key}.safetensors"
    if path.exists():
        try:
            loaded = safetensors.torch.load_file(path)
            adv = loaded["x_adv"]
            if tuple(adv.shape) == tuple(x.shape):
                return adv.to(device=x.device, dtype=x.dtype)
        except (OSError, KeyError, safetensors.SafetensorError):
            pass  # unreadable entry: recompute and overwrite
    if seed is not None:
        params = {**params, "generator": torch.Generator().manual_seed(seed)}
    adv = attack(model, x, y, **params).detach()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _save_atomic(path, adv, {"key": key, "attack": attack_name})
    except OSError as exc:
        raise IotbedError(f"cannot write the adversarial cache at {folder}: {exc}; set IOTBED_CACHE_DIR") from exc
    return adv


def _save_atomic(path: Path, adv: torch.Tensor, metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file({"x_adv": adv.cpu().contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
