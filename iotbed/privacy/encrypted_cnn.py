"""`HeCnn` evaluated on CKKS ciphertexts: the camera encrypts, the edge computes without the key, the key owner
decrypts the logits.

Layout (S = poly_modulus_degree / 2 slots; P windows, K kernel elements, each padded to a power of two):
- The camera encrypts one ciphertext per channel: window p's element j in slot j*P2 + p, the block of
  K2*P2 slots repeated to fill S.
- Convolution: one plaintext multiplication per kernel and channel, then log2(K2) rotate-and-adds sum the
  kernel elements. Every kernel's output comes out repeated with period P2.
- A 0/1 mask per kernel packs the kernels side by side (period X2 = kernels * P2). Then the square.
- Dense layers: the diagonal method of Halevi and Shoup on that periodic vector, with baby-step giant-step
  rotations (about 2*sqrt(rows) of them instead of one per input), then rotate-and-adds fold the columns.
  The square between them costs one relinearisation.

That is six multiplications, as in TenSEAL's tutorial: conv, mask, square, dense, square, dense. Scales stay
exact: every plaintext that multiplies is encoded at the prime the next rescaling removes.
The input normalisation (`Normalize`) is folded into the convolution, so the camera encrypts raw pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iotbed.errors import ModelError
from iotbed.models.architectures import HeCnn
from iotbed.privacy.ckks import (
    CkksParams,
    KeyOwner,
    PublicContext,
    ciphertext_size_bound,
    require_seal,
    seal_bytes,
    seal_context,
    seal_load,
)

MULTIPLICATIONS = 6  # conv, mask, square, dense, square, dense
LOGIT_DIVISOR = 8.0  # the least divisor of the logits at the last level (see `EncryptedCnn.__init__`)
SAFE_LOGIT = 8.0  # what the largest divided logit may reach: far inside the last level's headroom


def logit_divisor(peak_logit: float) -> float:
    """The power of two (at least `LOGIT_DIVISOR`) that brings logits of magnitude `peak_logit` to `SAFE_LOGIT`
    or below. On MNIST, undivided logits from 66 up wrapped around; divided by 8 none of 2,000 did."""
    return max(LOGIT_DIVISOR, float(2 ** math.ceil(math.log2(max(peak_logit, 1e-9) / SAFE_LOGIT))))


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


@dataclass(frozen=True)
class Dense:
    """A dense layer laid out for the diagonal method: `diagonals[g][b]` multiplies the input rotated by b,
    and the giant step g's sum is rotated by g * baby."""

    rows: int  # outputs, padded to a power of two
    cols: int  # the input's period
    baby: int
    giant: int
    diagonals: list[list[np.ndarray | None]]  # None: an all-zero diagonal, skipped
    fold: list[int]  # rotations that add the column blocks together
    bias: np.ndarray  # per slot, period `rows`

    @property
    def rotations(self) -> set[int]:
        return set(range(1, self.baby)) | {g * self.baby for g in range(1, self.giant)} | set(self.fold)


