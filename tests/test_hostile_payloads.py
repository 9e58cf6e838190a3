"""Decoders that no input can crash: crafted frames, model updates and quarantine notices either decode or
raise `MalformedPayload` (the pixel-drop codec alone: `PixelDropFormatError`), quickly and without
allocating what a header merely declares."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iotbed.broker import wire
from iotbed.broker.wire import MalformedPayload, WireCodec
from iotbed.codecs import pixel_drop
from iotbed.codecs.pixel_drop import PixelDropCodec, PixelDropFormatError
from iotbed.models import build_model, model_to_bytes
from iotbed.nodes.payloads import FRAME_HEADER, FRAME_MAGIC, Frame, ModelUpdate, Quarantine

SHAPE = (3, 32, 32)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
QUICK_S = 2.0  # every decode, valid or refused, takes less than this


def _frame_header(shape: tuple[int, int, int], codec: int, frame_id: int = 1) -> bytes:
    return FRAME_HEADER.pack(FRAME_MAGIC, wire.FRAME_FORMAT_VERSION, codec, *shape, frame_id, 0, 1.0, 0, 3)


def huge_pixel_drop_frame() -> bytes:
    """The reviewer's 62-byte frame: a 1x8x8 frame header over a pixel-drop body that declares 255 x 65535 x
    65535, one 65535-wide window, everything dropped, seed format: decoding it allocated 34 GB."""
    body = pixel_drop.HEADER.pack(pixel_drop.MAGIC, 1, 1, 255, 65535, 65535, 65535, 1.0) + pixel_drop.SEED.pack(7)
    return _frame_header((1, 8, 8), 1) + body


def all_dropped_frame(shape: tuple[int, int, int] = (1, 8192, 8192), frame_id: int = 1) -> bytes:
    """A consistent frame of `shape` in which every pixel is dropped (ws 1, rate 1, seed format): 27 bytes
    of body for any shape."""
    body = pixel_drop.HEADER.pack(pixel_drop.MAGIC, 1, 1, *shape, 1, 1.0) + pixel_drop.SEED.pack(7)
    return _frame_header(shape, 1, frame_id) + body


def forged_id_frame(frame_id: int = 10**9, shape: tuple[int, int, int] = SHAPE) -> bytes:
    """A well-formed raw frame with an id no camera handed out."""
    return _frame_header(shape, 0, frame_id) + bytes(int(np.prod(shape)))


def _valid_frames() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    raw = Frame(1, 0, 0.5, 0, 3, SHAPE, 0, pixels)
    out = [wire.encode_frame(raw)]
    for fmt in ("bitmap", "seed"):
        codec = PixelDropCodec(8, 0.1, fmt)  # type: ignore[arg-type]
        seed = 12345
        mask = pixel_drop.mask_from_seed(seed, 32, 32, 8, 0.1).numpy()
        body = pixel_drop.encode(pixels, mask, ws=codec.ws, rate=codec.rate, mask_format=fmt, seed=seed)  # type: ignore[arg-type]
        out.append(_frame_header(SHAPE, 1) + body)
    return out


VALID_FRAMES = _valid_frames()
VALID_BODIES = [f[FRAME_HEADER.size :] for f in VALID_FRAMES[1:]]


def _model_update() -> bytes:
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    return wire.encode_model_update(ModelUpdate(2, model_to_bytes(model)))


VALID_MODEL = _model_update()
VALID_QUARANTINE = wire.encode_quarantine(
    Quarantine(3, torch.rand(2, *SHAPE), "gw-0", valid=torch.rand(2, *SHAPE), valid_labels=torch.tensor([4, 7]))
)


def _decodes_or_refuses(fn, data: bytes, allowed: type[Exception] = MalformedPayload) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    try:
        fn(data)
    except allowed:
        pass
    assert time.monotonic() - started < QUICK_S


# -- the reviewer's crashes -----------------------------------------------------------------------------


def test_huge_pixel_drop_body_is_refused_not_allocated() -> None:
    data = huge_pixel_drop_frame()
    assert len(data) == 62
    with pytest.raises(MalformedPayload) as caught:
        wire.decode("frames/cam-0", data)
    assert caught.value.reason == "bad_shape"  # the body's shape is not the frame header's
    # the same body under a frame header that agrees with it: out of range before the codec is called
    body = data[FRAME_HEADER.size :]
    with pytest.raises(MalformedPayload, match="bad_shape"):
        wire.decode("frames/cam-0", _frame_header((255, 65535, 65535), 1) + body)
    # the codec on its own refuses it too, by its pixel budget
    with pytest.raises(PixelDropFormatError, match="pixel limit"):
        pixel_drop.decode(body)


def test_all_dropped_8192_frame_is_refused() -> None:
    data = all_dropped_frame()
    started = time.monotonic()
    with pytest.raises(MalformedPayload) as caught:
        WireCodec(frame_shape=SHAPE).decode("frames/cam-0", data)
    assert caught.value.reason == "bad_shape"
    # without the scenario's shape: over the pixel budget of the default 16 MiB frame
    with pytest.raises(MalformedPayload, match="bad_codec"):
        WireCodec().decode("frames/cam-0", data)
    assert time.monotonic() - started < QUICK_S
    # an all-dropped frame of the scenario's own shape is still a frame
    frame = WireCodec(frame_shape=SHAPE).decode("frames/cam-0", all_dropped_frame(SHAPE))
    assert frame.shape == SHAPE and bool(np.asarray(frame.mask).all())


def test_codec_with_a_frame_shape_refuses_other_shapes_and_sizes() -> None:
    codec = WireCodec(frame_shape=SHAPE)
    assert codec.max_frame_bytes == wire.max_frame_bytes_for(SHAPE)
    assert codec.max_frame_bytes == FRAME_HEADER.size + pixel_drop.HEADER.size + 128 + 3072 + wire.FRAME_BYTES_MARGIN
    for data in VALID_FRAMES:
        assert codec.decode("frames/cam-0", data).shape == SHAPE
    with pytest.raises(MalformedPayload, match="bad_shape"):
        codec.decode("frames/cam-0", forged_id_frame(shape=(3, 32, 31)))
    with pytest.raises(MalformedPayload, match="oversized"):
        codec.decode("frames/cam-0", VALID_FRAMES[0] + bytes(codec.max_frame_bytes))
    assert codec.decode("frames/cam-0", forged_id_frame()).frame_id == 10**9  # the edge counts it, not the codec
    with pytest.raises(ValueError):
        WireCodec(frame_shape=(3, 0, 32))


SIZE_FIELDS = st.sampled_from(["c", "h", "w", "ws", "body_c", "body_h", "body_w"])
HUGE = st.sampled_from([0, 1, 2, 255, 4096, 8192, 8193, 32768, 65535])


def _with_sizes(data: bytes, changes: list[tuple[str, int]]) -> bytes:
    """`data` (a pixel-drop frame) with frame-header or body-header size fields set."""
    buf = bytearray(data)
    frame = list(FRAME_HEADER.unpack_from(buf))
    body = list(pixel_drop.HEADER.unpack_from(buf, FRAME_HEADER.size))
    for field, value in changes:
        if field in ("c", "h", "w"):
            frame[3 + "chw".index(field)] = min(value, 255) if field == "c" else value
        elif field == "ws":
            body[6] = value
        else:
            body[3 + "chw".index(field[-1])] = min(value, 255) if field == "body_c" else value
    FRAME_HEADER.pack_into(buf, 0, *frame)
    pixel_drop.HEADER.pack_into(buf, FRAME_HEADER.size, *body)
    return bytes(buf)


@FUZZ
@given(
    st.sampled_from(VALID_FRAMES[1:]),
    st.lists(st.tuples(SIZE_FIELDS, HUGE), min_size=1, max_size=4),
    st.sampled_from([0.0, 0.5, 1.0]),
    st.integers(0, 64),
)
def test_huge_size_fields_never_crash_or_hang(frame: bytes, changes, rate: float, cut: int) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(_with_sizes(frame, changes))
    struct.pack_into("!d", data, FRAME_HEADER.size + pixel_drop.HEADER.size - 8, rate)
    data = bytes(data[: len(data) - cut] if cut else data)
    for codec in (WireCodec(), WireCodec(frame_shape=SHAPE)):
        _decodes_or_refuses(lambda d, codec=codec: codec.decode("frames/cam-0", d), data)
    # consistent all-dropped frames of every size the fields allow
    c = next((v for f, v in changes if f == "c"), 1) or 1
    h = next((v for f, v in changes if f == "h"), 8) or 1
    w = next((v for f, v in changes if f == "w"), 8) or 1
    _decodes_or_refuses(wire.decode_frame, all_dropped_frame((min(c, 255), h, w)))


# -- fuzz: random bytes and mutations of valid encodings ---------------------------------------------------


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    return bytes(buf[: max(0, len(buf) - cut)])


MUTATIONS = (
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6),
    st.sampled_from([0, 0, 0, 1, 7, 100, 10**6]),
)


@FUZZ
@given(st.binary(max_size=256))
def test_decode_frame_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(wire.decode_frame, data)
    _decodes_or_refuses(wire.decode_frame, _frame_header(SHAPE, 1) + data)
    _decodes_or_refuses(wire.decode_frame, _frame_header(SHAPE, 0) + data)


@FUZZ
@given(st.sampled_from(VALID_FRAMES), *MUTATIONS)
def test_decode_frame_mutations(frame: bytes, flips, cut: int) -> None:  # type: ignore[no-untyped-def]
    data = _mutate(frame, flips, cut)
    _decodes_or_refuses(wire.decode_frame, data)
    _decodes_or_refuses(lambda d: wire.decode_frame(d, frame_shape=SHAPE), data)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=256),
        st.builds(
            lambda b: pixel_drop.HEADER.pack(pixel_drop.MAGIC, 1, 1, 3, 32, 32, 8, 0.1) + b, st.binary(max_size=64)
        ),
    )
)
def test_pixel_drop_decode_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(pixel_drop.decode, data, PixelDropFormatError)


@FUZZ
@given(
    st.sampled_from(VALID_BODIES),
    *MUTATIONS,
    st.lists(st.tuples(st.sampled_from([3, 4, 5, 6, 7, 8, 9, 10, 11]), st.integers(0, 255)), max_size=4),
)
def test_pixel_drop_decode_mutations(body: bytes, flips, cut: int, header_flips) -> None:  # type: ignore[no-untyped-def]
    data = _mutate(_mutate(body, header_flips, 0), flips, cut)
    _decodes_or_refuses(pixel_drop.decode, data, PixelDropFormatError)
    _decodes_or_refuses(lambda d: pixel_drop.decode(d, shape=SHAPE), data, PixelDropFormatError)


@FUZZ
@given(st.binary(max_size=512))
def test_decode_model_update_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(wire.decode_model_update, data)
    _decodes_or_refuses(wire.decode_model_update, b"\0\0\0\2" + struct.pack("<Q", len(data)) + data)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(*MUTATIONS)
def test_decode_model_update_mutations(flips, cut: int) -> None:  # type: ignore[no-untyped-def]
    # mutations inside the JSON index and the first weights (the blob is ~250 kB; most positions are weights)
    data = _mutate(VALID_MODEL, [(p % 4096, v) for p, v in flips], cut)
    _decodes_or_refuses(wire.decode_model_update, data)
    _decodes_or_refuses(lambda d: wire.decode_model_update(d, check_model=True), data)


def test_decode_model_update_deeply_nested_index() -> None:
    index = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MalformedPayload, match="bad_model"):
        wire.decode_model_update(b"\0\0\0\1\0\0" + struct.pack("<Q", len(index)) + index)


@pytest.mark.parametrize("change", ["shape", "dtype", "extra", "missing", "checksum"])
def test_model_updates_that_do_not_fit_the_architecture(change: str) -> None:
    """What the edge's loader refuses (ModelError) is refused by a checking codec as `bad_model`."""
    import safetensors.torch

    from iotbed.errors import ModelError
    from iotbed.models import model_from_bytes
    from iotbed.models.store import _digest

    blob = VALID_MODEL[6:]
    metadata = wire.check_safetensors(blob)["__metadata__"]
    tensors = dict(safetensors.torch.load(blob))
    name = sorted(k for k in tensors if k.endswith("weight"))[0]
    if change == "shape":
        tensors[name] = torch.zeros(tensors[name].numel() + 1)
    elif change == "dtype":
        tensors[name] = tensors[name].double()
    elif change == "extra":
        tensors["backdoor.weight"] = torch.zeros(4)
    elif change == "missing":
        del tensors[name]
    if change != "checksum":
        metadata["weights_sha256"] = _digest(tensors)  # an attacker recomputes the checksum
    else:
        tensors[name] = tensors[name] + 1.0
    forged = safetensors.torch.save(tensors, metadata=metadata)
    with pytest.raises(ModelError):
        model_from_bytes(forged)
    data = wire.MODEL_VERSION.pack(5, 0) + forged
    assert wire.decode_model_update(data).version == 5  # the index alone is well-formed
    with pytest.raises(MalformedPayload, match="bad_model"):
        wire.decode_model_update(data, check_model=True)
    with pytest.raises(MalformedPayload, match="bad_model"):
        WireCodec(check_model=True).decode("models/lenet5", data)
    assert WireCodec(check_model=True).decode("models/lenet5", VALID_MODEL).version == 2


