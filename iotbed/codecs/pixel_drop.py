"""SUPER-IoT pixel drop, done on the device, and the wire format that carries a dropped frame.

The drop is the one in the authors' `rec_utils.random_drop`: the image is tiled into non-overlapping
ws x ws windows and in every *full* window exactly `round(ws**2 * rate)` positions are drawn uniformly
without replacement; those positions are dropped in all channels. Pixels outside full windows (the
right and bottom margins when ws does not divide the size) are never dropped. Because of the rounding the
real rate is not the nominal one: ws=8, rate=0.1 drops 6/64 = 9.4%.

Wire format (big endian), `HEADER` then the mask then the kept pixels:

    magic "PD" | version u8 | mask format u8 | channels u8 | height u16 | width u16 | ws u16 | rate f64
    mask:   "bitmap" -> ceil(H*W/8) bytes, np.packbits of the (H, W) mask in row-major order
            "seed"   -> 8 bytes, the u64 seed from which `mask_from_seed` regenerates the mask
    pixels: the kept uint8 values, channel by channel, each in row-major order (dropped ones are not sent)

A 32x32 RGB frame at ws=8, rate=0.1 (96 of 1024 positions dropped) is 19 + 128 + 3 * 928 = 2931 bytes
with a bitmap and 19 + 8 + 2784 = 2811 bytes with a seed, against 3072 bytes of raw pixels. The seed
format needs sender and receiver to run the same generator (torch's CPU Mersenne Twister via
`drop_mask`); the bitmap needs nothing shared.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from iotbed.errors import IotbedError

MaskFormat = Literal["bitmap", "seed"]

MAGIC = b"PD"
VERSION = 1
# magic, version, mask format, channels, height, width, window size, nominal drop rate
HEADER = struct.Struct("!2sBBBHHHd")
SEED = struct.Struct("!Q")
_MASK_CODES: dict[str, int] = {"bitmap": 0, "seed": 1}
_MASK_NAMES = {code: name for name, code in _MASK_CODES.items()}
MAX_SEED = 2**64 - 1
# `decode` refuses frames of more pixels (C*H*W) than a 3 x 2048 x 2048 one unless told otherwise: a header
# may declare up to 255 x 65535 x 65535, and regenerating a seed-format mask costs ~24 bytes per position.
MAX_DECODE_PIXELS = 3 * 2048 * 2048


class PixelDropFormatError(IotbedError, ValueError):
    """Bytes that are not a valid pixel-drop frame (truncated, wrong magic, inconsistent header)."""


def check_drop_params(ws: int, rate: float) -> None:
    """ValueError unless ws is a whole number >= 1 and rate lies in [0, 1]."""
    if isinstance(ws, bool) or not isinstance(ws, (int, np.integer)) or ws < 1:
        raise ValueError(f"window size ws must be a whole number >= 1, got {ws!r}")
    if ws > 0xFFFF:
        raise ValueError(f"window size ws must be at most 65535, got {ws}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"drop rate must be a number in [0, 1], got {rate!r}")


def drop_count(ws: int, rate: float) -> int:
    """Positions dropped in each full window: round(ws**2 * rate), with Python's (and NumPy's)
    round-half-to-even, as the authors' `np.round` does."""
    check_drop_params(ws, rate)
    return round(ws * ws * float(rate))


def real_drop_rate(height: int, width: int, ws: int, rate: float) -> float:
    """Dropped pixels / all pixels of an H x W image: 6/64 for a 32x32 image at ws=8, rate=0.1."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    windows = (height // ws) * (width // ws)
    return windows * drop_count(ws, rate) / (height * width)


def drop_mask(n: int, height: int, width: int, ws: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean masks (n, H, W), True = dropped, one independent draw per image.

    A uniformly random k-subset of each window is the k smallest of ws*ws i.i.d. uniforms, so one
    batched argsort draws every window of every image at once. float64 noise makes ties (which would
    bias the draw) practically impossible; the stable sort keeps the result reproducible from a seed.
    """
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"need n >= 0 images of a positive size, got n={n}, {height}x{width}")
    k = drop_count(ws, rate)
    nh, nw = height // ws, width // ws
    mask = torch.zeros(n, height, width, dtype=torch.bool)
    if k == 0 or nh == 0 or nw == 0 or n == 0:
        return mask
    noise = torch.rand(n, nh, nw, ws * ws, generator=generator, dtype=torch.float64)
    chosen = noise.argsort(dim=-1, stable=True)[..., :k]
    windows = torch.zeros(n, nh, nw, ws * ws, dtype=torch.bool)
    windows.scatter_(-1, chosen, True)
    # (n, nh, nw, ws, ws) -> (n, nh*ws, nw*ws): window rows next to image rows.
    mask[:, : nh * ws, : nw * ws] = windows.view(n, nh, nw, ws, ws).permute(0, 1, 3, 2, 4).reshape(n, nh * ws, nw * ws)
    return mask


