"""Decode one patch image file to uint8 RGB, and hash its pixels.

Decoding never raises for a bad file: it returns the reason, so that `prepare`
can report every bad file (or skip them with `--skip-bad`) from worker processes.

Three readers share the work. Kaggle's uncompressed 8-bit TIFFs are read straight
from their bytes; Pillow reads JPEG, 8-bit PNG and 8-bit TIFF; tifffile reads the
TIFFs Pillow gets wrong (wider, signed or float samples, several pages) and
imagecodecs the 16-bit PNGs, keeping their full sample values.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .fast_tiff import _read_uncompressed_tiff
from .samples import (
    IMAGE_SUFFIXES,
    MAX_PATCH_FILE_PIXELS,
    OTHER_SIGNATURES,
    PATCH_SHAPE,
    PATCH_SIZE_PX,
    TIFF_SIGNATURES,
    _Refused,
    _samples_to_uint8,
)
from .wide import _decode_png16, _decode_tiff, _pillow_reads_right, tiff_size

__all__ = ["IMAGE_SUFFIXES", "MAX_PATCH_FILE_PIXELS", "PATCH_SHAPE", "PATCH_SIZE_PX", "Decoded", "decode_patch_file",
           "patch_sha1", "tiff_size"]

# EXIF orientation -> the transposition that shows the image upright (the EXIF 2.3
# table, as ImageOps.exif_transpose applies it; tests check all eight against it).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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


def _to_patch(pixels: np.ndarray, path: Path, resize: bool) -> Decoded:
    height, width = pixels.shape[:2]
    if (height, width) == PATCH_SHAPE[:2]:
        return Decoded(np.ascontiguousarray(pixels))
    if not resize:
        return Decoded(None, f"is {width}x{height} pixels, expected 96x96 (pass --resize to resize it)")
    image = Image.fromarray(pixels).resize((PATCH_SIZE_PX, PATCH_SIZE_PX), Image.Resampling.LANCZOS)
    return Decoded(np.asarray(image), resized_from=(width, height))


def _upright(pixels: np.ndarray, image: Image.Image, data: bytes) -> np.ndarray:
    """The pixels turned as the file's EXIF orientation says, as viewers and browsers show them.

    TIFF's Orientation tag is left alone: libtiff, tifffile and `_read_uncompressed_tiff` ignore it too.
    """
    if image.format == "TIFF":
        return pixels
    # A PNG's EXIF may follow its pixels, so Pillow's getexif decodes the whole image to look:
    # a 16-bit PNG, already decoded by imagecodecs, was decoded twice. No EXIF chunk, no look.
    if image.format == "PNG" and b"eXIf" not in data and b"Raw profile type exif" not in data:
        return pixels
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    # Damaged EXIF (a PNG's eXIf chunk cut short, not a TIFF header) is metadata: the pixels are whole,
    # and viewers show them as stored. Pillow raised struct.error, a traceback in prepare and a 500 in serve.
    except (SyntaxError, TypeError, ValueError, OSError, EOFError, struct.error):
        return pixels
    if orientation not in UPRIGHT:
        return pixels
    return np.asarray(Image.fromarray(pixels).transpose(UPRIGHT[orientation]))


def _decode(path: Path, data: bytes) -> tuple[np.ndarray, str | None]:
    """(H, W, 3) uint8 RGB pixels, upright, and the file's kind when not 8-bit RGB; raises _Refused."""
    if data[:4] == b"MM\x00+":  # big-endian BigTIFF: Pillow cannot read it, and warns "Corrupt EXIF data" trying
        return _decode_tiff(data)
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PATCH_FILE_PIXELS:
                raise _Refused(f"is {image.width}x{image.height} pixels, far too large for a patch")
            if image.format == "TIFF" and not _pillow_reads_right(image, data):
                return _decode_tiff(data)
            if image.format == "PNG" and data[12:16] == b"IHDR" and data[24] == 16:  # IHDR's bit depth
                pixels, kind = _decode_png16(data)
                return _upright(pixels, image, data), kind
            image.load()
            mode = image.mode
            if mode.startswith("I") or mode == "F":  # wide grey ("I;16", "I", "F") would saturate in a plain convert
                pixels = _samples_to_uint8(np.asarray(image)[..., None])
            else:
                pixels = np.asarray(image if mode == "RGB" else image.convert("RGB"))
            return _upright(pixels, image, data), None if mode == "RGB" else mode
    except UnidentifiedImageError:
        if data[:4] in TIFF_SIGNATURES:  # float64, uint32 RGB, 5 samples...: no Pillow mode holds them
            return _decode_tiff(data)
        for signature, format_name in OTHER_SIGNATURES.items():
            if data.startswith(signature):  # e.g. a chunk that fails its CRC, a segment of the wrong length
                raise _Refused(f"is a truncated or corrupt {format_name} (Pillow cannot read its header)") from None
        raise _Refused(f"is not an image Pillow can read (it starts with {data[:16]!r}); "
                       "expected a PNG, JPEG or TIFF image") from None
    except Image.DecompressionBombError as exc:  # raised by Image.open itself, before the size check above
        raise _Refused(f"is far too large for a patch ({exc})") from None
    # Pillow reports truncated and corrupt files as OSError ("image file is truncated"); a damaged
    # TIFF header can also make it raise OverflowError ("signed integer is greater than maximum").
    except (OSError, SyntaxError, ValueError, OverflowError) as exc:
        raise _Refused(f"is truncated or corrupt ({exc})") from None


def decode_patch_file(path: Path | str, *, resize: bool = False) -> Decoded:
    """Decode one image file to a (96, 96, 3) uint8 RGB patch.

    Grayscale, palette, RGBA, 16-bit, float and other kinds are converted to 8-bit RGB
    (reported in `converted_from`); another size is an error unless `resize`.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Decoded(None, f"cannot be read ({exc.strerror or exc})")
    if not data:
        return Decoded(None, "is empty (0 bytes); expected a PNG, JPEG or TIFF image")
    pixels = _read_uncompressed_tiff(data)
    if pixels is not None:
        return _to_patch(pixels, path, resize)
    try:
        pixels, converted_from = _decode(path, data)
    except _Refused as exc:
        return Decoded(None, str(exc))
    decoded = _to_patch(pixels, path, resize)
    if converted_from is not None and decoded.error is None:
        return Decoded(decoded.patch, converted_from=converted_from, resized_from=decoded.resized_from)
    return decoded
