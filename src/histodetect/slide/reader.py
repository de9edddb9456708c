"""One small reader interface over tiffslide (pure Python) and openslide (when installed).

`open_slide(path)` checks the file where it comes in: a readable whole-slide image,
its pyramid, and its resolution (micrometres per pixel) from the metadata or from
the user's `--mpp`. Everything else reads pixels in level coordinates, as uint8
RGB on white, in bounded pieces: nothing here ever holds a whole level.

This module imports neither torch nor the rest of histodetect's pipeline, so that
the reading worker processes (spawned, see analyse/scoring.py) start in well under a
second instead of the ~15 s and ~850 MB that importing `histodetect.predict`
took on the shared 2-core machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError

# What tiffslide opens (TIFF-based formats), and what only openslide reads.
TIFFSLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".ome.tif", ".ome.tiff")
OPENSLIDE_ONLY_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
# A microscope's pixels are 0.1-10 um wide; TIFF writers that know nothing of
# microscopes often store 72 dpi (352.8 um/px), which must not pass as a resolution.
PLAUSIBLE_MPP = (0.05, 20.0)


def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except ImportError:
        return False
    return True


def slide_suffixes() -> tuple[str, ...]:
    """File suffixes `histodetect slide` picks up from a folder (openslide's only when it is installed)."""
    return TIFFSLIDE_SUFFIXES + (OPENSLIDE_ONLY_SUFFIXES if openslide_available() else ())


def has_slide_suffix(path: Path) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(suffix) for suffix in slide_suffixes())


def slide_stem(path: Path) -> str:
    """The file name without its slide suffix: 'node_1.ome.tiff' -> 'node_1'."""
    name = Path(path).name
    suffixes = [s for s in TIFFSLIDE_SUFFIXES + OPENSLIDE_ONLY_SUFFIXES if name.lower().endswith(s)]
    return name[: -len(max(suffixes, key=len))] if suffixes else Path(path).stem


@dataclass(frozen=True)
class SlideGeometry:
    """What the analysis needs to know about a slide, picklable for worker processes."""

    path: str
    backend: str  # "tiffslide" or "openslide"
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, in pixels
    level_downsamples: tuple[float, ...]
    mpp: float  # micrometres per level-0 pixel
    mpp_source: str  # "metadata" or "--mpp"

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]


class SlideReader:
    """An open whole-slide image: `read(level, x, y, width, height)` in that level's pixels."""

    def __init__(self, geometry: SlideGeometry):
        self.geometry = geometry
        if geometry.backend == "openslide":
            import openslide

            self._slide = openslide.OpenSlide(geometry.path)
        else:
            import tiffslide

            self._slide = tiffslide.TiffSlide(geometry.path)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels (height, width, 3) uint8 of `level` from (x, y); outside the level is white."""
        level_w, level_h = self.geometry.level_dimensions[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, level_w), min(y + height, level_h)
        if x1 <= x0 or y1 <= y0:
            return out
        # Both libraries take the location in level-0 pixels and divide by the downsample,
        # rounding down; ceil(x * downsample) lands back on exactly x.
        downsample = self.geometry.level_downsamples[level]
        location = (math.ceil(x0 * downsample - 1e-6), math.ceil(y0 * downsample - 1e-6))
        try:
            if self.geometry.backend == "openslide":
                pixels = np.asarray(self._slide.read_region(location, level, (x1 - x0, y1 - y0)))
            else:
                pixels = self._slide.read_region(location, level, (x1 - x0, y1 - y0), as_array=True, padding=False)
        # The decoders (imagecodecs, openslide) raise their own types for a damaged tile.
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{self.geometry.path}: cannot decode level {level} at ({x0}, {y0}) "
                            f"({type(exc).__name__}: {exc}); the file is truncated or corrupt") from None
        out[y0 - y : y1 - y, x0 - x : x1 - x] = as_rgb_on_white(pixels)
        return out

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_rgb_on_white(pixels: np.ndarray, *, where: str = "slide") -> np.ndarray:
    """Grey, RGB or RGBA (openslide: alpha 0 outside the scanned area) -> RGB uint8, composited on white."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.dtype != np.uint8 or pixels.shape[-1] not in (1, 3, 4):
        raise UserError(f"{where}: pixels are {pixels.dtype} with {pixels.shape[-1]} channels; "
                        f"expected an 8-bit brightfield RGB scan (H&E)")
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, 3, axis=-1)
    if pixels.shape[-1] == 4:
        alpha = pixels[..., 3:].astype(np.float32) / 255
        return (pixels[..., :3] * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8)
    return pixels[..., :3]


