"""decode_patch_file on every kind of image file a user may hand `prepare` or `predict`.

The pixels come from a real Kaggle patch; tifffile, Pillow and imagecodecs write
them in each format, and each file must decode to the same patch (or, where its
values leave the scale open, give one line saying what it found and what it expected).
"""

from __future__ import annotations

import io
import shutil
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from histodetect.cli import main
from histodetect.data.decode import decode_patch_file


@pytest.fixture(scope="module")
def rgb(kaggle_sample) -> np.ndarray:
    """A real Kaggle patch, (96, 96, 3) uint8."""
    decoded = decode_patch_file(min((kaggle_sample / "train").glob("*.tif")))
    assert decoded.error is None
    return decoded.patch


def grey_of(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 1].copy()


def as_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, -1)


def decodes_to(path: Path, want: np.ndarray, *, resize: bool = False) -> None:
    decoded = decode_patch_file(path, resize=resize)
    assert decoded.error is None, decoded.error
    assert decoded.patch.dtype == np.uint8 and decoded.patch.shape == (96, 96, 3)
    assert np.array_equal(decoded.patch, want), f"{path.name}: max diff {np.abs(decoded.patch.astype(int) - want).max()}"


def refused(path: Path, *needles: str) -> str:
    decoded = decode_patch_file(path)
    assert decoded.patch is None and decoded.error is not None, f"{path.name} decoded"
    assert "\n" not in decoded.error
    for needle in needles:
        assert needle in decoded.error, decoded.error
    return decoded.error


# --- TIFF samples wider than 8 bits, signed or float ------------------------------------


def test_a_uint32_grey_tiff_is_not_wrapped_to_negative_values(rgb, tmp_path):
    # Pillow opens uint32 as int32 ("I"): every value over 2**31 wrapped negative and clipped to black.
    grey = grey_of(rgb)
    full_range = grey.astype(np.uint64) * 16_843_009  # 0-255 spread over 0 to 2**32 - 1
    tifffile.imwrite(tmp_path / "u32.tif", full_range.astype(np.uint32), photometric="minisblack")
    # Wider than 16 bits: the image's maximum is white (as the docstring of _samples_to_uint8 says).
    want = np.rint(full_range * (255 / full_range.max())).astype(np.uint8)
    decodes_to(tmp_path / "u32.tif", as_rgb(want))
    tifffile.imwrite(tmp_path / "u32_16bit_values.tif", (grey.astype(np.uint32) * 257), photometric="minisblack")
    decodes_to(tmp_path / "u32_16bit_values.tif", as_rgb(grey))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("layout", ["grey", "rgb", "rgba"])
def test_float_tiffs_in_0_1_or_0_255_decode(rgb, tmp_path, dtype, layout):
    # Pillow refused float RGB, and every float64 TIFF, as "not an image Pillow can read".
    pixels = {"grey": grey_of(rgb), "rgb": rgb, "rgba": np.dstack([rgb, np.full((96, 96), 255, np.uint8)])}[layout]
    want = as_rgb(pixels) if layout == "grey" else pixels[..., :3]
    photometric = "minisblack" if layout == "grey" else "rgb"
    for name, values in (("unit", pixels / 255), ("eight_bit", pixels.astype(np.float64))):
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, values.astype(dtype), photometric=photometric)
        decodes_to(path, want)


