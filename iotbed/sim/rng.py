"""One seed for every random choice.

Each entity gets its own stream derived from the scenario seed and the entity's *name*, not from the order
in which streams are asked for, so adding a camera does not change what any other camera draws.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def _name_key(parts: tuple[str, ...]) -> tuple[int, ...]:
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))


class RandomStreams:
    """Named, independent random streams below one `numpy.random.SeedSequence`."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def sequence(self, *name: str) -> np.random.SeedSequence:
        return np.random.SeedSequence(entropy=self.seed, spawn_key=_name_key(name))

    def generator(self, *name: str) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(self.sequence(*name)))

    def integer_seed(self, *name: str) -> int:
        """A 63-bit seed for libraries that take an int (torch, sklearn)."""
        return int(self.sequence(*name).generate_state(2, dtype=np.uint32).astype(np.uint64) @ [1, 1 << 32]) >> 1

    def torch_generator(self, *name: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.integer_seed(*name))
