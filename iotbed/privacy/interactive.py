"""Interactive encrypted inference: the edge computes the linear layers on ciphertexts and hands every
non-linear layer to the key holder, which decrypts, applies ReLU and encrypts afresh (the idea of Hassan et
al. 2020 of taking the non-linear layers off the server). Here the key holder is the camera itself, the
client of a two-party protocol; each ReLU costs one round trip to it.

Before a ciphertext goes to the key holder the edge multiplies it, slot by slot, by a fresh positive mask r
(ReLU(r x) = r ReLU(x)) and divides the reply by r. The mask hides magnitudes only up to its range (a
factor of 4); the signs of the hidden layer's pre-activations, which ReLU needs, are seen by the key holder.

Levels (depth d of the chain; d = 6 by default): the camera encrypts its image at level d-2 (three primes:
about a third of a full-level ciphertext), the convolution and the masked packing use two levels; the key
holder's first reply comes at level d-3 (unmask, dense, mask), its second at d-2 (unmask, dense).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iotbed.errors import ModelError
from iotbed.privacy.ckks import KeyOwner, PublicContext, require_seal, seal_bytes, seal_load
from iotbed.privacy.encrypted_cnn import EncryptedCnn, encrypt_vectors

STEPS = 3  # the convolution, the first dense layer, the second: a ReLU round trip between each two
MASK_RANGE = (0.5, 2.0)
MIN_DEPTH = 3  # the middle step: unmask, dense, mask


class InteractiveCnn:
    def __init__(self, net: EncryptedCnn) -> None:
        if net.activation != "relu":
            raise ModelError("interactive encrypted inference evaluates he_cnn_relu models; serve arch he_cnn_relu")
        depth = net.params.depth
        if depth < MIN_DEPTH:
            raise ModelError(f"interactive mode needs at least {MIN_DEPTH} multiplications; the chain gives {depth}")
        self.net = net
        self.params = net.params
        self.input_level = depth - 2
        self.reply_levels = (depth - 3, depth - 2)  # of the key holder's replies after steps 0 and 1
        self.rotations = net.rotations

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def channels(self) -> int:
        return self.net.channels

    def encrypt(self, public_key: Any, image: np.ndarray, seed: int) -> list[bytes]:
        return self.net.encrypt(public_key, image, seed, self.input_level)

    def draw_masks(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One frame's masks: per slot of the packed hidden layers (their periods), tiled over every slot."""
        slots = self.params.slots
        first = rng.uniform(*MASK_RANGE, size=self.net.x2)
        second = rng.uniform(*MASK_RANGE, size=self.net.fc1.rows)
        return np.tile(first, slots // len(first)), np.tile(second, slots // len(second))

    def stage(
        self, context: Any, public: PublicContext, step: int, inputs: list[bytes], masks: tuple[np.ndarray, np.ndarray]
    ) -> bytes:
        """Step 0: the image's ciphertexts -> the masked first hidden layer. Step 1: the key holder's reply ->
        the masked second hidden layer. Step 2: the reply -> the logits. ValueError for bad ciphertexts."""
        net = self.net
        ws = net.workspace(context)
        _, _, galois = public.keys(context)
        ev = ws.evaluator
        if step == 0:
            fresh = net.load_inputs(context, inputs, self.input_level)
            return seal_bytes(net.conv_stage(ws, fresh, self.input_level, galois, scale=masks[0]))
        if len(inputs) != 1:
            raise ValueError(f"{len(inputs)} ciphertexts in a reply, one expected")
        level = self.reply_levels[step - 1]
        x = net.load_ciphertext(context, inputs[0], level)
        ev.multiply_plain_inplace(x, ws.encode(1.0 / masks[step - 1], level))
        ev.rescale_to_next_inplace(x)
        y = net.dense_stage(ws, x, "fc1" if step == 1 else "fc2", level + 1, galois)
        if step == 1:
            ev.multiply_plain_inplace(y, ws.encode(masks[1], level + 2))
            ev.rescale_to_next_inplace(y)
        return seal_bytes(y)

    def relu_round(self, owner: KeyOwner, data: bytes, step: int, seed: int) -> bytes:
        """The key holder's turn after `step` (0 or 1): decrypt, ReLU, encrypt afresh at the next step's level.
        `seed` must differ for every call."""
        s = require_seal()
        ciphertext = seal_load(s.Ciphertext(), owner.context, data)
        plain = s.Plaintext()
        s.Decryptor(owner.context, owner.secret_key).decrypt(ciphertext, plain)
        values = np.maximum(np.asarray(s.CKKSEncoder(owner.context).decode_double(plain)), 0.0)
        return encrypt_vectors(self.params, owner.public_key, [values], seed, self.reply_levels[step])[0]

    def decrypt(self, owner: KeyOwner, result: bytes) -> np.ndarray:
        return self.net.decrypt(owner, result)
