"""Decode one patch image file to uint8 RGB, and hash its pixels.

Decoding never raises for a bad file: it returns the reason, so that `prepare`
can report every bad file (or skip them with `--skip-bad`) from worker processes.

Three readers share the work. Kaggle's uncompressed 8-bit TIFFs are read straight
from their bytes; Pillow reads JPEG, 8-bit PNG and 8-bit TIFF; tifffile reads the
TIFFs Pillow gets wrong (wider, signed or float samples, several pages) and
imagecodecs the 16-bit PNGs, keeping their full sample values.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

if TYPE_CHECKING:
    import tifffile

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


def _to_patch(pixels: np.ndarray, path: Path, resize: bool) -> Decoded:
    height, width = pixels.shape[:2]
    if (height, width) == PATCH_SHAPE[:2]:
        return Decoded(np.ascontiguousarray(pixels))
    if not resize:
        return Decoded(None, f"is {width}x{height} pixels, expected 96x96 (pass --resize to resize it)")
    image = Image.fromarray(pixels).resize((PATCH_SIZE_PX, PATCH_SIZE_PX), Image.Resampling.LANCZOS)
    return Decoded(np.asarray(image), resized_from=(width, height))


# tifffile logs the damage it reads past ("<tifffile.TiffPage 0 @8> incorrect StripOffsets count")
# on stderr, around the one line `prepare` prints for the file or in place of none at all: the
# refusal says what is wrong. Filtered per thread, as serve decodes in a thread pool.
_reading_tiff = threading.local()
logging.getLogger("tifffile").addFilter(lambda record: not getattr(_reading_tiff, "quiet", False))


@contextlib.contextmanager
def _tifffile_quiet():
    _reading_tiff.quiet = True
    try:
        yield
    finally:
        _reading_tiff.quiet = False


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


def _pillow_reads_right(tiff: Image.Image, data: bytes) -> bool:
    """Whether Pillow decodes this TIFF right: one image of unsigned samples of at most 8 bits
    (thumbnail pages beside it are left alone, as Pillow reads the first page).

    Past that, Pillow opens uint32 as int32 "I" (values over 2**31 wrap negative), int8 as
    unsigned "L", 16-bit RGB(A) by dropping the low byte and planar 16-bit RGB as noise; it
    refuses float RGB and float64; and it reads a stack of pages as its first page.
    """
    try:
        bits = [int(b) for b in np.ravel(tiff.tag_v2.get(258, 1))]  # BitsPerSample, one per sample
        sample_formats = [int(f) for f in np.ravel(tiff.tag_v2.get(339, 1))]  # 1 unsigned, 2 signed, 3 float
        if max(bits) > 8 or set(sample_formats) != {1}:
            return False
    # A damaged header: a tag of the wrong type. tifffile will say what is wrong with it.
    except (SyntaxError, TypeError, ValueError, OSError, EOFError, struct.error):
        return False
    # is_animated: whether a second page follows (n_frames walks every page: 16 s for a 6 MB file of
    # 50,000). A palette or CMYK image with a thumbnail page stays Pillow's: tifffile refuses both.
    return not tiff.is_animated or _tiff_image_count(data) == 1


def _count_images(tiff: tifffile.TiffFile) -> int | None:
    """A TIFF's images, or None past MAX_TIFF_PAGES pages.

    Reduced-resolution copies of the image (thumbnails, pyramid levels) are not images of their
    own. tifffile's walk along the pages finds a loop only past 100 pages: a page that links back
    to itself went on for ever, and 100,000 pages of a 6 MB file took 8 s. A page seen before
    ends the file, as tifffile and Pillow end it.
    """
    import tifffile

    n_images, offsets = 0, set()
    for page in tiff.pages:
        if page.offset in offsets:
            break
        if len(offsets) == MAX_TIFF_PAGES:
            return None
        offsets.add(page.offset)
        n_images += not page.subfiletype & tifffile.FILETYPE.REDUCEDIMAGE
    return n_images


def _tiff_image_count(data: bytes) -> int | None:
    """_count_images of a TIFF's bytes; None where tifffile cannot read it (`_decode_tiff` says why)."""
    import tifffile

    try:
        with _tifffile_quiet(), tifffile.TiffFile(io.BytesIO(data)) as tiff:
            return _count_images(tiff)
    except Exception:  # noqa: BLE001 (a damaged file makes tifffile raise many types)
        return None


