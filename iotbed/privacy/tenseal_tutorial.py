"""TenSEAL's encrypted-MNIST evaluation ("Tutorial 4 - Encrypted Convolution on MNIST") for a trained `HeCnn`,
written as the tutorial writes it, with TenSEAL's high-level API: the baseline `EncryptedCnn` is measured and
cross-checked against.

The tutorial's context (N = 8192, primes [31, 26 x 6, 31], scale 2^26, every power-of-two Galois key),
`ts.im2col_encoding` of the image, per kernel `conv2d_im2col(kernel, windows_nb) + bias`,
`CKKSVector.pack_vectors`, `square_()`, `.mm(fc1.weight.T) + fc1.bias`, `square_()`,
`.mm(fc2.weight.T) + fc2.bias`, `decrypt()`.

One change, so that it computes the same function as iotbed's model: `HeCnn` normalises its input inside
(`model.normalize`), while the tutorial's network takes raw pixels. The normalisation is folded into the
convolution's weights and bias exactly as `EncryptedCnn` folds it, so both encrypt raw pixels in [0, 1].
TenSEAL draws its keys and encryption noise from the system's randomness: its ciphertexts are not reproducible.

Scale drift: after each rescaling TenSEAL takes the ciphertext's scale to be `global_scale` again, while SEAL
divided by a 26-bit NTT prime, and those primes lie up to 1% below 2^26. Every multiplication so scales the
decoded product by 2^26 / p (the primes taken from the last data prime down); through the two squares this
compounds to about 4-5% on the logits of N = 8192, [31, 26 x 6, 31]. `drifted_logits` is the plaintext
network with those factors, what the tutorial decrypts up to CKKS noise. (`EncryptedCnn` encodes each
multiplying plaintext at the prime the next rescaling removes, so its scales stay exact.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from iotbed.errors import ModelError, ScenarioError
from iotbed.models.architectures import HeCnn
from iotbed.privacy.ckks import CkksParams, require_seal

try:
    import tenseal as ts
except ImportError:  # pragma: no cover - tenseal is a dependency; this names the fix if it is missing
    ts = None


def _require_tenseal() -> Any:
    if ts is None:
        raise ScenarioError("the TenSEAL tutorial baseline needs TenSEAL: pip install tenseal==0.3.18")
    return ts


def folded_conv(model: HeCnn) -> tuple[np.ndarray, np.ndarray]:
    """The convolution's (kernels, channels, k, k) weights and bias with `(x - mean) / std` folded in, as
    `EncryptedCnn.__init__` folds them."""
    weight = model.conv.weight.detach().double().numpy()
    bias = model.conv.bias.detach().double().numpy()
    mean = model.normalize.mean.detach().double().flatten().numpy()
    std = model.normalize.std.detach().double().flatten().numpy()
    folded = weight / std[None, :, None, None]
    bias = bias - (weight * (mean / std)[None, :, None, None]).sum(axis=(1, 2, 3))
    return folded, bias


class TutorialEvaluator:
    """A trained one-channel `HeCnn` evaluated as TenSEAL's Tutorial 4 evaluates its network.

    The context holds the secret key (the tutorial encrypts, evaluates and decrypts with one context);
    `n_threads` is TenSEAL's (None: its default, every CPU of the machine, as the tutorial runs)."""

    def __init__(self, model: HeCnn, params: CkksParams | None = None, n_threads: int | None = None) -> None:
        tenseal = _require_tenseal()
        if not isinstance(model, HeCnn):
            raise ModelError(f"the TenSEAL tutorial evaluates he_cnn models only; got {type(model).__name__}")
        if getattr(model, "activation", "square") != "square":
            raise ModelError(
                f"the TenSEAL tutorial squares where this {model.arch} model applies {model.activation}: "
                "it evaluates he_cnn (square activations) only"
            )
        if model.conv.in_channels != 1:
            raise ModelError(
                f"TenSEAL's tutorial encodes one grey image per ciphertext (im2col of a 2-D matrix); this he_cnn "
                f"takes {model.conv.in_channels} channels: use iotbed's EncryptedCnn for colour images"
            )
        self.params = params or CkksParams()
        weight, bias = folded_conv(model)
        self.k = int(model.conv.kernel_size[0])
        self.stride = int(model.conv.stride[0])
        self.image_size = model.image_size
        self.num_classes = model.num_classes
        self.conv_weight = weight[:, 0].tolist()  # per kernel, a k x k list of lists
        self.conv_bias = bias.tolist()
        fc1, fc2 = model.classifier[2], model.classifier[4]
        self.fc1_weight = fc1.weight.detach().double().T.tolist()
        self.fc1_bias = fc1.bias.detach().double().tolist()
        self.fc2_weight = fc2.weight.detach().double().T.tolist()
        self.fc2_bias = fc2.bias.detach().double().tolist()
        self.context = tenseal.context(
            tenseal.SCHEME_TYPE.CKKS,
            self.params.poly_modulus_degree,
            -1,
            list(self.params.coeff_mod_bit_sizes),
            n_threads=n_threads,
        )
        self.context.global_scale = self.params.scale
        self.context.generate_galois_keys()
        self._folded = (torch.from_numpy(weight), torch.from_numpy(bias))
        self._dense = [
            (layer.weight.detach().double().clone(), layer.bias.detach().double().clone()) for layer in (fc1, fc2)
        ]

    @property
    def scale_drift(self) -> list[float]:
        """What each of the six rescalings (conv, pack, square, fc1, square, fc2) multiplies the decoded
        product by in TenSEAL: global_scale / the prime it removes."""
        s = require_seal()
        primes = s.CoeffModulus.Create(self.params.poly_modulus_degree, list(self.params.coeff_mod_bit_sizes))
        data = [float(p.value()) for p in primes[1:-1]]
        return [self.params.scale / p for p in reversed(data)]

    def drifted_logits(self, images: torch.Tensor) -> np.ndarray:
        """The plaintext network on (N, 1, H, W) images with TenSEAL's scale drift: what `logits` returns
        up to CKKS noise."""
        f = self.scale_drift
        weight, bias = self._folded
        (w1, b1), (w2, b2) = self._dense
        x = torch.nn.functional.conv2d(images.double(), weight, stride=self.stride) * f[0]
        x = ((x + bias[None, :, None, None]).flatten(1) * f[1]) ** 2 * f[2]
        x = (x @ w1.T * f[3] + b1) ** 2 * f[4]
        return (x @ w2.T * f[5] + b2).numpy()

    def encrypt(self, image: np.ndarray) -> tuple[Any, int]:
        """(encrypted image, windows_nb) for a (1, H, W) or (H, W) image in [0, 1]."""
        image = np.asarray(image, dtype=np.float64)
        if image.ndim == 3:
            if image.shape[0] != 1:
                raise ValueError(f"image of shape {image.shape}, the model takes one channel")
            image = image[0]
        if image.shape != (self.image_size, self.image_size):
            raise ValueError(f"image of shape {image.shape}, the model takes {self.image_size}x{self.image_size}")
        return ts.im2col_encoding(self.context, image.tolist(), self.k, self.k, self.stride)

    def evaluate(self, encrypted: tuple[Any, int]) -> Any:
        """The tutorial's `EncConvNet.forward`: the encrypted logits."""
        enc_x, windows_nb = encrypted
        enc_channels = []
        for kernel, bias in zip(self.conv_weight, self.conv_bias, strict=True):
            enc_channels.append(enc_x.conv2d_im2col(kernel, windows_nb) + bias)
        enc_x = ts.CKKSVector.pack_vectors(enc_channels)
        enc_x.square_()
        enc_x = enc_x.mm(self.fc1_weight) + self.fc1_bias
        enc_x.square_()
        return enc_x.mm(self.fc2_weight) + self.fc2_bias

    def decrypt(self, result: Any) -> np.ndarray:
        return np.asarray(result.decrypt()[: self.num_classes])

    def logits(self, image: np.ndarray) -> np.ndarray:
        return self.decrypt(self.evaluate(self.encrypt(image)))

    # Sizes as TenSEAL serialises them -----------------------------------------------------------------

    @staticmethod
    def input_bytes(encrypted: tuple[Any, int]) -> int:
        return len(encrypted[0].serialize())

    @staticmethod
    def result_bytes(result: Any) -> int:
        return len(result.serialize())

    def context_bytes(self, galois_keys: bool = True) -> int:
        """The public context (public, relinearisation and, by default, every Galois key; no secret key) a
        client would send the server."""
        return len(self.context.serialize(save_secret_key=False, save_galois_keys=galois_keys))
