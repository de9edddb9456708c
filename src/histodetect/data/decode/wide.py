"""TIFFs Pillow reads wrong (wider, signed or float samples, several pages) through tifffile,
and 16-bit PNGs through imagecodecs, keeping their full sample values."""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import threading
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .samples import (
    MAX_PATCH_FILE_PIXELS,
    MAX_TIFF_PAGES,
    TIFF_SIGNATURES,
    _Refused,
    _samples_to_uint8,
)

if TYPE_CHECKING:
    import tifffile

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