def _decode_tiff(data: bytes) -> tuple[np.ndarray, str | None]:
    """A TIFF's one image read by tifffile -> (H, W, 3) uint8 RGB, and its kind (None for 8-bit RGB)."""
    import tifffile  # 0.2 s to import, and only the TIFFs Pillow gets wrong need it

    try:
        with _tifffile_quiet(), tifffile.TiffFile(io.BytesIO(data)) as tiff:
            if not tiff.pages:
                raise _Refused("is a truncated or corrupt TIFF (no image in it)")
            n_images = _count_images(tiff)
            if n_images is None:
                raise _Refused(f"holds more than {MAX_TIFF_PAGES} pages; expected one patch per file (save each "
                               "page as a file of its own)")
            if n_images > 1:
                raise _Refused(f"holds {n_images} images (pages); expected one patch per file (save each page "
                               "as a file of its own)")
            page = tiff.pages.first
            width, height, n_samples = page.imagewidth, page.imagelength, page.samplesperpixel
            if width * height > MAX_PATCH_FILE_PIXELS or width * height * n_samples > 4 * MAX_PATCH_FILE_PIXELS:
                raise _Refused(f"is {width}x{height} pixels of {n_samples} samples, far too large for a patch")
            photometric = page.photometric
            name = getattr(photometric, "name", photometric)  # a value the TIFF standard does not define stays a number
            # tifffile's JPEG decoder returns YCbCr-coded JPEG tiles as RGB.
            is_rgb = photometric == tifffile.PHOTOMETRIC.RGB or (
                photometric == tifffile.PHOTOMETRIC.YCBCR and page.compression == tifffile.COMPRESSION.JPEG)
            if photometric == tifffile.PHOTOMETRIC.MINISBLACK and n_samples <= 2:
                n_colours, layout = 1, "grey" if n_samples == 1 else "grey+alpha"
            elif is_rgb and n_samples >= 3:
                n_colours, layout = 3, {3: "RGB", 4: "RGBA"}.get(n_samples, f"RGB+{n_samples - 3}")
            elif is_rgb or photometric == tifffile.PHOTOMETRIC.MINISBLACK:
                raise _Refused(f"is a {name} TIFF of {n_samples} samples per pixel; "
                               "expected grey, grey+alpha, RGB or RGBA")
            else:
                raise _Refused(f"is a {name} TIFF ({page.bitspersample}-bit samples); expected grey or RGB")
            if page.extrasamples and page.extrasamples[0] == tifffile.EXTRASAMPLE.ASSOCALPHA:
                raise _Refused(f"has premultiplied (associated) alpha in {page.dtype} samples; "
                               "expected straight (unassociated) alpha or none")
            samples = page.asarray()
            if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and n_samples > 1:
                samples = np.moveaxis(samples, 0, -1)
            pixels = _samples_to_uint8(samples.reshape(height, width, n_samples)[..., :n_colours], page.bitspersample)
            bits = f" ({page.bitspersample}-bit)" if page.bitspersample < 8 * page.dtype.itemsize else ""
            kind = f"{page.dtype}{bits} {layout}"
            return pixels, None if kind == "uint8 RGB" else kind
    except _Refused:
        raise
    # A damaged file makes tifffile and its codecs raise many types (ValueError, TypeError,
    # ZeroDivisionError, imagecodecs' RuntimeErrors...): each is this file's fault, not a bug here.
    except Exception as exc:  # noqa: BLE001
        raise _Refused(f"is a truncated or corrupt TIFF ({type(exc).__name__}: {exc})") from None


def tiff_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a TIFF's first image from its header, for TIFFs Pillow cannot open
    (float or uint32 RGB, float64, big-endian BigTIFF); None for anything that is not a readable TIFF."""
    if data[:4] not in TIFF_SIGNATURES:
        return None
    import tifffile

    try:
        with _tifffile_quiet(), tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages.first
            return int(page.imagewidth), int(page.imagelength)
    except Exception:  # noqa: BLE001 (a damaged header: decoding it will say what is wrong)
        return None


def _decode_png16(data: bytes) -> tuple[np.ndarray, str]:
    """A 16-bit PNG read by imagecodecs -> (H, W, 3) uint8 RGB, and its kind.

    Pillow reads 16-bit grey as "I;16" but 16-bit RGB(A) and grey+alpha by dropping the low
    byte (value >> 8): the same levels came out one apart from the grey's divide-by-257.
    """
    import imagecodecs

    try:
        samples = imagecodecs.png_decode(data)
    except imagecodecs.PngError as exc:
        raise _Refused(f"is truncated or corrupt ({exc})") from None
    samples = samples.reshape(*samples.shape[:2], -1)
    n_samples = samples.shape[-1]
    kind = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}[n_samples]
    return _samples_to_uint8(samples[..., : 1 if n_samples <= 2 else 3]), f"{samples.dtype} {kind}"


def _upright(pixels: np.ndarray, image: Image.Image) -> np.ndarray:
    """The pixels turned as the file's EXIF orientation says, as viewers and browsers show them.

    TIFF's Orientation tag is left alone: libtiff, tifffile and `_read_uncompressed_tiff` ignore it too.
    """
    if image.format == "TIFF":
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
                return _upright(pixels, image), kind
            image.load()
            mode = image.mode
            if mode.startswith("I") or mode == "F":  # wide grey ("I;16", "I", "F") would saturate in a plain convert
                pixels = _samples_to_uint8(np.asarray(image)[..., None])
            else:
                pixels = np.asarray(image if mode == "RGB" else image.convert("RGB"))
            return _upright(pixels, image), None if mode == "RGB" else mode
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


def decode_patch_file(path: Path, *, resize: bool = False) -> Decoded:
    """Decode one image file to a (96, 96, 3) uint8 RGB patch.

    Grayscale, palette, RGBA, 16-bit, float and other kinds are converted to 8-bit RGB
    (reported in `converted_from`); another size is an error unless `resize`.
    """
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
