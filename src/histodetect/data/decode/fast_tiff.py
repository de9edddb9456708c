"""Kaggle's uncompressed 8-bit RGB TIFFs, read straight from their bytes."""

from __future__ import annotations

import struct

import numpy as np


def _read_uncompressed_tiff(data: bytes) -> np.ndarray | None:
    """The pixels of a baseline uncompressed 8-bit RGB TIFF of one strip, else None.

    Kaggle's 220,025 train patches are such files. Reading the strip straight from
    the bytes is several times faster than Pillow's generic open/load path, which
    dominates `prepare` time on small files (benchmarks/prepare_speed.py). Anything
    else (compressed, tiled, planar, several pages) returns None and goes to `_decode`.
    """
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if data[:2] == b"II" else ">"
    (ifd_offset,) = struct.unpack_from(order + "I", data, 4)
    if ifd_offset + 2 > len(data):
        return None
    (n_entries,) = struct.unpack_from(order + "H", data, ifd_offset)
    next_ifd_at = ifd_offset + 2 + 12 * n_entries
    if next_ifd_at + 4 > len(data) or struct.unpack_from(order + "I", data, next_ifd_at) != (0,):
        return None  # a second page (a stack, or a thumbnail) is for _decode to judge
    # tag -> (type, count, the entry's value field read as one SHORT/LONG, its offset)
    tags: dict[int, tuple[int, int, int, int]] = {}
    for i in range(n_entries):
        entry_at = ifd_offset + 2 + 12 * i
        tag, field_type, count = struct.unpack_from(order + "HHI", data, entry_at)
        fmt = "H" if field_type == 3 else "I"
        (inline,) = struct.unpack_from(order + fmt, data, entry_at + 8)
        tags[tag] = (field_type, count, inline, entry_at + 8)

    def value(tag: int, default: int = -1) -> int:
        if tag not in tags:
            return default
        field_type, count, inline, _ = tags[tag]
        return inline if count == 1 and field_type in (3, 4) else -1

    def per_sample(tag: int) -> tuple[int, ...] | None:
        """A tag of three SHORTs, one per sample, stored at an offset."""
        if tag not in tags or tags[tag][:2] != (3, 3):
            return None
        (at,) = struct.unpack_from(order + "I", data, tags[tag][3])
        return struct.unpack_from(order + "HHH", data, at) if at + 6 <= len(data) else None

    bits_ok = per_sample(258) == (8, 8, 8)
    # SampleFormat unsigned (1, the default), once or per sample: int8 (2) is for `_decode` to refuse
    # or read; as uint8, -100 came out as 156.
    unsigned = value(339, 1) == 1 or per_sample(339) == (1, 1, 1)
    width, height = value(256), value(257)
    n_bytes = width * height * 3
    start, length = value(273), value(279)
    if not (
        bits_ok
        and unsigned
        and value(259, 1) == 1  # no compression
        and value(262) == 2  # RGB
        and value(277) == 3  # samples per pixel
        and value(284, 1) == 1  # chunky (interleaved) pixels
        and value(278, height) >= height  # one strip holds every row
        and width > 0
        and height > 0
        and length == n_bytes
        and 0 < start
        and start + n_bytes <= len(data)
    ):
        return None
    return np.frombuffer(data, dtype=np.uint8, count=n_bytes, offset=start).reshape(height, width, 3)
