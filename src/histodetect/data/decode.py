"""Decode one patch image file to uint8 RGB, and hash its pixels.

Decoding never raises for a bad file: it returns the reason, so that `prepare`
can report every bad file (or skip them with `--skip-bad`) from worker processes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

PATCH_SIZE_PX = 96
PATCH_SHAPE = (PATCH_SIZE_PX, PATCH_SIZE_PX, 3)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

# Pillow refuses images over ~89 Mpx with a DecompressionBombError; a patch file
# is 96x96, so anything above this is not a patch and is refused before decoding.
MAX_PATCH_FILE_PIXELS = 4096 * 4096


def patch_sha1(patch_uint8: np.ndarray) -> str:
    """SHA-1 of a patch's decoded RGB bytes (row-major H, W, C); equals a Kaggle id."""
    return hashlib.sha1(np.ascontiguousarray(patch_uint8, dtype=np.uint8).tobytes()).hexdigest()


@dataclass(frozen=True)
class Decoded:
    """A decoded patch, or the reason it could not be decoded."""

    patch: np.ndarray | None  # (96, 96, 3) uint8, None when `error` is set
    error: str | None = None  # why the file is bad, e.g. "not an image"
    converted_from: str | None = None  # original mode when it was not RGB, e.g. "RGBA"
    resized_from: tuple[int, int] | None = None  # original (width, height) when resized


def _read_uncompressed_tiff(data: bytes) -> np.ndarray | None:
    """The pixels of a baseline uncompressed 8-bit RGB TIFF of one strip, else None.

    Kaggle's 220,025 train patches are such files. Reading the strip straight from
    the bytes is several times faster than Pillow's generic open/load path, which
    dominates `prepare` time on small files (benchmarks/prepare_speed.py). Anything
    else (compressed, tiled, planar, other sizes) returns None and goes to Pillow.
    """
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if data[:2] == b"II" else ">"
    (ifd_offset,) = struct.unpack_from(order + "I", data, 4)
    if ifd_offset + 2 > len(data):
        return None
    (n_entries,) = struct.unpack_from(order + "H", data, ifd_offset)
    if ifd_offset + 2 + 12 * n_entries > len(data):
        return None
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

    bits_ok = False
    if 258 in tags and tags[258][:2] == (3, 3):  # three SHORTs stored at an offset
        (bits_at,) = struct.unpack_from(order + "I", data, tags[258][3])
        bits_ok = bits_at + 6 <= len(data) and struct.unpack_from(order + "HHH", data, bits_at) == (8, 8, 8)
    width, height = value(256), value(257)
    n_bytes = width * height * 3
    start, length = value(273), value(279)
    if not (
        bits_ok
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


def _to_patch(pixels: np.ndarray, path: Path, resize: bool) -> Decoded:
    height, width = pixels.shape[:2]
    if (height, width) == PATCH_SHAPE[:2]:
        return Decoded(np.ascontiguousarray(pixels))
    if not resize:
        return Decoded(None, f"is {width}x{height} pixels, expected 96x96 (pass --resize to resize it)")
    image = Image.fromarray(pixels).resize((PATCH_SIZE_PX, PATCH_SIZE_PX), Image.Resampling.LANCZOS)
    return Decoded(np.asarray(image), resized_from=(width, height))


def _grey_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Wide grayscale (Pillow's "I;16*", "I" or "F") -> uint8, keeping the image's own contrast.

    16-bit images map 0-65535 to 0-255 (divide by 257), as an 8-bit save of them would.
    "I" and "F" do not say their range: values up to 1 are taken as a 0-1 float image,
    up to 255 as 8-bit, up to 65535 as 16-bit; beyond that the image's maximum is white.
    """
    peak = float(array.max(initial=0.0))
    if mode.startswith("I;16") or 255 < peak <= 65535:
        scale = 1 / 257
    elif mode == "F" and peak <= 1.0:
        scale = 255.0
    elif peak <= 255:
        scale = 1.0
    else:
        scale = 255.0 / peak
    return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)


def decode_patch_file(path: Path, *, resize: bool = False) -> Decoded:
    """Decode one image file to a (96, 96, 3) uint8 RGB patch.

    Grayscale, palette, RGBA and other modes are converted to RGB (reported in
    `converted_from`); another size is an error unless `resize`.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Decoded(None, f"cannot be read ({exc.strerror or exc})")
    pixels = _read_uncompressed_tiff(data)
    if pixels is not None:
        return _to_patch(pixels, path, resize)
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PATCH_FILE_PIXELS:
                return Decoded(None, f"is {image.width}x{image.height} pixels, far too large for a patch")
            image.load()
            mode = image.mode
            if mode != "RGB":
                # "I;16", "I" and "F" grayscale would saturate in a plain convert: scale first.
                if mode.startswith("I") or mode == "F":
                    image = Image.fromarray(_grey_to_uint8(np.asarray(image, dtype=np.float64), mode))
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except UnidentifiedImageError:
        return Decoded(None, "is not an image Pillow can read")
    except Image.DecompressionBombError as exc:  # raised by Image.open itself, before the size check above
        return Decoded(None, f"is far too large for a patch ({exc})")
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated and corrupt files as OSError ("image file is truncated").
        return Decoded(None, f"is truncated or corrupt ({exc})")
    decoded = _to_patch(pixels, path, resize)
    if mode != "RGB" and decoded.error is None:
        return Decoded(decoded.patch, converted_from=mode, resized_from=decoded.resized_from)
    return decoded