@FUZZ
@given(st.binary(max_size=256))
def test_decode_quarantine_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(wire.decode_quarantine, data)
    _decodes_or_refuses(wire.decode_quarantine, VALID_QUARANTINE[: wire.QUARANTINE_HEADER.size] + data)


@FUZZ
@given(st.sampled_from([VALID_QUARANTINE]), *MUTATIONS, st.lists(st.tuples(st.integers(2, 17), HUGE), max_size=4))
def test_decode_quarantine_mutations(notice: bytes, flips, cut: int, header) -> None:  # type: ignore[no-untyped-def]
    data = _mutate(_mutate(notice, [(p % wire.QUARANTINE_HEADER.size, v & 0xFF) for p, v in header], 0), flips, cut)
    _decodes_or_refuses(wire.decode_quarantine, data)


# --- regressions from `make fuzz` ------------------------------------------------------------------------------
def test_model_loader_refuses_a_deeply_nested_index_or_metadata() -> None:
    import json

    from iotbed.errors import ModelError
    from iotbed.models import model_from_bytes

    nested = b"[" * 100_000
    with pytest.raises(ModelError):
        model_from_bytes(struct.pack("<Q", len(nested)) + nested)
    blob = model_to_bytes(build_model("lenet5", in_channels=1, num_classes=10, image_size=28, mean=(0.5,), std=(0.25,)))
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"]["std"] = "[" * 100_000
    header.get("__metadata__", {}).pop("weights_sha256", None)
    text = json.dumps(header).encode()
    with pytest.raises(ModelError):
        model_from_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n :])


