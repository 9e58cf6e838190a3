"""Property tests of the SUPER-IoT pixel drop and its wire format (iotbed.codecs.pixel_drop)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iotbed.codecs import (
    PixelDropCodec,
    PixelDropFormatError,
    decode,
    drop_count,
    drop_mask,
    encode,
    encoded_size,
    mask_from_seed,
    real_drop_rate,
)
from iotbed.codecs.pixel_drop import HEADER, draw_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


FAST = settings(max_examples=40, deadline=None)


def window_counts(mask: np.ndarray, ws: int) -> np.ndarray:
    h, w = mask.shape[-2:]
    nh, nw = h // ws, w // ws
    return mask[..., : nh * ws, : nw * ws].reshape(*mask.shape[:-2], nh, ws, nw, ws).sum(axis=(-3, -1))


@FAST
@given(
    ws=st.integers(1, 9),
    rate=st.floats(0.0, 1.0),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    seed=st.integers(0, 2**32),
)
def test_every_full_window_drops_exactly_round_ws2_rate(ws: int, rate: float, h: int, w: int, seed: int) -> None:
    mask = drop_mask(3, h, w, ws, rate, torch.Generator().manual_seed(seed)).numpy()
    k = round(ws * ws * rate)
    assert drop_count(ws, rate) == k
    assert (window_counts(mask, ws) == k).all()
    nh, nw = h // ws, w // ws
    assert not mask[:, nh * ws :, :].any() and not mask[:, :, nw * ws :].any()  # margins never dropped
    assert mask.sum() == 3 * nh * nw * k


def test_real_drop_rate_reports_the_rounding() -> None:
    assert real_drop_rate(32, 32, 8, 0.1) == 6 / 64
    assert real_drop_rate(32, 32, 8, 0.01) == 1 / 64
    assert real_drop_rate(32, 32, 4, 0.1) == 2 / 16
    assert real_drop_rate(30, 30, 8, 0.1) == 9 * 6 / 900  # 3x3 full windows only
    assert drop_count(2, 0.125) == 0  # 0.5 rounds half to even, like the authors' np.round


def test_drop_positions_are_uniform_within_windows() -> None:
    # 4000 draws of one 4x4 window at k = 4: each position is dropped with probability 1/4.
    masks = drop_mask(4000, 4, 4, 4, 0.25, torch.Generator().manual_seed(7)).numpy()
    freq = masks.mean(axis=0)
    assert np.abs(freq - 0.25).max() < 5 * math.sqrt(0.25 * 0.75 / 4000)
    assert len({m.tobytes() for m in masks[:200]}) > 150  # draws differ


def test_masks_are_reproducible_from_the_generator_and_independent_per_image() -> None:
    a = drop_mask(4, 32, 32, 8, 0.1, torch.Generator().manual_seed(3))
    b = drop_mask(4, 32, 32, 8, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


@FAST
@given(
    c=st.sampled_from([1, 3]),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    ws=st.integers(1, 8),
    rate=st.floats(0.0, 1.0),
    fmt=st.sampled_from(["bitmap", "seed"]),
    seed=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_decode_encode_keeps_every_kept_pixel_and_the_mask(
    c: int, h: int, w: int, ws: int, rate: float, fmt: str, seed: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    image = rng.integers(0, 256, size=(c, h, w), dtype=np.uint8)
    mask = mask_from_seed(seed, h, w, ws, rate).numpy()
    payload = encode(image, mask, ws=ws, rate=rate, mask_format=fmt, seed=seed)  # type: ignore[arg-type]
    assert len(payload) == encoded_size((c, h, w), ws, rate, fmt)  # type: ignore[arg-type]
    pixels, decoded_mask = decode(payload)
    assert np.array_equal(decoded_mask, mask)
    assert pixels.dtype == np.uint8 and pixels.shape == image.shape
    assert np.array_equal(pixels[:, ~mask], image[:, ~mask])  # bit for bit
    assert not pixels[:, mask].any()  # dropped come back as 0


def test_seed_format_regenerates_the_mask_and_sizes_are_the_documented_ones() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    seed = draw_seed(torch.Generator().manual_seed(11))
    mask = mask_from_seed(seed, 32, 32, 8, 0.1).numpy()
    by_seed = encode(image, ws=8, rate=0.1, mask_format="seed", seed=seed)
    by_bitmap = encode(image, mask, ws=8, rate=0.1, mask_format="bitmap")
    assert np.array_equal(decode(by_seed)[1], mask)
    assert np.array_equal(decode(by_seed)[0], decode(by_bitmap)[0])
    # header 19 B; 96 of 1024 positions dropped -> 3 * 928 kept bytes; bitmap 128 B or seed 8 B
    assert HEADER.size == 19
    assert len(by_bitmap) == encoded_size((3, 32, 32), 8, 0.1, "bitmap") == 19 + 128 + 2784 == 2931
    assert len(by_seed) == encoded_size((3, 32, 32), 8, 0.1, "seed") == 19 + 8 + 2784 == 2811


def test_codec_object_round_trips_with_a_generator() -> None:
    codec = PixelDropCodec(ws=4, rate=0.1, mask_format="seed")
    image = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    payload = codec.encode(image, torch.Generator().manual_seed(5))
    pixels, mask = codec.decode(payload)
    assert len(payload) == codec.encoded_size((3, 16, 16))
    assert mask.sum() == 16 * 2 and codec.real_rate(16, 16) == 2 / 16
    assert np.array_equal(pixels[:, ~mask], image[:, ~mask])


@pytest.mark.parametrize("ws", [0, -1, 2.5, True, "8", 70000])
def test_invalid_window_size_raises(ws: object) -> None:
    with pytest.raises(ValueError, match="ws"):
        drop_count(ws, 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PixelDropCodec(ws=ws, rate=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "0.1", None])
def test_invalid_rate_raises(rate: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        drop_count(8, rate)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encoded_size((3, 32, 32), 8, rate)  # type: ignore[arg-type]


def test_encode_rejects_bad_masks_formats_and_seeds() -> None:
    image = np.zeros((3, 16, 16), dtype=np.uint8)
    mask = mask_from_seed(1, 16, 16, 8, 0.1).numpy()
    wrong = mask.copy()
    wrong[0, :] = True  # too many drops in the top windows
    with pytest.raises(ValueError, match="exactly"):
        encode(image, wrong, ws=8, rate=0.1)
    with pytest.raises(ValueError, match="seed regenerates"):
        encode(image, mask_from_seed(2, 16, 16, 8, 0.1), ws=8, rate=0.1, mask_format="seed", seed=1)
    with pytest.raises(ValueError, match="needs the seed"):
        encode(image, mask, ws=8, rate=0.1, mask_format="seed")
    with pytest.raises(ValueError, match="mask_format"):
        encode(image, mask, ws=8, rate=0.1, mask_format="png")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        encode(image.astype(np.float32), mask, ws=8, rate=0.1)
    with pytest.raises(ValueError, match="seed"):
        mask_from_seed(-1, 16, 16, 8, 0.1)


def test_decode_rejects_corrupt_frames() -> None:
    image = np.full((1, 16, 16), 7, dtype=np.uint8)
    payload = encode(image, mask_from_seed(3, 16, 16, 8, 0.25).numpy(), ws=8, rate=0.25)
    with pytest.raises(PixelDropFormatError, match="at least"):
        decode(payload[:10])
    with pytest.raises(PixelDropFormatError, match="bytes"):
        decode(payload[:-1])
    with pytest.raises(PixelDropFormatError, match="magic"):
        decode(b"XX" + payload[2:])
    flipped = bytearray(payload)
    flipped[HEADER.size] ^= 0xFF  # eight more or fewer drops in the first window row
    with pytest.raises(PixelDropFormatError, match="mask"):
        decode(bytes(flipped))
    assert issubclass(PixelDropFormatError, ValueError)