def mask_from_seed(seed: int, height: int, width: int, ws: int, rate: float) -> torch.Tensor:
    """The (H, W) mask that the 8-byte `seed` stands for on the wire."""
    _check_seed(seed)
    return drop_mask(1, height, width, ws, rate, torch.Generator().manual_seed(int(seed)))[0]


def draw_seed(generator: torch.Generator) -> int:
    """A fresh mask seed (63 bits, fits the u64 field) from `generator`."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator))


def check_mask(mask: np.ndarray | torch.Tensor, ws: int, rate: float) -> np.ndarray:
    """The mask as a bool (H, W) array; ValueError unless it drops exactly drop_count(ws, rate) positions
    in every full window and nothing outside them."""
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    if m.dtype != np.bool_:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("mask must be boolean (or 0/1)")
        m = m.astype(bool)
    height, width = m.shape
    k = drop_count(ws, rate)
    nh, nw = height // ws, width // ws
    inner = m[: nh * ws, : nw * ws].reshape(nh, ws, nw, ws).sum(axis=(1, 3))
    if (inner != k).any():
        raise ValueError(f"mask must drop exactly {k} pixels in every full {ws}x{ws} window")
    if m[nh * ws :, :].any() or m[:, nw * ws :].any():
        raise ValueError("mask drops pixels outside the full windows")
    return m


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be a whole number in [0, 2**64 - 1], got {seed!r}")


def _mask_bytes(height: int, width: int, mask_format: str) -> int:
    if mask_format == "bitmap":
        return math.ceil(height * width / 8)
    if mask_format == "seed":
        return SEED.size
    raise ValueError(f"mask_format must be 'bitmap' or 'seed', got {mask_format!r}")


def encoded_size(shape: tuple[int, int, int], ws: int, rate: float, mask_format: MaskFormat = "bitmap") -> int:
    """Bytes of `encode` for a (C, H, W) frame: header + mask + kept pixels, exactly."""
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape!r}")
    c, h, w = (int(s) for s in shape)
    dropped = (h // ws) * (w // ws) * drop_count(ws, rate)
    return HEADER.size + _mask_bytes(h, w, mask_format) + c * (h * w - dropped)


def encode(
    image: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    *,
    ws: int,
    rate: float,
    mask_format: MaskFormat = "bitmap",
    seed: int | None = None,
) -> bytes:
    """One uint8 (C, H, W) frame with its drop mask as bytes; dropped pixel values are not sent.

    "bitmap" sends the mask (or the one `seed` regenerates); "seed" sends only `seed`, and a `mask`
    given along must be the one it regenerates.
    """
    img = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"image must be uint8 (C, H, W), got {img.dtype} {img.shape}")
    c, h, w = img.shape
    if c > 0xFF or h > 0xFFFF or w > 0xFFFF:
        raise ValueError(f"frame {img.shape} is too large for the header (C <= 255, H, W <= 65535)")
    _mask_bytes(h, w, mask_format)  # validates mask_format
    check_drop_params(ws, rate)
    if seed is not None:
        _check_seed(seed)
        from_seed = mask_from_seed(seed, h, w, ws, rate).numpy()
        if mask is not None and not np.array_equal(check_mask(mask, ws, rate), from_seed):
            raise ValueError("mask is not the one the seed regenerates")
        m = from_seed
    elif mask_format == "seed":
        raise ValueError("mask_format='seed' needs the seed the mask was drawn from")
    elif mask is None:
        raise ValueError("encode needs the drop mask (or its seed)")
    else:
        m = check_mask(mask, ws, rate)
    if m.shape != (h, w):
        raise ValueError(f"mask shape {m.shape} does not match the image's {(h, w)}")

    header = HEADER.pack(MAGIC, VERSION, _MASK_CODES[mask_format], c, h, w, ws, float(rate))
    mask_part = np.packbits(m, axis=None).tobytes() if mask_format == "bitmap" else SEED.pack(int(seed))  # type: ignore[arg-type]
    return header + mask_part + np.ascontiguousarray(img[:, ~m]).tobytes()


def decode(
    data: bytes,
    *,
    shape: tuple[int, int, int] | None = None,
    max_pixels: int = MAX_DECODE_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (C, H, W) with dropped pixels 0, mask bool (H, W)) from `encode`'s bytes.

    The bytes are untrusted: every field of the header is checked before anything is allocated. With
    `shape`, a frame of another (C, H, W) is refused; C*H*W over `max_pixels` is refused in any case (the
    header alone can declare 255 x 65535 x 65535, a seed-format frame that drops everything is 27 bytes).
    Raises `PixelDropFormatError` (a ValueError) for anything that is not a valid frame."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise PixelDropFormatError(f"a pixel-drop frame has at least {HEADER.size} bytes, got {len(view)}")
    magic, version, code, c, h, w, ws, rate = HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise PixelDropFormatError(f"not a pixel-drop frame (magic {magic!r}, version {version})")
    if code not in _MASK_NAMES or min(c, h, w, ws) < 1 or not 0.0 <= rate <= 1.0:  # a NaN rate fails too
        raise PixelDropFormatError(f"bad header: mask code {code}, shape {(c, h, w)}, ws {ws}, rate {rate}")
    if shape is not None and (c, h, w) != tuple(shape):
        raise PixelDropFormatError(f"frame of shape {(c, h, w)}, expected {tuple(shape)}")
    if c * h * w > max_pixels:
        raise PixelDropFormatError(f"frame of shape {(c, h, w)} is over the {max_pixels}-pixel limit")
    mask_format = _MASK_NAMES[code]
    expected = encoded_size((c, h, w), ws, rate, mask_format)  # type: ignore[arg-type]
    if len(view) != expected:
        raise PixelDropFormatError(f"frame of shape {(c, h, w)} should be {expected} bytes, got {len(view)}")
    try:
        return _decode_checked(view, mask_format, c, h, w, ws, rate)
    except PixelDropFormatError:
        raise
    except (ValueError, RuntimeError, MemoryError, OverflowError) as exc:  # not expected after the checks above
        raise PixelDropFormatError(f"cannot decode a {(c, h, w)} frame: {type(exc).__name__}: {exc}") from None


def _decode_checked(
    view: memoryview, mask_format: str, c: int, h: int, w: int, ws: int, rate: float
) -> tuple[np.ndarray, np.ndarray]:
    offset = HEADER.size
    if mask_format == "bitmap":
        nbytes = _mask_bytes(h, w, "bitmap")
        bits = np.frombuffer(view[offset : offset + nbytes], dtype=np.uint8)
        mask = np.unpackbits(bits, count=h * w).astype(bool).reshape(h, w)
        offset += nbytes
        try:
            check_mask(mask, ws, rate)
        except ValueError as exc:
            raise PixelDropFormatError(f"corrupt mask bitmap: {exc}") from None
    else:
        (seed,) = SEED.unpack_from(view, offset)
        mask = mask_from_seed(seed, h, w, ws, rate).numpy()
        offset += SEED.size
    pixels = np.zeros((c, h, w), dtype=np.uint8)
    pixels[:, ~mask] = np.frombuffer(view[offset:], dtype=np.uint8).reshape(c, -1)
    return pixels, mask


@dataclass(frozen=True)
class PixelDropCodec:
    """The device's encoder and the edge's decoder for one setting, for the network side."""

    ws: int = 8
    rate: float = 0.1
    mask_format: MaskFormat = "bitmap"

    def __post_init__(self) -> None:
        check_drop_params(self.ws, self.rate)
        _mask_bytes(1, 1, self.mask_format)

    def encode(self, image: np.ndarray | torch.Tensor, generator: torch.Generator) -> bytes:
        """Draw a mask for `image` (uint8 (C, H, W)) from `generator` and encode the dropped frame."""
        seed = draw_seed(generator)
        return encode(image, ws=self.ws, rate=self.rate, mask_format=self.mask_format, seed=seed)

    def decode(self, data: bytes, *, shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        return decode(data, shape=shape)

    def encoded_size(self, shape: tuple[int, int, int]) -> int:
        return encoded_size(shape, self.ws, self.rate, self.mask_format)

    def real_rate(self, height: int, width: int) -> float:
        return real_drop_rate(height, width, self.ws, self.rate)