def open_slide(path: Path, *, mpp: float | None = None) -> SlideGeometry:
    """Check that `path` is a whole-slide image we can read and return its geometry.

    `mpp` (micrometres per level-0 pixel) overrides the file's metadata; without
    it, a file with no (or an implausible) resolution is a UserError asking for it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such slide file")
    name = path.name.lower()
    if any(name.endswith(s) for s in OPENSLIDE_ONLY_SUFFIXES):
        if not openslide_available():
            raise UserError(f"{path}: {path.suffix} slides need openslide; pip install openslide-python openslide-bin "
                            f"(tiffslide reads {', '.join(TIFFSLIDE_SUFFIXES)})")
        return _open_with_openslide(path, mpp)
    if not any(name.endswith(s) for s in TIFFSLIDE_SUFFIXES):
        raise UserError(f"{path}: unsupported slide format {path.suffix or '(no suffix)'!r}; expected one of "
                        f"{', '.join(slide_suffixes())} (a single patch or photo goes to 'histodetect predict')")
    import tifffile
    import tiffslide

    try:
        slide = tiffslide.TiffSlide(path)
    # IndexError: a TIFF header without pages (a truncated file).
    except (tifffile.TiffFileError, ValueError, KeyError, IndexError, NotImplementedError) as exc:
        if openslide_available():
            return _open_with_openslide(path, mpp)
        raise UserError(f"{path}: not a readable whole-slide image ({type(exc).__name__}: {exc}); "
                        f"expected a pyramidal TIFF or SVS") from exc
    with slide:
        properties = dict(slide.properties)
        geometry = _geometry(path, "tiffslide", slide)
        axes = properties.get("tiffslide.series-axes", "YXS")
        if axes not in ("YXS", "CYX", "YX"):
            raise UserError(f"{path}: image axes {axes!r}; expected a 2-D RGB slide (YXS)")
        # A 4-channel CMYK (print) TIFF would otherwise pass for RGBA, its black ink read as transparency.
        with tifffile.TiffFile(path) as tiff:
            if tiff.pages[0].photometric == tifffile.PHOTOMETRIC.SEPARATED:
                raise UserError(f"{path}: a CMYK (print) image; expected a brightfield RGB scan of an H&E slide")
        # Decode one pixel now, so that an unreadable compression or a 16-bit or
        # fluorescence image is reported here rather than from deep inside the tiling.
        try:
            pixel = slide.read_region((0, 0), slide.level_count - 1, (1, 1), as_array=True)
        except Exception as exc:  # noqa: BLE001 (the decoders raise their own types)
            raise UserError(f"{path}: cannot decode its pixels ({type(exc).__name__}: {exc}); "
                            "the file is truncated or corrupt, or compressed in a way tiffslide cannot read") from None
    if np.asarray(pixel).ndim == 2 or np.asarray(pixel).shape[-1] == 1:
        # The tissue mask looks for stain colour (saturation): a grey scan would be all background.
        raise UserError(f"{path}: a one-channel (grey) image; expected a brightfield RGB scan of an H&E slide")
    as_rgb_on_white(pixel, where=str(path))
    return _with_mpp(geometry, properties.get("tiffslide.mpp-x"), properties.get("tiffslide.mpp-y"), mpp)


def _geometry(path: Path, backend: str, slide) -> SlideGeometry:
    """The levels of an open tiffslide or openslide slide; the resolution is filled in by `_with_mpp`."""
    return SlideGeometry(
        path=str(path), backend=backend,
        level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        mpp=0.0, mpp_source="",
    )


def _open_with_openslide(path: Path, mpp: float | None) -> SlideGeometry:
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise UserError(f"{path}: not a readable whole-slide image (openslide: {exc})") from exc
    with slide:
        properties = dict(slide.properties)
        geometry = _geometry(path, "openslide", slide)
    return _with_mpp(geometry, properties.get("openslide.mpp-x"), properties.get("openslide.mpp-y"), mpp)


def _with_mpp(geometry: SlideGeometry, mpp_x, mpp_y, override: float | None) -> SlideGeometry:
    path = geometry.path
    if override is not None:
        if not PLAUSIBLE_MPP[0] <= override <= PLAUSIBLE_MPP[1]:
            raise UserError(f"--mpp {override}: expected micrometres per level-0 pixel between "
                            f"{PLAUSIBLE_MPP[0]} and {PLAUSIBLE_MPP[1]} (0.25 at 40x, 0.5 at 20x)")
        return replace(geometry, mpp=float(override), mpp_source="--mpp")
    if mpp_x is None or mpp_x == "":
        raise UserError(f"{path}: no resolution (microns per pixel) in the slide's metadata; "
                        f"pass --mpp with level 0's (e.g. --mpp 0.25 for a 40x scan, 0.5 for 20x)")
    mpp_x, mpp_y = float(mpp_x), float(mpp_y if mpp_y not in (None, "") else mpp_x)
    if not all(PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in (mpp_x, mpp_y)):
        raise UserError(f"{path}: the metadata says {mpp_x:.4g} x {mpp_y:.4g} um/px, not a microscope's "
                        f"({PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]}); pass --mpp with level 0's (e.g. 0.25 at 40x)")
    if abs(mpp_x / mpp_y - 1) > 0.02:
        raise UserError(f"{path}: pixels are not square ({mpp_x:.4g} x {mpp_y:.4g} um); "
                        f"resample the slide to square pixels first")
    return replace(geometry, mpp=(mpp_x + mpp_y) / 2, mpp_source="metadata")


def read_downsampled(reader: SlideReader, region: tuple[int, int, int, int], downsample: float,
                     *, max_read_px: int = 1024) -> np.ndarray:
    """The level-0 `region` (x, y, w, h) shrunk by `downsample`, area-averaged, as (H, W, 3) uint8.

    Read from the coarsest level that is at least this fine, in pieces of at most
    `max_read_px` squared at that level, so memory stays bounded even for a slide
    stored without a pyramid.
    """
    geometry = reader.geometry
    x0, y0, w0, h0 = region
    out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    level = max((i for i, d in enumerate(geometry.level_downsamples) if d <= downsample * 1.001), default=0,
                key=lambda i: geometry.level_downsamples[i])
    scale = downsample / geometry.level_downsamples[level]  # level pixels per output pixel, >= 1
    piece = max(1, int(max_read_px // scale))  # output pixels per piece side
    out = np.empty((out_h, out_w, 3), np.uint8)
    level_x0, level_y0 = x0 / geometry.level_downsamples[level], y0 / geometry.level_downsamples[level]
    for top in range(0, out_h, piece):
        for left in range(0, out_w, piece):
            bottom, right = min(top + piece, out_h), min(left + piece, out_w)
            sx0, sy0 = round(level_x0 + left * scale), round(level_y0 + top * scale)
            sx1, sy1 = round(level_x0 + right * scale), round(level_y0 + bottom * scale)
            pixels = reader.read(level, sx0, sy0, max(1, sx1 - sx0), max(1, sy1 - sy0))
            out[top:bottom, left:right] = np.asarray(
                Image.fromarray(pixels).resize((right - left, bottom - top), Image.Resampling.BOX))
    return out
