"""CKKS parameters, keys and their bytes, on Microsoft SEAL through TenSEAL's bindings (`tenseal.sealapi`).

Parameters are named as TenSEAL names them (`poly_modulus_degree`, `coeff_mod_bit_sizes`, `global_scale`
as a power of two) and checked before anything runs: 128-bit security by SEAL's own table of the largest
modulus for each ring degree (the HomomorphicEncryption.org standard), and a modulus chain long enough for
the network's multiplications.

Randomness: SEAL draws key and encryption noise from a PRNG factory. A factory given a seed hands the *same*
seed to every PRNG it makes, so one seeded context would encrypt every frame with the same randomness (the
difference of two ciphertexts would then leak the difference of the images). Keys come from a context seeded
once per key owner; every encryption gets a context of its own, seeded from the frame's random stream. Runs
stay reproducible and no two encryptions share noise.

SEAL serialises only to files in this binding; the bytes go through a temporary file in memory-backed
storage where there is one.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iotbed.errors import ScenarioError

try:
    import tenseal.sealapi as seal
except ImportError:  # pragma: no cover - tenseal is a dependency; this names the fix if it is missing
    seal = None

SEAL_DEGREES = (1024, 2048, 4096, 8192, 16384, 32768)
MIN_PRIME_BITS, MAX_PRIME_BITS = 20, 60  # SEAL's CoeffModulus.Create takes 20..60-bit primes


def require_seal() -> Any:
    if seal is None:
        raise ScenarioError("encrypted inference needs TenSEAL: pip install tenseal==0.3.18 (it ships SEAL)")
    return seal


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters as TenSEAL names them; the defaults are its encrypted-MNIST tutorial's."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (31, 26, 26, 26, 26, 26, 26, 31)
    global_scale_bits: int = 26  # TenSEAL's global_scale = 2**26

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        """Rescalings the chain allows: every prime but the first (it keeps the result) and the last (SEAL's
        key-switching prime)."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def scale(self) -> float:
        return float(2**self.global_scale_bits)

    def problems(self, depth_needed: int | None = None) -> list[str]:
        """What is wrong with these parameters, each with its fix; empty when they are usable."""
        n, bits = self.poly_modulus_degree, self.coeff_mod_bit_sizes
        if n not in SEAL_DEGREES:
            return [f"poly_modulus_degree must be one of {', '.join(map(str, SEAL_DEGREES))} (got {n})"]
        out = []
        if len(bits) < 3:
            out.append(f"coeff_mod_bit_sizes needs at least 3 primes (got {list(bits)})")
        if any(not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS for b in bits):
            out.append(
                f"each of coeff_mod_bit_sizes must be {MIN_PRIME_BITS}..{MAX_PRIME_BITS} bits (got {list(bits)})"
            )
        limit = max_modulus_bits(n)
        if sum(bits) > limit:
            bigger = next((d for d in SEAL_DEGREES if max_modulus_bits(d) >= sum(bits)), None)
            fix = f"raise poly_modulus_degree to {bigger}" if bigger else "use fewer or smaller primes"
            out.append(
                f"coeff_mod_bit_sizes sum to {sum(bits)} bits, above the {limit} that poly_modulus_degree {n} "
                f"allows at 128-bit security: {fix}, or drop primes"
            )
        middle = bits[1:-1]
        if middle and any(b != self.global_scale_bits for b in middle):
            out.append(
                f"the middle primes of coeff_mod_bit_sizes ({list(middle)}) must equal global_scale's "
                f"{self.global_scale_bits} bits, so that each rescaling keeps the scale"
            )
        if bits and bits[0] < self.global_scale_bits + 4:
            out.append(
                f"the first prime ({bits[0]} bits) must exceed global_scale ({self.global_scale_bits} bits) by at "
                "least 4 bits, or results above 16 in magnitude wrap around"
            )
        if depth_needed is not None and self.depth < depth_needed:
            out.append(
                f"the network needs {depth_needed} multiplications but coeff_mod_bit_sizes allows {self.depth}: "
                f"give it {depth_needed + 2} primes (first, {depth_needed} x {self.global_scale_bits}, last)"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "global_scale_bits": self.global_scale_bits,
        }


def max_modulus_bits(poly_modulus_degree: int) -> int:
    """The largest total modulus at 128-bit classical security (SEAL's table)."""
    s = require_seal()
    return int(s.CoeffModulus.MaxBitCount(poly_modulus_degree, s.SEC_LEVEL_TYPE.TC128))


def seed_words(seed: int) -> list[int]:
    """SEAL's PRNG seed (eight 64-bit words) from one integer."""
    return [int(w) for w in np.random.SeedSequence(seed).generate_state(8, dtype=np.uint64)]


