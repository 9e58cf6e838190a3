"""Codecs that turn a captured frame into the payload bytes that travel, and back."""

from __future__ import annotations

from iotbed.codecs.pixel_drop import (
    PixelDropCodec,
    PixelDropFormatError,
    check_mask,
    decode,
    drop_count,
    drop_mask,
    encode,
    encoded_size,
    mask_from_seed,
    real_drop_rate,
)

__all__ = [
    "PixelDropCodec",
    "PixelDropFormatError",
    "check_mask",
    "decode",
    "drop_count",
    "drop_mask",
    "encode",
    "encoded_size",
    "mask_from_seed",
    "real_drop_rate",
]