def test_scenario_loader_refuses_an_empty_tagged_int(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from iotbed import load_scenario
    from iotbed.errors import ScenarioError

    path = tmp_path / "fuzzed.yaml"
    path.write_text("!!int : strip1", encoding="utf-8")
    with pytest.raises(ScenarioError, match="fuzzed.yaml:1"):
        load_scenario(path)


def test_an_edge_server_counts_an_update_that_is_not_a_model() -> None:
    """A safetensors update whose weights do not fit the architecture it names is refused and counted."""
    import json

    import iotbed
    from iotbed.deployment import build_deployment
    from iotbed.runner import load_model_bytes, prepare

    scenario = iotbed.load_scenario(
        __import__("conftest").SCENARIOS / "quickstart.yaml", ["duration=1s", "registry.updates=[]"]
    )
    resolved, artefacts, _ = prepare(scenario, progress=False)
    deployment = build_deployment(resolved, artefacts, load_model_bytes)
    edge = deployment.nodes.edges[0]
    blob = model_to_bytes(build_model("lenet5", in_channels=1, num_classes=10, image_size=32, mean=(0.5,), std=(0.25,)))
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"]["num_classes"] = "43"  # the weights still have 10 outputs
    header["__metadata__"].pop("weights_sha256", None)
    text = json.dumps(header).encode()
    assert not edge._adopt(ModelUpdate(5, struct.pack("<Q", len(text)) + text + blob[8 + n :]))
    assert edge.refused_updates == 1 and edge.classifier.version == 1


def test_a_notice_carries_d_valid_and_its_labels_exactly() -> None:
    """CoDefend's own flow: the gateway's clean images and labels travel with the flagged frames, signed with
    them, and come back as sent (8-bit pixels, 16-bit labels); a notice without them has none."""
    images = (torch.randint(0, 256, (3, *SHAPE)) / 255.0).float()
    notice = Quarantine(5, images[:1], "gw-2", valid=images, valid_labels=torch.tensor([0, 3, 65535]))
    data = wire.encode_quarantine(notice)
    assert len(data) == notice.nbytes
    back = wire.decode_quarantine(data)
    assert back.valid is not None and back.valid_labels is not None
    assert torch.allclose(back.valid, images, atol=1e-6) and back.valid_labels.tolist() == [0, 3, 65535]
    assert wire.decode_quarantine(wire.encode_quarantine(Quarantine(5, images[:1], "gw-2"))).valid is None
    with pytest.raises(wire.MalformedPayload, match="bad_length|3 clean"):
        wire.decode_quarantine(data[:-1])