@pytest.mark.parametrize("dtype, scale", [("uint16", 257), ("uint32", 257), ("int16", 1), ("int32", 257)])
@pytest.mark.parametrize("layout", ["grey", "grey+alpha", "rgb", "rgba", "rgb+2"])
def test_wide_and_signed_integer_tiffs_of_every_layout(rgb, tmp_path, dtype, scale, layout):
    grey = grey_of(rgb)
    colour = {"grey": grey[..., None], "grey+alpha": grey[..., None]}.get(layout, rgb)
    n_extra = {"grey+alpha": 1, "rgba": 1, "rgb+2": 2}.get(layout, 0)
    samples = np.dstack([colour] + [np.full((96, 96), 255, np.uint8)] * n_extra)
    values = samples.astype(np.int64) * scale
    want = as_rgb(grey) if layout.startswith("grey") else rgb
    photometric = "minisblack" if layout.startswith("grey") else "rgb"
    extras = {"extrasamples": ["unassalpha"] + ["unspecified"] * (n_extra - 1)} if n_extra else {}
    tifffile.imwrite(tmp_path / "c.tif", values.astype(dtype).squeeze(), photometric=photometric,
                     planarconfig="contig", **extras)
    decodes_to(tmp_path / "c.tif", want)
    tifffile.imwrite(tmp_path / "planar_lzw.tif", np.moveaxis(values.astype(dtype), -1, 0).squeeze(),
                     photometric=photometric, planarconfig="separate", compression="lzw", **extras)
    decodes_to(tmp_path / "planar_lzw.tif", want)  # planar uint16 RGB came out of Pillow as noise
    tifffile.imwrite(tmp_path / "tiled_big.tif", values.astype(dtype).squeeze(), photometric=photometric,
                     planarconfig="contig", tile=(32, 32), compression="zlib", byteorder=">", bigtiff=True, **extras)
    decodes_to(tmp_path / "tiled_big.tif", want)


def test_sixteen_bit_colour_rounds_as_sixteen_bit_grey_does(rgb, tmp_path):
    # Pillow reads 16-bit RGB(A) and grey+alpha by dropping the low byte (value >> 8), 16-bit grey
    # by dividing by 257: the same levels came out one apart in a quarter of the pixels.
    levels = np.minimum(rgb.astype(np.uint32) * 257 + 128, 65535)  # halfway between two 8-bit levels
    want = np.rint(levels / 257).astype(np.uint8)
    grey16, grey_want = levels[..., 1].astype(np.uint16), as_rgb(want[..., 1])
    opaque = np.full((96, 96), 65535, np.uint16)
    for name, pixels, expected in [
        ("rgb", levels.astype(np.uint16), want),
        ("rgba", np.dstack([levels.astype(np.uint16), opaque]), want),
        ("grey", grey16, grey_want),
        ("grey_alpha", np.dstack([grey16, opaque]), grey_want),
    ]:
        (tmp_path / f"{name}.png").write_bytes(imagecodecs.png_encode(pixels))
        decodes_to(tmp_path / f"{name}.png", expected)
        tifffile.imwrite(tmp_path / f"{name}.tif", pixels, photometric="minisblack" if "grey" in name else "rgb",
                         **({"extrasamples": ["unassalpha"]} if pixels.ndim == 3 and pixels.shape[-1] in (2, 4) else {}))
        decodes_to(tmp_path / f"{name}.tif", expected)
    decoded = decode_patch_file(tmp_path / "rgb.png")
    assert decoded.converted_from == "uint16 RGB", "reported as a conversion, like an 8-bit grey file"


@pytest.mark.parametrize("name, values, needles", [
    ("nan", np.where(np.eye(96, dtype=bool), np.nan, 0.5), ["NaN or infinite float32 values", "expected"]),
    ("negative_float", np.linspace(-0.5, 0.5, 96 * 96).reshape(96, 96), ["negative values (down to -0.5", "expected"]),
    ("over_65535", np.full((96, 96), 70_000.0), ["float32 values up to 70000", "0-1, 0-255 or 0-65535"]),
])
def test_float_values_whose_scale_cannot_be_told_are_refused(tmp_path, name, values, needles):
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, values.astype(np.float32), photometric="minisblack")
    refused(path, *needles)