def seal_context(params: CkksParams, seed: int | None = None) -> Any:
    """A SEAL context for `params`; with `seed`, every PRNG it makes starts from that seed (see the module
    docstring: use one per key generation or per encryption, never for two encryptions)."""
    s = require_seal()
    parms = s.EncryptionParameters(s.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(s.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
    if seed is not None:
        parms.set_random_generator(s.Blake2xbPRNGFactory(seed_words(seed)))
    context = s.SEALContext(parms, True, s.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ScenarioError(
            f"SEAL refused the CKKS parameters {params.to_dict()}: {context.parameters_error_message()}"
        )
    return context


def galois_elements(steps: Sequence[int], poly_modulus_degree: int) -> list[int]:
    """SEAL's Galois element for a left rotation by each step (3^step mod 2N)."""
    return [pow(3, step, 2 * poly_modulus_degree) for step in sorted(set(steps))]


_SHM = Path("/dev/shm")


@contextlib.contextmanager
def _scratch_file() -> Iterator[str]:
    directory = str(_SHM) if _SHM.is_dir() and os.access(_SHM, os.W_OK) else None
    fd, path = tempfile.mkstemp(prefix="iotbed-seal-", dir=directory)
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def seal_bytes(obj: Any) -> bytes:
    """The serialised bytes of a SEAL object (or of a `Serializable` from a key generator)."""
    with _scratch_file() as path:
        obj.save(path)
        return Path(path).read_bytes()


SEAL_MAGIC = b"\x5e\xa1"
_SEAL_HEADER_BYTES = 16


def seal_load(obj: Any, context: Any, data: bytes) -> Any:
    """Load SEAL bytes into `obj` (a fresh Ciphertext or key object) and check them against `context`.
    Raises ValueError for anything SEAL refuses or that is not valid for these parameters."""
    s = require_seal()
    # SEAL's header: magic 0xA15E, then at offset 8 the object's size in bytes (little-endian).
    if len(data) < _SEAL_HEADER_BYTES or data[:2] != SEAL_MAGIC:
        raise ValueError("not a SEAL object (no SEAL header)")
    if int.from_bytes(data[8:16], "little") != len(data):
        raise ValueError("SEAL object's size does not match the message")
    with _scratch_file() as path:
        Path(path).write_bytes(data)
        try:
            obj.load(context, path)
        except Exception as exc:  # SEAL raises several C++ exception types through pybind
            raise ValueError(f"not a SEAL object for these parameters: {exc}") from exc
    if not s.is_valid_for(obj, context):
        raise ValueError("SEAL object not valid for these parameters")
    return obj


# A public context on the wire: magic, format version, then four length-prefixed SEAL blobs.
CONTEXT_MAGIC = b"IK"
_CONTEXT_HEAD = struct.Struct("!2sBIII")


@dataclass
class PublicContext:
    """What a camera uploads so that others can compute on its ciphertexts: public, relinearisation and
    Galois keys, as SEAL serialises them (the Galois keys half-seeded, as SEAL saves fresh keys)."""

    params: CkksParams | None  # None when read off the wire: the receiver checks the keys against its own
    public_key: bytes
    relin_keys: bytes
    galois_keys: bytes
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return _CONTEXT_HEAD.size + len(self.public_key) + len(self.relin_keys) + len(self.galois_keys)

    def to_bytes(self) -> bytes:
        head = _CONTEXT_HEAD.pack(CONTEXT_MAGIC, 1, len(self.public_key), len(self.relin_keys), len(self.galois_keys))
        return head + self.public_key + self.relin_keys + self.galois_keys

    @classmethod
    def from_bytes(cls, data: bytes, params: CkksParams | None, max_bytes: int) -> PublicContext:
        """Parse (not yet load) a public context; lengths are checked against the message before any use."""
        if len(data) > max_bytes:
            raise ValueError(f"public context of {len(data)} bytes, above the {max_bytes} allowed")
        if len(data) < _CONTEXT_HEAD.size:
            raise ValueError("public context shorter than its header")
        magic, version, n_pk, n_rk, n_gk = _CONTEXT_HEAD.unpack_from(data)
        if magic != CONTEXT_MAGIC or version != 1:
            raise ValueError("not an iotbed public context")
        if _CONTEXT_HEAD.size + n_pk + n_rk + n_gk != len(data):
            raise ValueError("public context lengths do not add up to the message")
        at = _CONTEXT_HEAD.size
        pk, rk, gk = data[at : at + n_pk], data[at + n_pk : at + n_pk + n_rk], data[at + n_pk + n_rk :]
        return cls(params, pk, rk, gk)

    def keys(self, context: Any) -> tuple[Any, Any, Any]:
        """(public key, relin keys, Galois keys) as SEAL objects, loaded once; ValueError if SEAL refuses. They
        are checked against the first context given and reused for later ones: SEAL keys hold no context,
        only the parameters' id, which every context of the same parameters shares."""
        if not self._loaded:
            s = require_seal()
            self._loaded = {
                "pk": seal_load(s.PublicKey(), context, self.public_key),
                "rk": seal_load(s.RelinKeys(), context, self.relin_keys),
                "gk": seal_load(s.GaloisKeys(), context, self.galois_keys),
            }
        return self._loaded["pk"], self._loaded["rk"], self._loaded["gk"]


@dataclass
class KeyOwner:
    """Whoever holds a secret key (a camera, or a key-holding node): its context, keys and public context."""

    params: CkksParams
    context: Any
    secret_key: Any
    public_key: Any
    public: PublicContext


def generate_keys(params: CkksParams, rotations: Sequence[int], seed: int) -> KeyOwner:
    """Secret and public keys for `params`, with Galois keys for exactly the left rotations `rotations`."""
    s = require_seal()
    context = seal_context(params, seed)
    generator = s.KeyGenerator(context)
    public_key = s.PublicKey()
    generator.create_public_key(public_key)
    relin = generator.create_relin_keys()
    galois = generator.create_galois_keys(galois_elements(rotations, params.poly_modulus_degree))
    public = PublicContext(params, seal_bytes(public_key), seal_bytes(relin), seal_bytes(galois))
    return KeyOwner(params, context, generator.secret_key(), public_key, public)


def ciphertext_size_bound(params: CkksParams) -> int:
    """An upper bound on a serialised fresh ciphertext: two polynomials of 64-bit words per prime, plus
    SEAL's header (compression only shrinks it)."""
    data_primes = len(params.coeff_mod_bit_sizes) - 1
    return 2 * params.poly_modulus_degree * data_primes * 8 + 4096
