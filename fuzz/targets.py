"""The parsers a client or a user can reach, each with its seeds, its input generator and its refusal type.

`TARGETS[name].setup()` runs in the worker process (it imports torch and builds seed files there, not in the
parent, so forked workers never inherit a used OpenMP pool). It returns a `Harness`: `generate(rng)` makes
one input, `call(data)` feeds it to the parser, and an exception that is an instance of `refusal` is the
parser's documented way to say no.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mutators as mut

ROOT = Path(__file__).resolve().parent.parent
BODY_CAP = 2 << 20  # bodies a header asks for beyond this are cut short (the length check refuses them anyway)


@dataclass
class Harness:
    refusal: tuple[type[BaseException], ...]
    generate: Callable[[random.Random], bytes]
    call: Callable[[bytes], Any]
    cleanup: Callable[[], None] = lambda: None  # run when the worker ends normally


@dataclass(frozen=True)
class Target:
    name: str
    entry: str  # what is called, for the table
    refusal_name: str
    setup: Callable[[], Harness]


def _pick(rng: random.Random, weighted: Sequence[tuple[float, Callable[[], bytes]]]) -> bytes:
    x = rng.random() * sum(w for w, _ in weighted)
    for w, make in weighted:
        x -= w
        if x < 0:
            return make()
    return weighted[-1][1]()


# --- scenario files ---------------------------------------------------------------------------------------------


def _scenario() -> Harness:
    import yaml

    from iotbed.errors import ScenarioError
    from iotbed.scenario import load_scenario

    seeds = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "scenarios").rglob("*.yaml"))]
    keys: set[str] = set()
    for text in seeds:
        _collect_keys(yaml.safe_load(text), keys)
    vocab = sorted(keys)
    # load_scenario reads a file, so the UTF-8 decoding of user bytes is part of what is fuzzed.
    folder = tempfile.mkdtemp(prefix="iotbed-fuzz-")
    path = Path(folder) / "fuzzed.yaml"

    def generate(rng: random.Random) -> bytes:
        seed = rng.choice(seeds)
        return _pick(
            rng,
            [
                (0.70, lambda: mut.mutate_yaml(seed, rng, vocab).encode("utf-8", "surrogatepass")),
                (0.12, lambda: mut.mutate_bytes(seed.encode(), rng, [s.encode() for s in seeds])),
                (0.13, lambda: mut.random_yaml(rng, vocab).encode()),
                (0.05, lambda: mut.mutate_yaml(mut.random_yaml(rng, vocab), rng, vocab).encode()),
            ],
        )

    def call(data: bytes) -> Any:
        path.write_bytes(data)
        return load_scenario(path)

    return Harness((ScenarioError,), generate, call, lambda: shutil.rmtree(folder, ignore_errors=True))


def _collect_keys(node: Any, keys: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            keys.add(str(k))
            _collect_keys(v, keys)
    elif isinstance(node, list):
        for v in node:
            _collect_keys(v, keys)


# --- pixel-drop bodies, alone and inside frames ----------------------------------------------------------------


def _pixel_drop_seeds() -> list[bytes]:
    import numpy as np

    from iotbed.codecs import pixel_drop

    out = []
    rng = np.random.default_rng(0)
    for shape, ws, rate in (((3, 32, 32), 8, 0.1), ((1, 28, 28), 4, 0.25), ((1, 32, 32), 3, 0.5), ((4, 9, 5), 2, 1.0)):
        img = rng.integers(0, 256, shape).astype(np.uint8)
        for fmt in ("bitmap", "seed"):
            out.append(pixel_drop.encode(img, ws=ws, rate=rate, mask_format=fmt, seed=int(rng.integers(0, 2**63))))
    return out


def _drop_size(c: int, h: int, w: int, ws: int, rate: float, code: int) -> int | None:
    """The body length the format asks for, computed here from the spec (None if the header is nonsense)."""
    if ws < 1 or not 0.0 <= rate <= 1.0 or min(c, h, w) < 1:
        return None
    mask = math.ceil(h * w / 8) if code == 0 else 8
    dropped = (h // ws) * (w // ws) * round(ws * ws * rate)
    return 19 + mask + c * (h * w - dropped)


def _synth_pixel_drop(rng: random.Random, shape: tuple[int, int, int] | None = None) -> bytes:
    """A header with boundary values and a body of exactly the length it asks for, so decoding gets past the
    length check: huge H and W with ws=1, rate=1 and a seed mask is a 27-byte body."""
    import numpy as np

    from iotbed.codecs import pixel_drop

    dims = (1, 2, 7, 8, 28, 32, 33, 255, 1024, 4096, 8192, 8193, 65535)
    c, h, w = shape or (rng.choice((1, 3, 4, 255, 0)), rng.choice(dims), rng.choice(dims))
    ws = rng.choice((1, 1, 2, 3, 8, 16, 255, 4096, 65535, 0))
    rate = rng.choice((0.0, 0.1, 0.25, 0.5, 1.0, 1.0, rng.random(), 1e-300, math.nan, 1.0000000000000002))
    code = rng.choice((0, 1, 1, 2))
    header = struct.pack("!2sBBBHHHd", b"PD", 1, code, c, h, w, ws, rate)
    size = _drop_size(c, h, w, ws, rate, code)
    if size is None or size > BODY_CAP:
        return header + rng.randbytes(rng.choice((0, 8, 100)))
    if code == 0:
        if h * w <= 1 << 16 and rng.random() < 0.7:  # a valid mask, so the pixels are reached
            import torch

            m = pixel_drop.drop_mask(1, h, w, ws, rate, torch.Generator().manual_seed(rng.randrange(2**32)))[0]
            mask = np.packbits(m.numpy(), axis=None).tobytes()
        else:
            mask = rng.randbytes(math.ceil(h * w / 8))
    else:
        mask = struct.pack("!Q", rng.randrange(2**64))
    return header + mask + rng.randbytes(size - len(header) - len(mask))


def _pixel_drop() -> Harness:
    from iotbed.codecs import pixel_drop

    seeds = _pixel_drop_seeds()
    fields = mut.struct_fields(pixel_drop.HEADER.format)

    def generate(rng: random.Random) -> bytes:
        seed = rng.choice(seeds)
        return _pick(
            rng,
            [
                (0.35, lambda: mut.mutate_bytes(seed, rng, seeds)),
                (0.25, lambda: mut.mutate_fields(seed, fields, rng)),
                (0.30, lambda: _synth_pixel_drop(rng)),
                (0.10, lambda: mut.random_bytes(rng, [b"PD\x01\x00", b"PD\x01\x01"])),
            ],
        )

    return Harness((pixel_drop.PixelDropFormatError,), generate, pixel_drop.decode)


# --- frames ---------------------------------------------------------------------------------------------------


def _frame() -> Harness:
    import numpy as np

    from iotbed.broker import wire
    from iotbed.codecs.pixel_drop import PixelDropCodec
    from iotbed.nodes.payloads import FRAME_HEADER, Frame

    rng0 = np.random.default_rng(1)
    seeds = []
    for shape in ((1, 28, 28), (3, 32, 32), (1, 1, 1), (4, 5, 7)):
        pixels = rng0.integers(0, 256, shape).astype(np.uint8)
        seeds.append(wire.encode_frame(Frame(3, 1, 1.5, 9, 2, shape, 0), lambda f, p=pixels: p))
        for fmt, ws, rate in (("bitmap", 8, 0.1), ("seed", 8, 0.1), ("bitmap", 2, 0.5), ("seed", 3, 1.0)):
            if min(shape[1:]) >= ws:
                frame = Frame(4, 0, 2.0, 5, 1, shape, 0, drop=PixelDropCodec(ws, rate, fmt), mask_seed=2**62 + 5)
                seeds.append(wire.encode_frame(frame, lambda f, p=pixels: p))
    header_fields = mut.struct_fields(FRAME_HEADER.format)
    # a pixel-drop frame's fields: the frame header's, then the codec header's behind it
    drop_fields = header_fields + [(FRAME_HEADER.size + o, c) for o, c in mut.struct_fields("!2sBBBHHHd")]

    def synth(rng: random.Random) -> bytes:
        codec = rng.choice((0, 1, 1, 2))
        c = rng.choice((1, 3, 4, 0, 5, 255))
        h, w = (rng.choice((1, 2, 8, 28, 32, 1024, 4096, 8192, 8193, 65535)) for _ in range(2))
        t = rng.choice((0.0, 1.5, -1.0, math.inf, math.nan, 1e308))
        head = FRAME_HEADER.pack(b"IB", 1, codec, c, h, w, rng.randrange(2**64), 0, t, 0, rng.randrange(-1, 10))
        if codec == 1:
            return head + _synth_pixel_drop(rng, (c, h, w) if rng.random() < 0.8 else None)
        n = c * h * w
        return head + (rng.randbytes(n) if n <= BODY_CAP else rng.randbytes(rng.choice((0, 100))))

    def generate(rng: random.Random) -> bytes:
        seed = rng.choice(seeds)
        return _pick(
            rng,
            [
                (0.30, lambda: mut.mutate_bytes(seed, rng, seeds)),
                (0.25, lambda: mut.mutate_fields(seed, drop_fields if seed[3] == 1 else header_fields, rng)),
                (0.30, lambda: synth(rng)),
                (0.10, lambda: mut.random_bytes(rng, [b"IB\x01\x00", b"IB\x01\x01"])),
                (0.005, lambda: b"IB\x01\x00" + bytes(wire.DEFAULT_MAX_FRAME_BYTES)),  # one byte over the cap
            ],
        )

    def call(data: bytes) -> Any:
        # both ways in: the decoder itself, and the topic dispatch a subscriber uses (every other input)
        if data[-1:] and data[-1] & 1:
            return wire.decode("frames/cam-0", data)
        return wire.decode_frame(data)

    return Harness((wire.MalformedPayload,), generate, call)


# --- quarantine notices ---------------------------------------------------------------------------------------


def _quarantine() -> Harness:
    import torch

    from iotbed.broker import wire
    from iotbed.nodes.payloads import QUARANTINE_HEADER, Quarantine

    gen = torch.Generator().manual_seed(0)
    seeds = [
        wire.encode_quarantine(Quarantine(v, torch.rand(shape, generator=gen), name))
        for v, shape, name in ((1, (2, 1, 4, 4), "gw-0"), (7, (1, 3, 32, 32), "gateway-ü"), (0, (0, 1, 28, 28), ""))
    ]
    seeds.append(  # with D_valid: clean images and their labels
        wire.encode_quarantine(
            Quarantine(
                2,
                torch.rand(2, 1, 8, 8, generator=gen),
                "gw-1",
                valid=torch.rand(3, 1, 8, 8, generator=gen),
                valid_labels=torch.tensor([0, 9, 65535]),
            )
        )
    )
    fields = mut.struct_fields(QUARANTINE_HEADER.format)
    names = (b"gw-0", b"", b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\x80", "名前".encode(), b"\x00" * 255, b"a" * 300)

    def synth(rng: random.Random) -> bytes:
        name = rng.choice(names)
        k, m = (rng.choice((0, 1, 2, 100, 2**16, 2**32 - 1)) for _ in range(2))
        c, h, w = rng.choice((1, 3, 4, 0, 5)), rng.choice((1, 28, 8192, 65535)), rng.choice((1, 32, 8192, 0))
        head = QUARANTINE_HEADER.pack(
            b"IQ", rng.choice((2, 1, 3)), rng.randrange(2**32), k, m, c, h, w, min(len(name), 255)
        )
        n = (k + m) * c * h * w + 2 * m
        return head + name + (rng.randbytes(n) if n <= BODY_CAP else b"")

    def generate(rng: random.Random) -> bytes:
        seed = rng.choice(seeds)
        return _pick(
            rng,
            [
                (0.35, lambda: mut.mutate_bytes(seed, rng, seeds)),
                (0.25, lambda: mut.mutate_fields(seed, fields, rng)),
                (0.30, lambda: synth(rng)),
                (0.10, lambda: mut.random_bytes(rng, [b"IQ\x01"])),
            ],
        )

    def call(data: bytes) -> Any:
        if data[-1:] and data[-1] & 1:
            return wire.decode("models/quarantine", data)
        return wire.decode_quarantine(data)

    return Harness((wire.MalformedPayload,), generate, call)


# --- model updates --------------------------------------------------------------------------------------------


def _model_seeds() -> list[bytes]:
    """Untrained LeNet-5s (grey 28 px, RGB 32 px) as safetensors, the bytes a model update carries."""
    import torch

    from iotbed.models import build_model, model_to_bytes

    torch.manual_seed(0)
    return [
        model_to_bytes(
            build_model("lenet5", in_channels=c, num_classes=10, image_size=s, mean=(0.5,) * c, std=(0.25,) * c)
        )
        for c, s in ((1, 28), (3, 32))
    ]


_META_VALUES = ("0", "-1", "1", "2", "10", "65536", "99999999999", "1e9", "nan", "", "[]", "[1e999]", "[0.0]", "x")
_META_VALUES += (
    "[" * 100_000,
    '"' + "a" * 100 + '"',
    "lenet5",
    "gtsrb_cnn",
    "cifar_cnn",
    "tutorial_net",
    "iotbed-model",
)
_META_KEYS = ("arch", "in_channels", "num_classes", "image_size", "mean", "std", "format", "format_version")
_META_KEYS += ("weights_sha256",)
_DTYPES = ("F32", "F16", "BF16", "F64", "U8", "I64", "BOOL", "F8_E4M3", "X9", "")


def _mutate_safetensors(blob: bytes, rng: random.Random) -> bytes:
    """Edit the JSON index (dtypes, shapes, offsets, metadata), then write it back with a correct length."""
    (n,) = struct.unpack_from("<Q", blob)
    index: dict[str, Any] = json.loads(blob[8 : 8 + n])
    data = blob[8 + n :]
    names = [k for k in index if k != "__metadata__"]
    meta = index.setdefault("__metadata__", {})
    if rng.random() < 0.5:  # without the checksum, edited weights reach load_state_dict
        meta.pop("weights_sha256", None)
    edits = rng.choice((0, 1, 1, 2, 3))
    for _ in range(edits):
        # string metadata keeps the file valid safetensors, so it is what reaches the model builder most
        op = 0 if rng.random() < 0.35 else rng.randrange(8)
        name = rng.choice(names)
        entry = index.get(name)
        if op == 0:
            meta[rng.choice(_META_KEYS)] = rng.choice(_META_VALUES)
        elif op == 1:
            meta[rng.choice(_META_KEYS)] = rng.choice((None, 1, 1.5, [1], {"a": 1}, True))
        elif op == 2 and isinstance(entry, dict):
            entry["dtype"] = rng.choice((*_DTYPES, 1, None, ["F32"]))
        elif op == 3 and isinstance(entry, dict):
            shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else []
            choice = rng.randrange(4)
            if choice == 0 and shape:
                shape[rng.randrange(len(shape))] = rng.choice((0, -1, 1, 2**31, 2**63, 2**64, 1.5, "3", True, None))
            elif choice == 1:
                shape.append(rng.choice((0, 1, 2, 2**40)))
            elif choice == 2 and shape:
                shape.pop()
            else:
                shape = rng.choice(([], [0], [2**32, 2**32], None, 7))
            entry["shape"] = shape
        elif op == 4 and isinstance(entry, dict):
            offsets = entry.get("data_offsets")
            lo, hi = offsets if isinstance(offsets, list) and len(offsets) == 2 else (0, 8)
            entry["data_offsets"] = rng.choice(
                (
                    [hi, lo],
                    [0, hi - lo],
                    [lo, lo],
                    [lo, hi + 4],
                    [lo - 4, hi - 4],
                    [lo, 2**64],
                    [-1, hi],
                    [lo],
                    [lo, hi, 0],
                    [1.5, hi],
                    None,
                )
            )
        elif op == 5:  # drop an entry, or alias another tensor's bytes under a new name
            if rng.random() < 0.5:
                index.pop(name, None)
            else:
                index[rng.choice((name + "_x", "features.0.weight", "__metadata__x"))] = dict(entry or {})
        elif op == 6:
            index = rng.choice(({}, {"__metadata__": meta}, {"x": 1}, {name: entry, "__metadata__": 7}))
        else:  # the index is replaced by something that is not one
            return _with_header(
                rng.choice(("[]", "null", "1e999", "[" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000)), data
            )
    header = json.dumps(index)
    if edits == 0 or rng.random() < 0.2:
        data = mut.mutate_bytes(data, rng, max_len=len(data) + 4096)
    return _with_header(header, data)


def _with_header(header: str, data: bytes) -> bytes:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its index to 8 bytes
    return struct.pack("<Q", len(raw)) + raw + data


def _safetensors_input(seeds: list[bytes], rng: random.Random) -> bytes:
    seed = rng.choice(seeds)
    return _pick(
        rng,
        [
            (0.45, lambda: _mutate_safetensors(seed, rng)),
            (0.25, lambda: mut.mutate_bytes(seed, rng, seeds)),
            (0.15, lambda: mut.mutate_fields(seed, [(0, "Q")], rng, 1)),  # the header length alone
            (0.10, lambda: _with_header(mut.mutate_bytes(seed[8:2000], rng).decode("latin-1"), b"")),
            (0.05, lambda: mut.random_bytes(rng, [b"\x08\x00\x00\x00\x00\x00\x00\x00"])),
        ],
    )


def _model_update() -> Harness:
    from iotbed.broker import wire

    seeds = _model_seeds()

    metadata = [b"", *_signed_documents()[:2]]

    def generate(rng: random.Random) -> bytes:
        meta = rng.choice(metadata)
        declared = rng.choice((len(meta), len(meta), 0, 4096, 4097, 65535))
        head = struct.pack("!IH", rng.choice((0, 1, 2**32 - 1)), declared) + meta
        if rng.random() < 0.1:
            return head  # metadata only: a renewal
        return head + _safetensors_input(seeds, rng) if rng.random() < 0.95 else mut.random_bytes(rng)

    def call(data: bytes) -> Any:
        if data[-1:] and data[-1] & 1:
            return wire.decode("models/lenet5", data)
        return wire.decode_model_update(data)

    return Harness((wire.MalformedPayload,), generate, call)


def _model_loader() -> Harness:
    from iotbed.errors import ModelError
    from iotbed.runner import load_model_bytes

    seeds = _model_seeds()

    return Harness((ModelError,), lambda rng: _safetensors_input(seeds, rng), load_model_bytes)


def _signed_documents() -> list[bytes]:
    """Update metadata (by the registry, by an unknown key) and trust lists, as a run signs them."""
    from iotbed.sim.rng import RandomStreams
    from iotbed.trust.documents import Target as UpdateTarget
    from iotbed.trust.documents import TrustedKey, sign_trust_list, sign_update
    from iotbed.trust.keys import derive_key

    streams = RandomStreams(0)
    root, registry, other = (derive_key(streams, n) for n in ("root", "registry", "other"))
    target = UpdateTarget("digits", "lenet5")
    entries = [TrustedKey(registry.key_id, registry.public, "registry", "registry")]
    return [
        sign_update(registry, 2, "ab" * 32, target, 60.0),
        sign_update(other, 2**32 - 1, "00" * 32, target, 1e300),
        sign_trust_list(root, 1, entries),
        sign_trust_list(root, 2, [*entries, TrustedKey(other.key_id, other.public, "gateway", "gw-0")]),
    ]


def _signed_document() -> Harness:
    """What a device believes only after checking: update metadata and trust lists, through the verifier."""
    from iotbed.nodes.payloads import ModelUpdate
    from iotbed.sim.rng import RandomStreams
    from iotbed.trust.documents import Target as UpdateTarget
    from iotbed.trust.documents import TrustError, parse_trust_list
    from iotbed.trust.keys import derive_key
    from iotbed.trust.verifier import UpdateVerifier

    seeds = _signed_documents()
    root = derive_key(RandomStreams(0), "root")
    junk = (b"[" * 5000, b'{"signed":' * 3000, b"1e999", b"NaN", b'{"signed":{},"sig":"' + b"0" * 128 + b'"}')

    def generate(rng: random.Random) -> bytes:
        seed = rng.choice(seeds)
        return _pick(
            rng,
            [
                (0.6, lambda: mut.mutate_bytes(seed, rng, seeds, max_len=70_000)),
                (0.2, lambda: seed.replace(b'"', rng.choice((b"", b"'", b'""')), rng.randrange(1, 4))),
                (0.1, lambda: rng.choice(junk)),
                (0.1, lambda: mut.random_bytes(rng, [b'{"signed":'])),
            ],
        )

    def call(data: bytes) -> Any:
        verifier = UpdateVerifier(root.public, parse_trust_list(seeds[2]), UpdateTarget("digits", "lenet5"), 1, "")
        if data[-1:] and data[-1] & 1:
            return verifier.check_trust_list(data)
        return verifier.check_update(ModelUpdate(2, b"\x00" * 8, data), 0.0)

    return Harness((TrustError,), generate, call)


# --- encrypted frames -----------------------------------------------------------------------------------------


def _ciphertext() -> Harness:
    """What an edge parses from an encrypting camera: SEAL ciphertexts, and the public context it computes with."""
    import numpy as np

    from iotbed.broker import wire
    from iotbed.models import build_model
    from iotbed.nodes.payloads import EncryptedFrame, EncryptedResult, EncryptedRound
    from iotbed.privacy.ckks import CkksParams, ciphertext_size_bound, generate_keys
    from iotbed.privacy.encrypted_cnn import EncryptedCnn, evaluation_context

    model = build_model("he_cnn", in_channels=1, num_classes=10, image_size=28, mean=[0.0], std=[1.0]).eval()
    net = EncryptedCnn(model, CkksParams())
    owner = generate_keys(net.params, net.rotations, seed=1)
    context = evaluation_context(net.params)
    fresh = net.encrypt(owner.public_key, np.full((1, 28, 28), 0.5), seed=2)[0]
    result = net.evaluate(context, owner.public, [fresh])
    seeds = [fresh, result]
    framed = [
        wire.encode(EncryptedFrame(1, 0, "cam-0", [fresh])),
        wire.encode(EncryptedResult(1, 1, result)),
        wire.encode(EncryptedRound(1, 1, "edge-0", result)),
        wire.encode(EncryptedFrame(2**64 - 1, 2**32 - 1, "c" * 64, [b"\x5e\xa1", b""])),
    ]
    seeds += framed
    limits = (net.channels, ciphertext_size_bound(net.params))
    public = owner.public.to_bytes()
    # SEAL's header: magic, header size, version major/minor, compression, reserved, then the size (little-endian)
    fields = [(0, "H"), (2, "B"), (3, "B"), (4, "B"), (5, "B"), (6, "H"), (8, "Q")]

    def generate(rng: random.Random) -> bytes:
        seed = rng.choice(seeds)
        return _pick(
            rng,
            [
                (0.40, lambda: mut.mutate_bytes(seed, rng, seeds, max_len=1 << 21)),
                (0.30, lambda: bytes(_le_fields(seed, fields, rng))),
                (0.15, lambda: mut.random_bytes(rng, [b"\x5e\xa1", b"IK\x01", b"IE\x01", b"IR\x01", b"IN\x01"])),
                (0.15, lambda: _flip_or_fields(public, rng)),
            ],
        )

    def call(data: bytes) -> Any:
        if data[:2] == b"IK":
            return wire.decode("privacy/context/cam-0", data, encrypted=limits).keys(context)
        if data[:2] == b"IE":
            return net.load_inputs(context, wire.decode("frames/cam-0", data, encrypted=limits).ciphertexts)
        if data[:2] == b"IR":
            return wire.decode("privacy/results/cam-0", data, encrypted=limits)
        if data[:2] == b"IN":
            return wire.decode("privacy/replies/edge-0", data, encrypted=limits)
        return net.load_inputs(context, [data])

    return Harness((ValueError,), generate, call)


def _flip_or_fields(data: bytes, rng: random.Random) -> bytes:
    """A public context with its lengths changed, or a few bytes flipped where the keys are."""
    from iotbed.privacy.ckks import _CONTEXT_HEAD

    if rng.random() < 0.5:
        return mut.mutate_fields(data, mut.struct_fields(_CONTEXT_HEAD.format), rng)
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _le_fields(data: bytes, fields: Sequence[tuple[int, str]], rng: random.Random) -> bytearray:
    buf = bytearray(data)
    for offset, code in rng.sample(list(fields), k=rng.randint(1, 3)):
        if offset + struct.calcsize(code) <= len(buf):
            mut.set_field(buf, offset, code, mut.interesting_value(rng, code), order="<")
    return buf


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("scenario", "iotbed.scenario.load_scenario (file bytes)", "ScenarioError", _scenario),
        Target("frame", "wire.decode_frame / wire.decode('frames/cam-0')", "MalformedPayload", _frame),
        Target("pixel_drop", "iotbed.codecs.pixel_drop.decode", "PixelDropFormatError", _pixel_drop),
        Target(
            "model_update", "wire.decode_model_update / wire.decode('models/..')", "MalformedPayload", _model_update
        ),
        Target("model_loader", "iotbed.runner.load_model_bytes", "ModelError", _model_loader),
        Target(
            "quarantine", "wire.decode_quarantine / wire.decode('models/quarantine')", "MalformedPayload", _quarantine
        ),
        Target(
            "signed_document",
            "UpdateVerifier.check_update / check_trust_list (update metadata, trust lists)",
            "TrustError",
            _signed_document,
        ),
        Target(
            "ciphertext",
            "wire.decode (encrypted frames, results, contexts) / EncryptedCnn.load_inputs",
            "ValueError",
            _ciphertext,
        ),
    )
}