def test_negative_integers_are_refused_rather_than_clipped_or_wrapped(rgb, tmp_path):
    tifffile.imwrite(tmp_path / "i16.tif", grey_of(rgb).astype(np.int16) - 100, photometric="minisblack")
    refused(tmp_path / "i16.tif", "negative values (down to -100, int16)", "expected")
    # Pillow read int8 as unsigned "L": -100 came out as 156
    tifffile.imwrite(tmp_path / "i8.tif", (grey_of(rgb) // 2).astype(np.int8) - 100, photometric="minisblack")
    refused(tmp_path / "i8.tif", "negative values (down to -100, int8)")


def test_an_uncompressed_int8_rgb_tiff_is_not_read_as_uint8(rgb, tmp_path):
    # Kaggle's layout (one uncompressed strip of 8-bit RGB) took the fast path, which did not read
    # SampleFormat: -100 came out as 156, as from Pillow, with no word of a conversion.
    tifffile.imwrite(tmp_path / "i8.tif", (rgb // 2).astype(np.int8) - 100, photometric="rgb")
    refused(tmp_path / "i8.tif", "negative values (down to -100, int8)")
    tifffile.imwrite(tmp_path / "i8_positive.tif", (rgb // 2).astype(np.int8), photometric="rgb")
    decodes_to(tmp_path / "i8_positive.tif", rgb // 2)
    assert decode_patch_file(tmp_path / "i8_positive.tif").converted_from == "int8 RGB"


def test_sixteen_bit_samples_are_divided_by_257_even_in_a_dark_image(rgb, tmp_path):
    # Their type, not their largest value, says 16-bit: a dark image's 255 is 1 of 255, not white.
    dark = rgb.astype(np.uint16)  # values 0-255 in uint16
    tifffile.imwrite(tmp_path / "dark16.tif", dark, photometric="rgb")
    decodes_to(tmp_path / "dark16.tif", np.rint(dark / 257).astype(np.uint8))


# --- TIFF structure ------------------------------------------------------------------


def test_a_multi_page_tiff_is_refused_but_a_thumbnail_page_is_not_counted(rgb, tmp_path):
    # A stack of patches (or of channels) read as its first page dropped the rest without a word.
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        tif.write(rgb, photometric="rgb")
        tif.write(255 - rgb, photometric="rgb")
    refused(tmp_path / "stack.tif", "holds 2 images (pages)", "expected one patch per file")
    tifffile.imwrite(tmp_path / "stack16.tif", np.stack([rgb, rgb]).astype(np.uint16), photometric="rgb")
    refused(tmp_path / "stack16.tif", "holds 2 images")
    with tifffile.TiffWriter(tmp_path / "thumbnail.tif") as tif:
        tif.write(rgb, photometric="rgb", compression="lzw")
        tif.write(rgb[::4, ::4], photometric="rgb", subfiletype=1)  # a reduced-resolution copy
    decodes_to(tmp_path / "thumbnail.tif", rgb)


def test_a_palette_or_cmyk_tiff_with_a_thumbnail_page_decodes_as_pillow_reads_its_first_page(rgb, tmp_path):
    # The thumbnail sent the file to tifffile, which refuses palette and CMYK: "is a PALETTE TIFF".
    palette = Image.fromarray(rgb).quantize(64)
    indices, colours = np.asarray(palette), np.zeros((256, 3), np.uint16)
    used = np.reshape(palette.getpalette(), (-1, 3))
    colours[: len(used)] = used
    cmyk = np.asarray(Image.fromarray(rgb).convert("CMYK"))
    for name, pixels, kind in [("palette", indices, {"photometric": "palette", "colormap": colours.T * 257}),
                               ("cmyk", cmyk, {"photometric": "separated"})]:
        with tifffile.TiffWriter(tmp_path / f"{name}.tif") as tif:
            tif.write(pixels, **kind)
            tif.write(pixels[::4, ::4], subfiletype=1, **kind)
        with Image.open(tmp_path / f"{name}.tif") as image:
            want = np.asarray(image.convert("RGB"))
        decodes_to(tmp_path / f"{name}.tif", want)


def _link_last_page_to(path: Path, offset_of_page) -> None:
    """Point the last page's next-page offset at `offset_of_page(offsets)` (a little-endian classic TIFF)."""
    data = bytearray(path.read_bytes())
    offsets = [struct.unpack_from("<I", data, 4)[0]]
    while True:
        n_tags = struct.unpack_from("<H", data, offsets[-1])[0]
        next_at = offsets[-1] + 2 + 12 * n_tags
        (following,) = struct.unpack_from("<I", data, next_at)
        if following == 0:
            break
        offsets.append(following)
    struct.pack_into("<I", data, next_at, offset_of_page(offsets))
    path.write_bytes(bytes(data))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_a_tiff_whose_pages_link_back_is_read_once_instead_of_for_ever(rgb, tmp_path, dtype):
    # tifffile's walk along the pages looks for a loop only past 100 pages: a page linking back to
    # itself hung prepare and kept a serve thread busy for ever.
    path = tmp_path / "loop.tif"
    tifffile.imwrite(path, rgb.astype(dtype) * (257 if dtype == "uint16" else 1), photometric="rgb")
    _link_last_page_to(path, lambda offsets: offsets[0])
    decodes_to(path, rgb)
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, photometric="rgb", compression="lzw")
        tif.write(rgb[::4, ::4], photometric="rgb", subfiletype=1)
    _link_last_page_to(path, lambda offsets: offsets[-1])  # the thumbnail links to itself
    decodes_to(path, rgb)


def test_a_tiff_of_very_many_pages_is_refused_after_counting_a_hundred(rgb, tmp_path):
    # A 6 MB file can chain 50,000 pages: Pillow and tifffile counted them all, 16 s and 8 s of a
    # serve thread per upload.
    with tifffile.TiffWriter(tmp_path / "stack.tif") as tif:
        for _ in range(101):
            tif.write(rgb[:8, :8], photometric="rgb")
    refused(tmp_path / "stack.tif", "holds more than 100 pages; expected one patch per file")
    with tifffile.TiffWriter(tmp_path / "thumbnails.tif") as tif:
        tif.write(rgb, photometric="rgb", compression="lzw")
        for _ in range(20_000):
            tif.write(rgb[:1, :1], photometric="rgb", subfiletype=1)
    started = time.perf_counter()
    refused(tmp_path / "thumbnails.tif", "holds more than 100 pages")
    assert time.perf_counter() - started < 1, "Pillow's n_frames took 3 s to count the pages"


def test_tiff_samples_that_are_not_grey_or_rgb_are_refused(rgb, tmp_path):
    five = np.dstack([rgb, rgb[..., :2]]).astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "five.tif", five, photometric="minisblack", planarconfig="contig")
    refused(tmp_path / "five.tif", "is a MINISBLACK TIFF of 5 samples per pixel", "expected grey, grey+alpha, RGB or RGBA")
    tifffile.imwrite(tmp_path / "cmyk16.tif", np.dstack([rgb, rgb[..., :1]]).astype(np.uint16),
                     photometric="separated")
    refused(tmp_path / "cmyk16.tif", "is a SEPARATED TIFF (16-bit samples); expected grey or RGB")
    rgba = np.dstack([rgb, np.full((96, 96), 128, np.uint8)]).astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "premultiplied.tif", rgba, photometric="rgb", extrasamples=["assocalpha"])
    refused(tmp_path / "premultiplied.tif", "premultiplied", "expected")


def test_a_truncated_or_headless_wide_tiff_is_named_corrupt(rgb, tmp_path):
    tifffile.imwrite(tmp_path / "full.tif", rgb.astype(np.uint16) * 257, photometric="rgb")
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    refused(tmp_path / "cut.tif", "truncated or corrupt")
    (tmp_path / "header.tif").write_bytes(b"II*\x00\x08\x00\x00\x00")  # points at an IFD that is not there
    refused(tmp_path / "header.tif", "truncated or corrupt")


def test_a_wide_tiff_of_another_size_is_resized_only_when_asked(rgb, tmp_path):
    tifffile.imwrite(tmp_path / "small.tif", rgb[:64, :48].astype(np.float32) / 255, photometric="rgb")
    refused(tmp_path / "small.tif", "is 48x64 pixels, expected 96x96")
    want = np.asarray(Image.fromarray(rgb[:64, :48]).resize((96, 96), Image.Resampling.LANCZOS))
    decodes_to(tmp_path / "small.tif", want, resize=True)
    assert decode_patch_file(tmp_path / "small.tif", resize=True).resized_from == (48, 64)


# --- 8-bit files keep decoding as Pillow converts them --------------------------------


def _eight_bit_files(rgb: np.ndarray, folder: Path) -> dict[str, Path]:
    grey = grey_of(rgb)
    palette = Image.fromarray(rgb).quantize(64)
    writers = {
        "tiff_lzw.tif": lambda p: tifffile.imwrite(p, rgb, photometric="rgb", compression="lzw", predictor=True),
        "tiff_deflate.tif": lambda p: Image.fromarray(rgb).save(p, compression="tiff_adobe_deflate"),
        "tiff_jpeg.tif": lambda p: tifffile.imwrite(p, rgb, photometric="rgb", compression="jpeg"),
        "tiff_planar.tif": lambda p: tifffile.imwrite(p, np.moveaxis(rgb, -1, 0), photometric="rgb",
                                                      planarconfig="separate"),
        "tiff_tiled_big_endian.tif": lambda p: tifffile.imwrite(p, rgb, photometric="rgb", tile=(32, 32),
                                                                byteorder=">"),
        "tiff_bigtiff.tif": lambda p: tifffile.imwrite(p, rgb, photometric="rgb", bigtiff=True),
        "tiff_min_is_white.tif": lambda p: tifffile.imwrite(p, 255 - grey, photometric="miniswhite"),
        "tiff_palette.tif": lambda p: palette.save(p),
        "tiff_cmyk.tif": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "tiff_grey_alpha.tif": lambda p: tifffile.imwrite(p, np.dstack([grey, grey]), photometric="minisblack",
                                                          extrasamples=["unassalpha"]),
        "tiff_rgb_plus_2.tif": lambda p: tifffile.imwrite(p, np.dstack([rgb, grey, grey]), photometric="rgb",
                                                          extrasamples=["unspecified"] * 2),
        "png_1bit.png": lambda p: Image.fromarray(grey > 128).save(p),
        "png_palette.png": lambda p: palette.save(p),
        "png_palette_transparent.png": lambda p: palette.save(p, transparency=0),
        "png_grey_alpha.png": lambda p: Image.fromarray(np.dstack([grey, grey]), "LA").save(p),
        "jpeg_grey.jpg": lambda p: Image.fromarray(grey).save(p),
        "jpeg_cmyk.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p),
        "jpeg_progressive.jpg": lambda p: Image.fromarray(rgb).save(p, progressive=True),
    }
    paths = {}
    for name, write in writers.items():
        paths[name] = folder / name
        write(paths[name])
    return paths


def test_eight_bit_files_of_every_kind_decode_as_pillow_converts_them(rgb, tmp_path):
    for path in _eight_bit_files(rgb, tmp_path).values():
        with Image.open(path) as image:
            want = np.asarray(image.convert("RGB"))
        decodes_to(path, want)
    # and the lossless ones to the very patch they were written from
    for name in ("tiff_lzw.tif", "tiff_deflate.tif", "tiff_planar.tif", "tiff_tiled_big_endian.tif",
                 "tiff_bigtiff.tif", "tiff_rgb_plus_2.tif"):
        decodes_to(tmp_path / name, rgb)
    decodes_to(tmp_path / "tiff_min_is_white.tif", as_rgb(grey_of(rgb)))


# --- EXIF orientation, empty and non-image files -----------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_jpeg_and_png_as_viewers_and_browsers_do(rgb, tmp_path, orientation):
    # serve shows the file itself next to its Grad-CAM overlay: both must be the same way up.
    stored = Image.fromarray(rgb[:, :80])  # not square, so that a transposition shows in the size
    exif = Image.Exif()
    exif[0x0112] = orientation
    for path in (tmp_path / "o.png", tmp_path / "o.jpg"):
        stored.save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))
        with Image.open(path) as image:
            want = np.asarray(ImageOps.exif_transpose(image).convert("RGB").resize((96, 96), Image.Resampling.LANCZOS))
        decodes_to(path, want, resize=True)
        size = (80, 96) if orientation < 5 else (96, 80)
        assert decode_patch_file(path, resize=True).resized_from == size


def test_empty_and_non_image_files_say_what_they_hold(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    refused(tmp_path / "empty.tif", "is empty (0 bytes)", "expected a PNG, JPEG or TIFF image")
    (tmp_path / "labels.tif").write_text("id,label\nf38a6374c348f90b587e046aac6079959adf3835,0\n")
    refused(tmp_path / "labels.tif", "is not an image", "it starts with b'id,label", "expected a PNG, JPEG or TIFF")


def test_prepare_names_the_file_whose_values_are_refused(kaggle_sample, tmp_path, capsys):
    src = tmp_path / "k"
    shutil.copytree(kaggle_sample, src)
    victim = min((src / "train").glob("*.tif"))
    victim.chmod(0o644)
    with Image.open(victim) as image:
        floats = np.asarray(image, dtype=np.float32) - 1  # a pixel that was 0 goes negative
    tifffile.imwrite(victim, floats, photometric="rgb")
    code = main(["prepare", str(src), "--out", str(tmp_path / "s"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{victim}: has negative values (down to -1, float32)" in err, err


def test_a_png_or_jpeg_with_a_broken_header_is_called_corrupt_not_a_non_image(rgb, tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[20] ^= 0xFF  # the IHDR chunk no longer matches its CRC
    (tmp_path / "crc.png").write_bytes(bytes(data))
    refused(tmp_path / "crc.png", "is a truncated or corrupt PNG")
    (tmp_path / "head.jpg").write_bytes(b"\xff\xd8\xff\x01" + b"\x00" * 40)  # no JPEG marker after the start
    refused(tmp_path / "head.jpg", "is a truncated or corrupt JPEG")


def test_a_tiff_whose_tile_width_is_absurd_is_called_corrupt_instead_of_crashing_prepare(rgb, tmp_path):
    # Pillow's decoder setup raised OverflowError, which no except caught: prepare died with a traceback.
    tifffile.imwrite(tmp_path / "tiles.tif", rgb, photometric="rgb", tile=(32, 32))
    with tifffile.TiffFile(tmp_path / "tiles.tif") as tiff:
        at = tiff.pages.first.tags["TileWidth"].valueoffset
    data = bytearray((tmp_path / "tiles.tif").read_bytes())
    data[at + 3] = 0xD6  # TileWidth 32 -> 3,590,324,256
    (tmp_path / "tiles.tif").write_bytes(bytes(data))
    refused(tmp_path / "tiles.tif", "is truncated or corrupt")


def test_a_12_bit_tiff_fills_the_8_bit_range_instead_of_coming_out_dark(rgb, tmp_path):
    # Scanners write 12-bit samples in uint16 with BitsPerSample 12: divided by 257 like 16-bit data,
    # their white (4095) became 16 of 255.
    twelve_bit = np.rint(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)
    tifffile.imwrite(tmp_path / "12bit.tif", twelve_bit, photometric="rgb", bitspersample=12)
    decodes_to(tmp_path / "12bit.tif", rgb)
    assert decode_patch_file(tmp_path / "12bit.tif").converted_from == "uint16 (12-bit) RGB"


def test_a_4_bit_tiff_read_by_tifffile_fills_the_8_bit_range_as_pillow_reads_it(rgb, tmp_path):
    # tifffile (here for a big-endian BigTIFF, which Pillow cannot open) unpacks 4-bit samples to 0-15: near black.
    grey4 = grey_of(rgb) // 16
    tifffile.imwrite(tmp_path / "pillow.tif", grey4, photometric="minisblack", bitspersample=4)
    tifffile.imwrite(tmp_path / "tifffile.tif", grey4, photometric="minisblack", bitspersample=4, bigtiff=True,
                     byteorder=">")
    decodes_to(tmp_path / "pillow.tif", as_rgb(grey4 * 17))  # Pillow: 0-15 times 17
    decodes_to(tmp_path / "tifffile.tif", as_rgb(grey4 * 17))


def test_a_12_bit_jpeg_compressed_tiff_decodes(rgb, tmp_path):
    # tifffile returns its YCbCr-coded JPEG tiles as RGB.
    twelve_bit = np.rint(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)
    tifffile.imwrite(tmp_path / "12bit_jpeg.tif", twelve_bit, photometric="rgb", compression="jpeg", bitspersample=12)
    decoded = decode_patch_file(tmp_path / "12bit_jpeg.tif")
    assert decoded.error is None and decoded.converted_from == "uint16 (12-bit) RGB", decoded
    assert np.abs(decoded.patch.astype(int) - rgb).mean() < 3, "lossy, but the same patch"


def test_a_tiff_header_announcing_a_huge_image_is_refused_before_its_pixels_are_read(rgb, tmp_path):
    # Pillow cannot open float RGB: tifffile reads it, and would allocate what the header says.
    tifffile.imwrite(tmp_path / "huge.tif", rgb.astype(np.float32) / 255, photometric="rgb")
    data = bytearray((tmp_path / "huge.tif").read_bytes())
    with tifffile.TiffFile(tmp_path / "huge.tif") as tiff:
        for name in ("ImageWidth", "ImageLength"):
            tag = tiff.pages.first.tags[name]
            struct.pack_into("<I" if tag.dtype == 4 else "<H", data, tag.valueoffset, 100_000 if tag.dtype == 4 else 65_535)
    (tmp_path / "huge.tif").write_bytes(bytes(data))
    refused(tmp_path / "huge.tif", "far too large for a patch")


def _png_with_exif(pixels: np.ndarray, exif: bytes) -> bytes:
    png = imagecodecs.png_encode(pixels)
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    return png[:33] + chunk + png[33:]  # after the IHDR chunk


@pytest.mark.parametrize("exif", [b"II*\x00\x08\x00\x00", b"IX*\x00\x08\x00\x00\x00"], ids=["cut_short", "not_tiff"])
@pytest.mark.parametrize("depth", [8, 16])
def test_a_png_with_damaged_exif_decodes_as_stored(rgb, tmp_path, exif, depth):
    # EXIF is metadata: Pillow's struct.error at an eXIf chunk cut short was a traceback in prepare
    # and a 500 in serve, and an eXIf that is not TIFF refused a whole image as "truncated or corrupt".
    pixels = rgb.astype(np.uint16) * 257 if depth == 16 else rgb
    (tmp_path / "exif.png").write_bytes(_png_with_exif(pixels, exif))
    decodes_to(tmp_path / "exif.png", rgb)


def test_a_16_bit_png_is_decoded_once_and_still_turned_by_its_exif(rgb, tmp_path, monkeypatch):
    # Pillow's getexif decodes a whole PNG to look for EXIF after its pixels: a 16-bit PNG,
    # already decoded by imagecodecs, was decoded a second time for nothing.
    from PIL import PngImagePlugin

    loads = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or real_load(self))
    (tmp_path / "plain.png").write_bytes(imagecodecs.png_encode(rgb.astype(np.uint16) * 257))
    decodes_to(tmp_path / "plain.png", rgb)
    assert loads == [], "Pillow decoded the pixels imagecodecs had decoded"
    exif = Image.Exif()
    exif[0x0112] = 3  # turned 180 degrees
    (tmp_path / "turned.png").write_bytes(_png_with_exif(rgb.astype(np.uint16) * 257, exif.tobytes()))
    decodes_to(tmp_path / "turned.png", rgb[::-1, ::-1])


def test_a_large_16_bit_png_is_scaled_without_float64_copies(rgb, tmp_path):
    # Three float64 copies of the samples: 1.25 GB for one 4096x4096 16-bit RGB PNG, in each of
    # prepare's worker processes, where Pillow's 8-bit decode had taken 160 MB.
    samples = np.tile(rgb.astype(np.uint16) * 257, (16, 16, 1))  # 1536x1536
    (tmp_path / "big.png").write_bytes(imagecodecs.png_encode(samples))
    tracemalloc.start()
    try:
        decoded = decode_patch_file(tmp_path / "big.png", resize=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decoded.error is None and decoded.resized_from == (1536, 1536)
    assert peak < 3 * samples.nbytes, f"peak {peak / 2**20:.0f} MiB for {samples.nbytes / 2**20:.0f} MiB of samples"


def test_a_damaged_tiff_is_one_refusal_not_tifffiles_log_too(tmp_path, caplog):
    # tifffile logs what it reads past: prepare printed "<tifffile.TiffPages @8> invalid offset to
    # first page 8" on stderr beside its one line naming the file.
    (tmp_path / "header.tif").write_bytes(b"II*\x00\x08\x00\x00\x00")  # points at a page that is not there
    with caplog.at_level("WARNING"):
        refused(tmp_path / "header.tif", "is a truncated or corrupt TIFF")
    assert not [r for r in caplog.records if r.name == "tifffile"], caplog.text