def _dense_layout(weight: np.ndarray, bias: np.ndarray, cols: int, slots: int) -> Dense:
    """Diagonals of `weight` (out x cols, already embedded in the input's slot order) for a vector that
    repeats with period `cols` in `slots` slots."""
    out = weight.shape[0]
    rows = _pow2(out)
    cols = max(cols, rows)
    embedded = np.zeros((rows, cols))
    embedded[:out, : weight.shape[1]] = weight
    baby = 1 << (int(math.log2(rows)) + 1) // 2
    giant = rows // baby
    j = np.arange(cols)
    diagonals: list[list[np.ndarray | None]] = []
    for g in range(giant):
        row: list[np.ndarray | None] = []
        for b in range(baby):
            i = g * baby + b
            diagonal = embedded[j % rows, (j + i) % cols]
            tiled = np.roll(np.tile(diagonal, slots // cols), g * baby)
            row.append(tiled if np.any(tiled) else None)
        diagonals.append(row)
    fold = [cols >> k for k in range(1, int(math.log2(cols // rows)) + 1)]
    bias_slots = np.zeros(rows)
    bias_slots[:out] = bias
    return Dense(rows, cols, baby, giant, diagonals, fold, np.tile(bias_slots, slots // rows))


class EncryptedCnn:
    """A trained `HeCnn` compiled for CKKS parameters. Checks at construction that the network fits them."""

    def __init__(self, model: HeCnn, params: CkksParams, divisor: float = LOGIT_DIVISOR) -> None:
        if not isinstance(model, HeCnn):
            raise ModelError(
                f"encrypted inference evaluates he_cnn models only (conv, square, dense, square, dense; "
                f"he_cnn_relu interactively); got {type(model).__name__}: serve one of those"
            )
        self.activation = model.activation
        problems = params.problems(MULTIPLICATIONS)
        if problems:
            raise ModelError("CKKS parameters: " + "; ".join(problems))
        self.params = params
        slots = params.slots
        conv = model.conv
        weight = conv.weight.detach().double().numpy()  # (O, C, k, k)
        bias = conv.bias.detach().double().numpy()
        mean = model.normalize.mean.detach().double().flatten().numpy()
        std = model.normalize.std.detach().double().flatten().numpy()
        # Fold (x - mean) / std into the convolution.
        folded = weight / std[None, :, None, None]
        bias = bias - (weight * (mean / std)[None, :, None, None]).sum(axis=(1, 2, 3))
        self.kernels, self.channels, self.k, _ = weight.shape
        self.stride = int(conv.stride[0])
        self.image_size = model.image_size
        self.side = (self.image_size - self.k) // self.stride + 1
        self.windows = self.side * self.side
        self.p2, self.k2 = _pow2(self.windows), _pow2(self.k * self.k)
        self.block = self.p2 * self.k2
        self.x2 = _pow2(self.kernels * self.p2)
        if self.block > slots or self.x2 > slots:
            raise ModelError(
                f"he_cnn on {self.image_size}px images needs {max(self.block, self.x2)} slots per ciphertext, "
                f"above the {slots} of poly_modulus_degree {params.poly_modulus_degree}: raise it"
            )
        self.num_classes = model.num_classes
        # Convolution plaintexts: kernel element j in block j, every window.
        flat = folded.reshape(self.kernels, self.channels, -1)
        self.conv_weights = [
            [
                np.tile(np.repeat(np.pad(flat[o, c], (0, self.k2 - flat.shape[2])), self.p2), slots // self.block)
                for c in range(self.channels)
            ]
            for o in range(self.kernels)
        ]
        self.conv_tree = [self.block >> s for s in range(1, int(math.log2(self.k2)) + 1)]
        period = np.arange(slots) % self.x2
        self.masks = [
            ((period >= o * self.p2) & (period < o * self.p2 + self.windows)).astype(float) for o in range(self.kernels)
        ]
        self.conv_bias = sum((mask * bias[o] for o, mask in enumerate(self.masks)), np.zeros(slots))
        fc1, fc2 = model.classifier[2], model.classifier[4]
        w1 = fc1.weight.detach().double().numpy()  # (hidden, O * windows), conv output flattened as (o, window)
        embedded = np.zeros((w1.shape[0], self.x2))
        for o in range(self.kernels):
            embedded[:, o * self.p2 : o * self.p2 + self.windows] = w1[:, o * self.windows : (o + 1) * self.windows]
        self.fc1 = _dense_layout(embedded, fc1.bias.detach().double().numpy(), self.x2, slots)
        # The logits leave at the last level, where only the first prime is left over the scale (5 bits of
        # headroom by default): large logits wrap around. The last layer computes them divided by `divisor`
        # (`logit_divisor` of the served model's largest logit), and `decrypt` multiplies back.
        self.divisor = divisor
        self.fc2 = _dense_layout(
            fc2.weight.detach().double().numpy() / divisor,
            fc2.bias.detach().double().numpy() / divisor,
            self.fc1.rows,
            slots,
        )
        self.rotations = sorted(set(self.conv_tree) | self.fc1.rotations | self.fc2.rotations)
        self._plaintexts: dict[int, Workspace] = {}

    # Camera side --------------------------------------------------------------------------------------

    def encode_image(self, image: np.ndarray) -> list[np.ndarray]:
        """Slot vectors (one per channel) of a (C, H, W) image in [0, 1]."""
        image = np.asarray(image, dtype=np.float64)
        expected = (self.channels, self.image_size, self.image_size)
        if image.shape != expected:
            raise ValueError(f"image of shape {image.shape}, the model takes {expected}")
        windows = torch.from_numpy(image).unfold(1, self.k, self.stride).unfold(2, self.k, self.stride)
        windows = windows.reshape(self.channels, self.windows, self.k * self.k).numpy()  # (C, P, K)
        vectors = []
        for c in range(self.channels):
            block = np.zeros((self.k2, self.p2))
            block[: self.k * self.k, : self.windows] = windows[c].T
            vectors.append(np.tile(block.reshape(-1), self.params.slots // self.block))
        return vectors

    def encrypt(self, public_key: Any, image: np.ndarray, seed: int, level: int = 0) -> list[bytes]:
        """The image's ciphertexts (one per channel) as bytes. `seed` must differ for every encryption."""
        return encrypt_vectors(self.params, public_key, self.encode_image(image), seed, level)

    def decrypt(self, owner: KeyOwner, result: bytes) -> np.ndarray:
        """The logits in an evaluated ciphertext; ValueError if it is not one."""
        s = require_seal()
        ciphertext = seal_load(s.Ciphertext(), owner.context, result)
        plain = s.Plaintext()
        s.Decryptor(owner.context, owner.secret_key).decrypt(ciphertext, plain)
        return self.divisor * np.asarray(s.CKKSEncoder(owner.context).decode_double(plain)[: self.num_classes])

    # Server side --------------------------------------------------------------------------------------

    def evaluate(self, context: Any, public: PublicContext, inputs: list[bytes]) -> bytes:
        """The encrypted logits of the encrypted image `inputs`, computed with `public`'s keys only.
        ValueError for ciphertexts that are not fresh encryptions under these parameters."""
        fresh = self.load_inputs(context, inputs)
        _, relin, galois = public.keys(context)
        return seal_bytes(self._run(context, fresh, relin, galois))

    def load_inputs(self, context: Any, inputs: list[bytes], level: int = 0) -> list[Any]:
        """Parse an image's ciphertexts as a client sent them (one per channel, at `level`)."""
        if len(inputs) != self.channels:
            raise ValueError(f"{len(inputs)} ciphertexts, the model takes {self.channels} (one per channel)")
        return [self.load_ciphertext(context, data, level) for data in inputs]

    def load_ciphertext(self, context: Any, data: bytes, level: int) -> Any:
        """One ciphertext a client sent: its size is checked before SEAL reads it, SEAL checks it against the
        parameters, and it must be at `level` of the modulus chain at the parameters' scale; else ValueError."""
        s = require_seal()
        bound = ciphertext_size_bound(self.params)
        if len(data) > bound:
            raise ValueError(f"ciphertext of {len(data)} bytes, above the {bound} these parameters allow")
        ciphertext = seal_load(s.Ciphertext(), context, data)
        if ciphertext.parms_id() != self.workspace(context).levels[level][0] or ciphertext.size() != 2:
            raise ValueError(f"ciphertext not at level {level} of the modulus chain")
        if ciphertext.scale != self.params.scale:
            raise ValueError(f"ciphertext at scale {ciphertext.scale}, not 2^{self.params.global_scale_bits}")
        return ciphertext

    def workspace(self, context: Any) -> Workspace:
        """The encoder, evaluator and weight plaintexts for computing in `context` (made once per context)."""
        key = id(context)
        if key not in self._plaintexts:
            self._plaintexts[key] = Workspace(context)
        return self._plaintexts[key]

    def _weights(self, ws: Workspace, name: str, level: int) -> Any:
        """The named weight plaintexts at `level`, encoded once: conv[o][c], mask[o], or a dense layer's
        diagonals[g][b] (None for an all-zero diagonal)."""
        key = (name, level)
        if key not in ws.cache:
            if name == "conv":
                ws.cache[key] = [[ws.encode(w, level) for w in per_kernel] for per_kernel in self.conv_weights]
            elif name == "mask":
                ws.cache[key] = [ws.encode(m, level) for m in self.masks]
            else:
                layer = self.fc1 if name == "fc1" else self.fc2
                ws.cache[key] = [[None if d is None else ws.encode(d, level) for d in row] for row in layer.diagonals]
        return ws.cache[key]

    def _run(self, context: Any, inputs: list[Any], relin: Any, galois: Any) -> Any:
        if self.activation != "square":
            raise ModelError("a ReLU network cannot be evaluated on ciphertexts alone: use `mode: interactive`")
        ws = self.workspace(context)
        packed = self.conv_stage(ws, inputs, 0, galois)
        hidden = self.dense_stage(ws, _squared(ws, packed, relin), "fc1", 3, galois)
        return self.dense_stage(ws, _squared(ws, hidden, relin), "fc2", 5, galois)

    def conv_stage(
        self, ws: Workspace, inputs: list[Any], level: int, galois: Any, scale: np.ndarray | None = None
    ) -> Any:
        """Convolution, packing and bias on ciphertexts at `level` (two levels used). With `scale` (per slot,
        positive), the result is multiplied by it: the mask an interactive edge puts on what the key holder sees."""
        s = require_seal()
        ev = ws.evaluator
        kernels = self._weights(ws, "conv", level)
        masks = (
            self._weights(ws, "mask", level + 1)
            if scale is None
            else [ws.encode(m * scale, level + 1) for m in self.masks]
        )
        packed = None
        for o in range(self.kernels):
            conv = None
            for c, ciphertext in enumerate(inputs):
                product = s.Ciphertext()
                ev.multiply_plain(ciphertext, kernels[o][c], product)
                if conv is None:
                    conv = product
                else:
                    ev.add_inplace(conv, product)
            ev.rescale_to_next_inplace(conv)
            for step in self.conv_tree:
                ev.add_inplace(conv, _rotated(ev, conv, step, galois))
            ev.multiply_plain_inplace(conv, masks[o])
            if packed is None:
                packed = conv
            else:
                ev.add_inplace(packed, conv)
        ev.rescale_to_next_inplace(packed)
        ws.add(packed, self.conv_bias if scale is None else self.conv_bias * scale)
        return packed

    def dense_stage(self, ws: Workspace, x: Any, name: str, level: int, galois: Any) -> Any:
        """A dense layer (`fc1` or `fc2`) and its bias on `x`, whose level must be `level` (one level used)."""
        s = require_seal()
        layer = self.fc1 if name == "fc1" else self.fc2
        diagonals = self._weights(ws, name, level)
        ev = ws.evaluator
        babies = [x] + [_rotated(ev, x, b, galois) for b in range(1, layer.baby)]
        total = None
        for g, row in enumerate(diagonals):
            inner = None
            for b, diagonal in enumerate(row):
                if diagonal is None:
                    continue
                product = s.Ciphertext()
                ev.multiply_plain(babies[b], diagonal, product)
                if inner is None:
                    inner = product
                else:
                    ev.add_inplace(inner, product)
            if inner is None:
                continue
            if g:
                ev.rotate_vector_inplace(inner, g * layer.baby, galois)
            if total is None:
                total = inner
            else:
                ev.add_inplace(total, inner)
        if total is None:
            raise ModelError("a dense layer of the he_cnn model has only zero weights")
        # Fold before rescaling: key switching adds about the same noise at any level, and before the rescale
        # it is 2^26 times smaller against the scale (at the last level it cost the first logits 0.038 on
        # average, 0.26 at most, on MNIST with the logits divided by 8).
        for step in layer.fold:
            ev.add_inplace(total, _rotated(ev, total, step, galois))
        ev.rescale_to_next_inplace(total)
        ws.add(total, layer.bias)
        return total


class Workspace:
    """An encoder and evaluator for one context, the parameters of each level, and encoded plaintexts."""

    def __init__(self, context: Any) -> None:
        s = require_seal()
        self.context = context  # keeps id(context) from being reused while a cache holds this
        self.encoder = s.CKKSEncoder(context)
        self.evaluator = s.Evaluator(context)
        self.levels: list[tuple[Any, float]] = []  # (parms_id, the prime its next rescaling removes)
        data = context.first_context_data()
        while data is not None:
            self.levels.append((data.parms_id(), float(data.parms().coeff_modulus()[-1].value())))
            data = data.next_context_data()
        self.cache: dict[tuple[str, int], Any] = {}

    def encode(self, values: np.ndarray, level: int) -> Any:
        """`values` at `level`, at the scale of the prime the next rescaling removes: a product with it keeps
        the ciphertext's scale exactly."""
        plain = require_seal().Plaintext()
        parms_id, prime = self.levels[level]
        self.encoder.encode(values.tolist(), parms_id, prime, plain)
        return plain

    def add(self, ciphertext: Any, values: np.ndarray) -> None:
        plain = require_seal().Plaintext()
        self.encoder.encode(values.tolist(), ciphertext.parms_id(), ciphertext.scale, plain)
        self.evaluator.add_plain_inplace(ciphertext, plain)


def encrypt_vectors(
    params: CkksParams, public_key: Any, vectors: list[np.ndarray], seed: int, level: int = 0
) -> list[bytes]:
    """Fresh ciphertexts of slot vectors at `level` of the chain (fewer primes: smaller, fewer levels left).
    `seed` must differ for every call."""
    s = require_seal()
    context = seal_context(params, seed)
    encoder = s.CKKSEncoder(context)
    encryptor = s.Encryptor(context, public_key)
    data = context.first_context_data()
    for _ in range(level):
        data = data.next_context_data()
    out = []
    for vector in vectors:
        plain = s.Plaintext()
        encoder.encode(vector.tolist(), data.parms_id(), params.scale, plain)
        ciphertext = s.Ciphertext()
        encryptor.encrypt(plain, ciphertext)
        out.append(seal_bytes(ciphertext))
    return out


def _squared(ws: Workspace, x: Any, relin: Any) -> Any:
    ws.evaluator.square_inplace(x)
    ws.evaluator.relinearize_inplace(x, relin)
    ws.evaluator.rescale_to_next_inplace(x)
    return x


def _rotated(evaluator: Any, ciphertext: Any, step: int, galois: Any) -> Any:
    out = require_seal().Ciphertext()
    evaluator.rotate_vector(ciphertext, step, galois, out)
    return out


def evaluation_context(params: CkksParams) -> Any:
    """A context for computing on others' ciphertexts (no randomness is drawn there)."""
    return seal_context(params)
