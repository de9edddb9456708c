"""What the readers share: patch constants, the refusal they raise, and samples of any type -> uint8 RGB."""

from __future__ import annotations

import functools

import numpy as np

PATCH_SIZE_PX = 96
PATCH_SHAPE = (PATCH_SIZE_PX, PATCH_SIZE_PX, 3)
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

# Pillow refuses images over ~89 Mpx with a DecompressionBombError; a patch file
# is 96x96, so anything above this is not a patch and is refused before decoding.
MAX_PATCH_FILE_PIXELS = 4096 * 4096
# Pages of a TIFF counted before it is refused as no patch file (a 6 MB file can chain 100,000 pages).
MAX_TIFF_PAGES = 100

TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
OTHER_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


class _Refused(Exception):
    """Why a file cannot be decoded: caught in decode_patch_file, which returns it as `Decoded.error`."""


@functools.lru_cache(maxsize=64)
def _scale_table(n_values: int, scale: float) -> np.ndarray:
    """_scaled of every value 0 .. n_values - 1: (n_values,) uint8 (building 65,536 took 0.1 ms a file)."""
    return _scaled(np.arange(n_values, dtype=np.float64), scale)


def _scaled(samples: np.ndarray, scale: float) -> np.ndarray:
    """round(samples * scale) clipped to 0-255, as uint8.

    8- and 16-bit unsigned samples are looked up in a table and others scaled in place: the
    three float64 copies of a plain expression took 1.25 GB for one 4096x4096 16-bit RGB PNG
    (Pillow's 8-bit decode of it, before tifffile and imagecodecs, 160 MB).
    """
    if samples.dtype.kind == "u" and samples.dtype.itemsize <= 2:
        return _scale_table(2 ** (8 * samples.dtype.itemsize), scale)[samples]
    values = samples if samples.dtype == np.float64 else samples.astype(np.float64)
    values *= scale
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def _samples_to_uint8(samples: np.ndarray, bits: int | None = None) -> np.ndarray:
    """(H, W, 1 or 3) grey or RGB samples of any type -> (H, W, 3) uint8, keeping the image's own contrast.

    uint8 is kept; 16-bit unsigned maps 0-65535 to 0-255 (divide by 257), as an 8-bit save of it
    would. Other integer and float types do not say their range, so the values do: up to 1 (floats)
    a 0-1 image, up to 255 8-bit, up to 65535 16-bit; beyond that an integer image's maximum is
    white. NaN, infinity, negative values and floats over 65535 leave the scale open: refused.
    `bits`, where the file says its unsigned samples hold fewer bits than their type (a 12-bit
    scanner TIFF in uint16), maps 0 to 2**bits - 1 onto 0-255: divided by 257, 12 bits came out dark.
    """
    if samples.dtype == bool:
        samples = samples.astype(np.uint8) * 255
    elif bits is not None and samples.dtype.kind == "u" and bits < 8 * samples.dtype.itemsize:
        # tifffile unpacks 2- and 4-bit samples to uint8 too: 0-15 stayed 0-15, near black.
        samples = _scaled(samples, 255 / (2**bits - 1))
    if samples.dtype.kind == "u" and samples.dtype.itemsize == 2:  # either byte order
        samples = _scaled(samples, 1 / 257)
    if samples.dtype != np.uint8:
        values = samples.astype(np.float64)
        is_float = samples.dtype.kind == "f"
        if is_float and not np.isfinite(values).all():
            raise _Refused(f"has NaN or infinite {samples.dtype} values; expected finite values in 0-1, 0-255 or 0-65535")
        low, peak = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if low < 0:
            raise _Refused(f"has negative values (down to {low:g}, {samples.dtype}); "
                           "expected values in 0-1, 0-255 or 0-65535")
        if 255 < peak <= 65535:
            scale = 1 / 257
        elif is_float and peak <= 1:
            scale = 255.0
        elif peak <= 255:
            scale = 1.0
        elif not is_float:
            scale = 255.0 / peak
        else:
            raise _Refused(f"has {samples.dtype} values up to {peak:g}; expected 0-1, 0-255 or 0-65535, "
                           "which say how to scale them to 8 bits")
        samples = _scaled(values, scale)
    return samples if samples.shape[-1] == 3 else np.repeat(samples, 3, axis=-1)
