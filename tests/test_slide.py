"""Whole slides: pyramidal TIFFs built here from real PCam patches, tiled, scored and mapped back.

The test slide is a mosaic at PCam's resolution (0.972 um/px): white glass, a
block of real negative patches (the tissue) and inside it a rectangle of real
positive patches at a known place. Level 0 is that mosaic enlarged 2x (0.486
um/px, a 20x scan), so the analysis must pick level 1 and map tiles back.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import sys
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import tifffile
from matplotlib.path import Path as PolygonPath
from PIL import Image

from histodetect import cli
from histodetect.data.store import prepare
from histodetect.errors import UserError
from histodetect.predict import load_run, predict_patches
from histodetect.slide import (
    SlideConfig,
    SlideReader,
    analyse_slide,
    analyse_slides,
    choose_level,
    open_slide,
    plan_grid,
)
from histodetect.slide.analyse import scoring as analyse_module
from histodetect.slide.outputs import region_features
from histodetect.slide.reader import (
    SlideGeometry,
    openslide_available,
    read_downsampled,
)
from histodetect.slide.regions import label_regions, trace_rings
from histodetect.slide.tiling import mask_downsample, tile_tissue_fractions
from histodetect.slide.tissue import (
    MIN_TISSUE_SATURATION,
    otsu_threshold,
    saturation_uint8,
    tissue_mask,
)
from histodetect.train import fit, preset_config

PATCH = 96
GLASS = 245
# Small and fast, as in tests/test_train.py, but trained on stained patches only (like
# the slide's tissue) and for 8 epochs instead of 3. Measured on the slide's patches
# (mean probability of the negatives vs the positives): random patches, 5 epochs:
# 0.752 vs 0.755; random, 8 epochs: 0.70 vs 0.84; stained, 8 epochs: 0.53 vs 0.78.
TINY = dict(model="histo_tinynet", batch_size=32, epochs=8, max_minutes=0.0, crop_px=48, shift_px=2,
            val_batch_size=128, device="cpu", ema_decay=0.9, warmup_fraction=0.1)
# The main slide, in patches: 16 x 16, tissue rows/cols 2..13, positives rows 5..7, cols 8..11.
GRID, TISSUE, POSITIVE = 16, (2, 14, 2, 14), (5, 8, 8, 12)


# --- building slides from real patches ------------------------------------------------------


def stained_files(folder: Path, n: int, *, from_end: bool = False) -> list[Path]:
    """The first (or last) n patches of `folder` that are tissue throughout.

    At least 90% of their 12-px blocks are saturated (>= 50 of 255): PCam also
    holds patches of fat or bare glass, which any saturation mask calls background.
    """
    kept = []
    for path in sorted(folder.glob("*.jpg"), reverse=from_end):
        blocks = np.asarray(Image.open(path).convert("RGB")).reshape(8, 12, 8, 12, 3).mean((1, 3)).astype(np.uint8)
        if (saturation_uint8(blocks) >= 50).mean() >= 0.9:
            kept.append(path)
            if len(kept) == n:
                return kept
    raise AssertionError(f"{folder}: fewer than {n} stained patches")


def stained_patches(folder: Path, n: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in stained_files(folder, n)])


def mosaic(negatives: np.ndarray, positives: np.ndarray, grid: int, tissue: tuple, positive: tuple,
           offset_px: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A canvas of grid x grid patch places (plus offset_px of glass): negatives on `tissue`
    (row0, row1, col0, col1, in places), positives on `positive`, glass elsewhere."""
    canvas = np.full((grid * PATCH + offset_px[1], grid * PATCH + offset_px[0], 3), GLASS, np.uint8)
    n_neg = n_pos = 0
    for r in range(tissue[0], tissue[1]):
        for c in range(tissue[2], tissue[3]):
            is_pos = positive[0] <= r < positive[1] and positive[2] <= c < positive[3]
            bank = positives if is_pos else negatives
            i = n_pos if is_pos else n_neg
            y, x = offset_px[1] + r * PATCH, offset_px[0] + c * PATCH
            canvas[y : y + PATCH, x : x + PATCH] = bank[i % len(bank)]
            n_pos, n_neg = (n_pos + 1, n_neg) if is_pos else (n_pos, n_neg + 1)
    return canvas


def write_pyramid(path: Path, canvas: np.ndarray, *, upsample: int, mpp0: float | None, n_levels: int,
                  resolution_unit: str = "CENTIMETER") -> Path:
    """A tiled, JPEG-compressed pyramidal TIFF (subIFDs) whose level log2(upsample) is `canvas` itself.

    Level 0 is `canvas` enlarged `upsample` times; each further level halves the last.
    """
    levels = [canvas.repeat(upsample, 0).repeat(upsample, 1)]
    while len(levels) < n_levels:
        if 2 ** len(levels) == upsample:
            levels.append(canvas)
            continue
        prev = levels[-1][: levels[-1].shape[0] // 2 * 2, : levels[-1].shape[1] // 2 * 2].astype(np.uint16)
        levels.append(((prev[0::2, 0::2] + prev[1::2, 0::2] + prev[0::2, 1::2] + prev[1::2, 1::2] + 2) // 4)
                      .astype(np.uint8))
    options = dict(tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 95})
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            um_per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[resolution_unit]
            resolution = {} if mpp0 is None else dict(resolution=(um_per_unit / (mpp0 * 2**i),) * 2,
                                                      resolutionunit=resolution_unit)
            extra = dict(subifds=n_levels - 1) if i == 0 else dict(subfiletype=1)
            tif.write(level, **options, **resolution, **extra)
    return path


@pytest.fixture(scope="module")
def banks(pcam_jpeg):
    """Real held-out (valid split) patches: stained negatives and positives."""
    return stained_patches(pcam_jpeg / "valid" / "0", 140), stained_patches(pcam_jpeg / "valid" / "1", 12)


@pytest.fixture(scope="module")
def slide_path(banks, tmp_path_factory) -> Path:
    canvas = mosaic(*banks, GRID, TISSUE, POSITIVE)
    return write_pyramid(tmp_path_factory.mktemp("slide") / "node.tif", canvas, upsample=2, mpp0=0.486, n_levels=4)


@pytest.fixture(scope="module")
def trained_run(pcam_jpeg, tmp_path_factory):
    """histo_tinynet trained on 192 stained train patches, like the slide's tissue.

    Its validation patches come from the end of the valid folders, the slides' from the start.
    """
    root = tmp_path_factory.mktemp("train")
    for split, n in {"train": 96, "valid": 32}.items():
        for label in ("0", "1"):
            (root / "src" / split / label).mkdir(parents=True)
            for path in stained_files(pcam_jpeg / split / label, n, from_end=split == "valid"):
                shutil.copy(path, root / "src" / split / label / path.name)
    prepare(root / "src", root / "store", progress=False)
    fit(preset_config("cpu", **TINY), root / "store", root / "run", preset="cpu", progress=False)
    return load_run(root / "run", device="cpu")


@pytest.fixture(scope="module")
def analysed(trained_run, slide_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysed") / "node"
    return analyse_slide(trained_run, slide_path, out, SlideConfig(), progress=False)


def read_tiles_csv(folder: Path) -> list[dict]:
    with (folder / "tiles.csv").open() as handle:
        return list(csv.DictReader(handle))


# --- reading --------------------------------------------------------------------------------


def test_open_slide_reads_the_pyramid_and_its_resolution(slide_path):
    geometry = open_slide(slide_path)
    assert geometry.level_dimensions == ((3072, 3072), (1536, 1536), (768, 768), (384, 384))
    assert geometry.level_downsamples == (1.0, 2.0, 4.0, 8.0)
    assert geometry.mpp == pytest.approx(0.486) and geometry.mpp_source == "metadata"
    assert geometry.level_mpp(1) == pytest.approx(0.972)


def test_the_reader_returns_level_pixels_and_white_outside_the_slide(slide_path, banks):
    with SlideReader(open_slide(slide_path)) as reader:
        tile = reader.read(1, 2 * PATCH, 2 * PATCH, PATCH, PATCH)  # the first negative, at level 1
        assert np.abs(tile.astype(int) - banks[0][0]).mean() < 3  # JPEG at quality 95
        edge = reader.read(3, 380, 380, 10, 10)  # 4 px inside level 3, 6 px beyond it
        assert edge.shape == (10, 10, 3) and (edge[6:, :] == 255).all() and (edge[:, 6:] == 255).all()
        thumbnail = read_downsampled(reader, (0, 0, 3072, 3072), 24.0)
    assert thumbnail.shape == (128, 128, 3)
    # Glass outside the tissue (2 patch places = 384 level-0 px = 16 thumbnail px), tissue inside.
    assert np.abs(thumbnail[:14, :14].astype(int) - GLASS).max() <= 3
    assert saturation_uint8(thumbnail[20:108, 20:108]).mean() > 50


def test_choose_level_prefers_pcam_resolution_then_a_finer_level():
    assert choose_level([0.25, 0.5, 1.0, 2.0], 0.972) == 2  # within 10%: read as is
    assert choose_level([0.5, 2.0, 8.0], 0.972) == 0  # shrink from 0.5 rather than enlarge from 2.0
    assert choose_level([2.0, 8.0], 0.972) == 0  # nothing finer: the finest


def test_a_level_off_pcam_resolution_is_resampled_to_it(banks, tmp_path):
    """Level 0 at 0.243 um/px (a 40x scan) with only 2x steps below: level 2 (0.972) is read as is;
    give the slide only levels 0 and 1 (0.486) and tiles are 192-px regions of level 1 shrunk to 96."""
    canvas = mosaic(*banks, 4, (0, 4, 0, 4), (9, 9, 9, 9))
    full = open_slide(write_pyramid(tmp_path / "a.tif", canvas, upsample=4, mpp0=0.243, n_levels=4))
    assert plan_grid(full, stride_px=96).level == 2 and plan_grid(full, stride_px=96).read_px == 96
    short = open_slide(write_pyramid(tmp_path / "b.tif", canvas, upsample=4, mpp0=0.243, n_levels=2))
    grid = plan_grid(short, stride_px=96)
    assert (grid.level, grid.read_px, grid.rows, grid.cols) == (1, 192, 4, 4)
    from histodetect.slide.tiling import read_block_tiles

    with SlideReader(short) as reader:
        tiles = read_block_tiles(reader, grid, np.arange(16))
    expected = canvas.reshape(4, PATCH, 4, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(16, PATCH, PATCH, 3)
    assert np.abs(tiles.astype(int) - expected).mean() < 4


# --- the tissue mask and the regions: pure functions --------------------------------------


def geometry_like_the_test_slide() -> SlideGeometry:
    """The main test slide's geometry (level 0 at 0.486 um/px, level 1 at PCam's 0.972), without a file."""
    return SlideGeometry(path="mosaic.tif", backend="tiffslide", level_dimensions=((3072, 3072), (1536, 1536)),
                         level_downsamples=(1.0, 2.0), mpp=0.486, mpp_source="metadata")


def test_a_stride_that_would_make_billions_of_tiles_is_refused_before_any_allocation():
    # A 25 x 50 mm section at 0.243 um/px: --stride 1 planned 1.3 billion tiles (some 50 GB of arrays).
    section = SlideGeometry(path="node.svs", backend="tiffslide", level_dimensions=((102_880, 205_760),),
                            level_downsamples=(1.0,), mpp=0.243, mpp_source="metadata")
    assert plan_grid(section, stride_px=96).rows * plan_grid(section, stride_px=96).cols < 200_000
    with pytest.raises(UserError, match=r"^node.svs: --stride 1 makes 1,3\d\d,\d{3},\d{3} tiles, more than 20,000,000; "
                                        r"use a larger --stride \(96: 1\d\d,\d{3} tiles\) or a smaller --roi$"):
        plan_grid(section, stride_px=1)
    grid = plan_grid(section, stride_px=1, roi=(0, 0, 4000, 4000))  # a small region at stride 1 is fine
    assert grid.rows * grid.cols < 1_000_000


def test_at_stride_32_a_heatmap_cell_is_the_centre_32_px_of_its_tile():
    """A tile is 192 level-0 px and the stride 64, so cell (r, c) is the 64-px square
    (PCam's labelled centre) starting 64 px into tile (r, c), not the tile's top-left corner."""
    roi = (2 * PATCH * 8, 2 * PATCH * 5, 2 * PATCH * 2, 2 * PATCH * 2)
    grid = plan_grid(geometry_like_the_test_slide(), stride_px=32, roi=roi)
    assert (grid.tile_px0, grid.stride_px0, grid.rows, grid.cols) == (192, 64, 4, 4)
    xs, ys = grid.cell_corner_xy0(np.array([0, 1, 4]), np.array([0, 2, 4]))
    assert xs.tolist() == [roi[0] + 64, roi[0] + 128, roi[0] + 320]
    assert ys.tolist() == [roi[1] + 64, roi[1] + 192, roi[1] + 320]
    tile_x, tile_y = grid.tile_xy0(np.array([2]), np.array([1]))
    cell_x, cell_y = grid.cell_corner_xy0(np.array([1]), np.array([2]))
    assert (cell_x[0] + 32, cell_y[0] + 32) == (tile_x[0] + 96, tile_y[0] + 96), "cell and tile share a centre"
    heatmap = np.zeros((4, 4), np.float32)
    heatmap[0, 0] = 0.9
    (feature,) = region_features(heatmap, grid, threshold=0.5, mpp=0.486)
    (outline,) = feature["geometry"]["coordinates"]
    x, y = roi[0] + 64.0, roi[1] + 64.0
    assert sorted(map(tuple, outline[:-1])) == [(x, y), (x, y + 64), (x + 64, y), (x + 64, y + 64)]


def test_tissue_fractions_are_the_share_of_each_tile_the_mask_covers():
    grid = plan_grid(geometry_like_the_test_slide(), stride_px=96)  # 16 x 16 tiles of 192 level-0 px
    downsample = mask_downsample(grid)
    assert downsample == 24.0  # 8 x 8 mask pixels per tile
    mask = np.zeros((128, 128), bool)
    mask[0:4, 0:4] = True  # a quarter of tile (0, 0)
    mask[8:16, 8:12] = True  # the left half of tile (1, 1)
    mask[16:24, 16:24] = True  # all of tile (2, 2)
    fractions = tile_tissue_fractions(mask, downsample, grid)
    assert fractions.shape == (16, 16) and fractions.dtype == np.float32
    assert (fractions[0, 0], fractions[1, 1], fractions[2, 2]) == (0.25, 0.5, 1.0)
    assert fractions.sum() == 1.75, "no other tile holds tissue"


def test_otsu_splits_two_populations_and_the_mask_fills_small_holes_only():
    values = np.concatenate([np.full(1000, 10), np.full(500, 120)]).astype(np.uint8)
    assert 10 < otsu_threshold(values) <= 120
    image = np.full((60, 60, 3), 240, np.uint8)
    image[10:50, 10:50] = (150, 60, 140)  # stained tissue
    image[20:22, 20:22] = 240  # a 4-px hole: filled
    image[30:40, 30:40] = 240  # a 100-px hole: kept
    image[2:4, 55:57] = (150, 60, 140)  # a 4-px speck: dropped
    mask = tissue_mask(image, min_object_px=10, max_hole_px=20)
    # (The 3x3 median filter rounds square corners off by a pixel.)
    assert mask[20:22, 20:22].all() and not mask[31:39, 31:39].any() and not mask[2:4, 55:57].any()
    assert mask[11:30, 11:30].all() and not mask[:10, :50].any()


def test_a_blank_slide_has_no_tissue_even_though_otsu_always_splits():
    rng = np.random.default_rng(0)
    glass = (GLASS + rng.integers(-4, 5, (64, 64, 3))).astype(np.uint8)
    assert saturation_uint8(glass).max() < MIN_TISSUE_SATURATION
    assert not tissue_mask(glass, min_object_px=1, max_hole_px=1).any()


def test_traced_rings_bound_exactly_the_cells_of_each_region():
    assert trace_rings(np.ones((2, 3), bool)) == [[(0, 0), (3, 0), (3, 2), (0, 2), (0, 0)]]
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    outline, hole = trace_rings(ring)
    assert outline == [(0, 0), (3, 0), (3, 3), (0, 3), (0, 0)] and sorted(hole[:-1]) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert label_regions(np.eye(2, dtype=bool))[1] == 2, "cells touching at a corner are two regions"
    rng = np.random.default_rng(0)
    for _ in range(200):
        cells = rng.random((rng.integers(1, 12), rng.integers(1, 12))) < rng.random()
        labels, n = label_regions(cells)
        for k in range(1, n + 1):
            rings = trace_rings(labels == k)
            centres = np.argwhere(np.ones_like(cells)).astype(float)[:, ::-1] + 0.5  # (col, row) + 0.5
            inside = PolygonPath(rings[0]).contains_points(centres)
            for hole in rings[1:]:
                inside &= ~PolygonPath(hole).contains_points(centres)
            assert (inside.reshape(cells.shape) == (labels == k)).all()
            assert all(len(set(r[:-1])) == len(r) - 1 for r in rings), "every ring is simple"


# --- the analysis ---------------------------------------------------------------------------


def test_tiles_cover_the_tissue_and_skip_the_background(analysed):
    rows = read_tiles_csv(analysed.out_dir)
    assert {r["level"] for r in rows} == {"1"}
    places = {(int(r["y"]) // 2 // PATCH, int(r["x"]) // 2 // PATCH) for r in rows}
    tissue = {(r, c) for r in range(TISSUE[0], TISSUE[1]) for c in range(TISSUE[2], TISSUE[3])}
    assert places == tissue
    assert all(int(r["x"]) % (2 * PATCH) == 0 and int(r["y"]) % (2 * PATCH) == 0 for r in rows)
    summary = analysed.summary
    assert summary["tiles_read"] == len(rows) == 144 and summary["tiles_in_grid"] == GRID * GRID
    assert summary["level"] == 1 and summary["level_mpp"] == pytest.approx(0.972)


def test_tile_coordinates_map_back_to_level_zero(analysed, slide_path, banks):
    """Each tile's (x, y) read from level 0 and shrunk 2x is the patch placed there."""
    canvas = mosaic(*banks, GRID, TISSUE, POSITIVE)
    with SlideReader(open_slide(slide_path)) as reader:
        for row in read_tiles_csv(analysed.out_dir)[::7]:
            x, y = int(row["x"]), int(row["y"])
            level0 = reader.read(0, x, y, 2 * PATCH, 2 * PATCH).astype(np.float32)
            shrunk = level0.reshape(PATCH, 2, PATCH, 2, 3).mean((1, 3))
            placed = canvas[y // 2 : y // 2 + PATCH, x // 2 : x // 2 + PATCH]
            assert np.abs(shrunk - placed).mean() < 4


def test_the_heatmap_is_higher_inside_the_positive_rectangle(analysed, trained_run, banks):
    heatmap = np.load(analysed.out_dir / "heatmap.npy")
    assert heatmap.shape == (GRID, GRID) and heatmap.dtype == np.float32
    tissue = np.zeros_like(heatmap, bool)
    tissue[TISSUE[0] : TISSUE[1], TISSUE[2] : TISSUE[3]] = True
    assert (~np.isnan(heatmap) == tissue).all(), "scored where there is tissue, NaN elsewhere"
    positive = np.zeros_like(tissue)
    positive[POSITIVE[0] : POSITIVE[1], POSITIVE[2] : POSITIVE[3]] = True
    inside, outside = heatmap[positive].mean(), heatmap[tissue & ~positive].mean()
    assert inside > outside + 0.05, (inside, outside)
    # Scores are predict's on the same pixels (the tile table's prob is the heatmap's).
    expected = predict_patches(trained_run, banks[1][:4])
    np.testing.assert_allclose(heatmap[POSITIVE[0], POSITIVE[2] : POSITIVE[2] + 4], expected, atol=0.05)
    probs = [float(r["prob"]) for r in read_tiles_csv(analysed.out_dir)]
    assert sorted(probs) == pytest.approx(sorted(heatmap[tissue].tolist()), abs=1e-6)


def test_regions_are_geojson_polygons_in_level0_that_overlap_the_rectangle(analysed):
    collection = json.loads((analysed.out_dir / "regions.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    heatmap = np.load(analysed.out_dir / "heatmap.npy")
    above = np.nan_to_num(heatmap) >= analysed.summary["threshold"]
    # Cell centres in level 0: tile (r, c) starts at 2 * 96 * (c, r) and is 192 level-0 px wide.
    centres = (np.argwhere(np.ones_like(above))[:, ::-1] * 2 * PATCH + PATCH).astype(float)
    covered = np.zeros(above.size, bool)
    for feature in collection["features"]:
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["classification"]["name"] == "Tumor"
        outline, *holes = feature["geometry"]["coordinates"]
        assert outline[0] == outline[-1]
        inside = PolygonPath(outline).contains_points(centres)
        for hole in holes:
            inside &= ~PolygonPath(hole).contains_points(centres)
        covered |= inside
    assert (covered.reshape(above.shape) == above).all(), "the polygons hold exactly the cells above the threshold"
    rectangle = np.zeros_like(above)
    rectangle[POSITIVE[0] : POSITIVE[1], POSITIVE[2] : POSITIVE[3]] = True
    assert (above & rectangle).any(), "a region overlaps the positive rectangle"
    assert analysed.summary["n_regions"] == len(collection["features"]) >= 1
    cell_mm2 = (2 * PATCH * 0.486 / 1000) ** 2
    assert analysed.summary["tumour_area_mm2"] == pytest.approx(above.sum() * cell_mm2, rel=1e-4)


def test_the_summary_and_pictures_are_written(analysed):
    summary = json.loads((analysed.out_dir / "summary.json").read_text())
    heatmap = np.load(analysed.out_dir / "heatmap.npy")
    assert summary["max_prob"] == pytest.approx(np.nanmax(heatmap))
    assert summary["mean_prob"] == pytest.approx(np.nanmean(heatmap), abs=1e-6)
    assert summary["seconds"] > 0 and summary["mpp_source"] == "metadata" and summary["message"] == ""
    colour = Image.open(analysed.out_dir / "heatmap.png")
    assert colour.mode == "RGBA" and colour.size == (512, 512)
    assert np.asarray(colour)[0, 0, 3] == 0 and np.asarray(colour)[256, 256, 3] == 255, "glass is transparent"
    assert Image.open(analysed.out_dir / "overlay.png").size[0] >= 800
    assert not list(analysed.out_dir.parent.glob(".*")), "no partial or temporary folder is left"


def test_a_region_of_interest_limits_the_work_and_the_grid_starts_there(trained_run, slide_path, tmp_path):
    roi = (2 * PATCH * 8, 2 * PATCH * 5, 2 * PATCH * 4, 2 * PATCH * 3)  # exactly the positive rectangle
    result = analyse_slide(trained_run, slide_path, tmp_path / "roi", SlideConfig(roi=roi), progress=False)
    rows = read_tiles_csv(tmp_path / "roi")
    assert len(rows) == 12 and result.summary["tiles_in_grid"] == 12
    assert min(int(r["x"]) for r in rows) == roi[0] and min(int(r["y"]) for r in rows) == roi[1]
    assert np.load(tmp_path / "roi" / "heatmap.npy").shape == (3, 4)


def test_the_summary_names_the_slide_and_the_weights_that_scored_it(trained_run, slide_path, tmp_path, monkeypatch):
    # As typed, a relative slide path named whatever the working folder held months later.
    import hashlib

    from histodetect import __version__

    monkeypatch.chdir(slide_path.parent)
    roi = (2 * PATCH * 8, 2 * PATCH * 5, 2 * PATCH * 2, 2 * PATCH * 2)
    summary = analyse_slide(trained_run, Path(slide_path.name), tmp_path / "named", SlideConfig(roi=roi),
                            progress=False).summary
    weights = trained_run.run_dir / "checkpoints" / "best.pt"
    assert summary["slide"] == str(slide_path.resolve()) and summary["run"] == str(trained_run.run_dir)
    assert summary["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert summary["histodetect"] == __version__ and summary["device"] == "cpu"
    assert json.loads((tmp_path / "named" / "summary.json").read_text())["bf16_autocast"] == summary["bf16_autocast"]


def test_tiles_can_be_scored_with_moved_crop_views_and_a_run_without_a_shift_refuses_them(trained_run, slide_path,
                                                                                         tmp_path):
    import dataclasses

    roi = (2 * PATCH * 8, 2 * PATCH * 5, 2 * PATCH * 4, 2 * PATCH * 3)
    result = analyse_slide(trained_run, slide_path, tmp_path / "tta72", SlideConfig(roi=roi, tta=72), progress=False)
    assert result.summary["tta"] == 72 and result.summary["threshold"] == trained_run.threshold_for(72)
    assert len(read_tiles_csv(tmp_path / "tta72")) == 12
    unshifted = dataclasses.replace(trained_run, config={**trained_run.config, "shift_px": 0})
    with pytest.raises(UserError, match=r"--tta 40: .* was trained without a shifted crop"):
        analyse_slide(unshifted, slide_path, tmp_path / "tta40", SlideConfig(roi=roi, tta=40), progress=False)
    assert not (tmp_path / "tta40").exists()


def test_stride_32_gives_one_cell_per_pcam_label_region(trained_run, slide_path, tmp_path):
    roi = (2 * PATCH * 8, 2 * PATCH * 5, 2 * PATCH * 2, 2 * PATCH * 2)
    result = analyse_slide(trained_run, slide_path, tmp_path / "s32", SlideConfig(roi=roi, stride_px=32),
                           progress=False)
    grid = result.summary["grid"]
    assert (grid["rows"], grid["cols"], grid["stride_px0"], grid["tile_px0"]) == (4, 4, 64, 192)
    xs = sorted({int(r["x"]) for r in read_tiles_csv(tmp_path / "s32")})
    assert xs == [roi[0] + 64 * i for i in range(4)]


def test_reading_workers_give_the_same_result_as_reading_inline(trained_run, slide_path, analysed, tmp_path):
    result = analyse_slide(trained_run, slide_path, tmp_path / "w2", SlideConfig(workers=2), progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "w2" / "heatmap.npy"), np.load(analysed.out_dir / "heatmap.npy"))
    assert result.summary["tiles_read"] == 144


def test_peak_memory_stays_bounded_when_the_slide_grows(trained_run, banks, tmp_path):
    """4x the area: the peak of the memory Python and numpy allocate grows far less than 4x."""
    peaks = {}
    for scale in (1, 2):
        canvas = mosaic(*banks, GRID * scale, (1, GRID * scale - 1, 1, GRID * scale - 1), POSITIVE)
        path = write_pyramid(tmp_path / f"s{scale}.tif", canvas, upsample=2, mpp0=0.486, n_levels=4)
        del canvas
        tracemalloc.start()
        result = analyse_slide(trained_run, path, tmp_path / f"out{scale}", SlideConfig(batch_size=64), progress=False)
        peaks[scale] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.summary["tiles_read"] == (GRID * scale - 2) ** 2
    # Measured: 23 MB for both (the overview picture and a batch of tiles dominate).
    # Holding the big slide's level 1 whole would add its 28 MB to that.
    level1_bytes = (GRID * 2 * PATCH) ** 2 * 3
    assert peaks[2] < 1.25 * peaks[1] and peaks[2] < level1_bytes, (peaks, level1_bytes)


# --- many slides, resuming, bad input --------------------------------------------------------


def test_many_slides_each_get_a_folder_and_one_table_and_a_bad_one_does_not_stop_them(
        trained_run, banks, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    small = mosaic(*banks, 4, (1, 3, 1, 3), (1, 2, 1, 2))
    write_pyramid(folder / "a.tif", small, upsample=2, mpp0=0.486, n_levels=2)
    (folder / "b.svs").write_text("not a slide")
    write_pyramid(folder / "c.tiff", small, upsample=2, mpp0=0.486, n_levels=2)
    (folder / "notes.txt").write_text("ignored: not a slide suffix")
    report = analyse_slides(trained_run, [folder], tmp_path / "out", SlideConfig(), progress=False)
    assert [r.slide.name for r in report.results] == ["a.tif", "c.tiff"]
    assert [(s.name, "not a readable whole-slide image" in why) for s, why in report.failed] == [("b.svs", True)]
    with report.table.open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["out"], r["status"]) for r in table] == [("a", "done"), ("b", "failed"), ("c", "done")]
    assert table[0]["tiles_read"] == "4" and 0 < float(table[0]["max_prob"]) < 1 and table[0]["error"] == ""
    assert (tmp_path / "out" / "a" / "summary.json").is_file() and not (tmp_path / "out" / "b").exists()

    again = analyse_slides(trained_run, [str(folder / "*.tif*")], tmp_path / "out", SlideConfig(), progress=False)
    assert [r.reused for r in again.results] == [True, True] and not again.failed


def test_any_iterable_of_slides_is_a_list_of_them(trained_run, slide_path, tmp_path):
    # As for predict_to_csv: Path.glob's generator and a set were a TypeError (no len(), not subscriptable).
    config = SlideConfig(roi=(0, 0, 1536, 1536))
    for name, inputs in (("glob", slide_path.parent.glob("*.tif")), ("set", {str(slide_path)})):
        report = analyse_slides(trained_run, inputs, tmp_path / name, config, progress=False)
        assert [r.slide for r in report.results] == [slide_path] and (tmp_path / name / "summary.json").is_file()
    with pytest.raises(UserError, match=r"^inputs: expected a path or a list of paths \(slide files, folders, "
                                        r"patterns\), found int 3$"):
        analyse_slides(trained_run, 3, tmp_path / "three", config, progress=False)


def test_a_full_disk_writing_the_outputs_is_one_line_and_the_rerun_resumes(trained_run, slide_path, tmp_path,
                                                                         monkeypatch):
    # Pillow raises "[Errno 28] No space left on device" without a file name; the line names the output
    # folder, and the scores, saved once the failed outputs are removed, spare the rerun the scoring.
    import errno

    from histodetect.slide.analyse import results

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "node"
    config = SlideConfig(batch_size=32)
    monkeypatch.setattr(results, "write_overlay_png", full_disk)
    with pytest.raises(UserError, match=rf"^{re.escape(str(out))}: cannot write it \(No space left on device\); "
                                        r"its tile scores are kept: run it again once there is space$"):
        analyse_slide(trained_run, slide_path, out, config, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / ".node.partial").iterdir()) == ["progress.npy", "settings_key"]
    monkeypatch.undo()
    result = analyse_slide(trained_run, slide_path, out, config, progress=False)
    assert result.summary["tiles_resumed"] == result.summary["tiles_read"] == 144
    assert (out / "overlay.png").is_file() and not list(tmp_path.glob(".*"))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM and os.kill to self are POSIX")
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", ["pipeline.region_features", "results.write_overlay_png"])
def test_ctrl_c_or_sigterm_once_every_tile_is_scored_keeps_the_scores(trained_run, slide_path, tmp_path, monkeypatch,
                                                                      capsys, signal_name, where):
    """Interrupted after the scoring (the overview read, the outputs written), the partial folder kept half
    the outputs and no scores (no checkpoint had come due): the rerun scored every tile again."""
    from histodetect.slide.analyse import pipeline, results

    module, name = {"pipeline": pipeline, "results": results}[where.split(".")[0]], where.split(".")[1]
    real = getattr(module, name)
    number = getattr(signal, signal_name)

    def signal_then_go_on(*args, **kwargs):
        os.kill(os.getpid(), number)  # as Ctrl-C or a scheduler, from outside
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signal_then_go_on)
    out = tmp_path / "node"
    args = ["slide", str(trained_run.run_dir), str(slide_path), "--out", str(out), "--batch-size", "32", "--quiet"]
    assert cli.main(args) == 128 + number
    assert capsys.readouterr().err == "histodetect: interrupted\n"
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / ".node.partial").iterdir()) == ["progress.npy", "settings_key"]
    monkeypatch.undo()
    assert cli.main(args) == 0
    assert json.loads((out / "summary.json").read_text())["tiles_resumed"] == 144
    assert not list(tmp_path.glob(".*"))


def test_an_interrupted_run_leaves_no_result_and_the_rerun_resumes(trained_run, slide_path, analysed, tmp_path,
                                                                   monkeypatch):
    calls = {"n": 0}
    real_predict = analyse_module.predict_patches

    def predict_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(analyse_module, "predict_patches", predict_then_interrupt)
    config = SlideConfig(batch_size=32)
    with pytest.raises(KeyboardInterrupt):
        analyse_slide(trained_run, slide_path, tmp_path / "node", config, progress=False)
    assert not (tmp_path / "node").exists(), "no half-written result"
    monkeypatch.setattr(analyse_module, "predict_patches", real_predict)
    result = analyse_slide(trained_run, slide_path, tmp_path / "node", config, progress=False)
    assert result.summary["tiles_resumed"] >= 2 * 32 and result.summary["tiles_read"] == 144
    np.testing.assert_allclose(np.load(tmp_path / "node" / "heatmap.npy"), np.load(analysed.out_dir / "heatmap.npy"),
                               atol=1e-6)
    assert not list(tmp_path.glob(".*")), "the partial folder is gone"
    # Same settings again: reused. Other settings: refused without --overwrite, then replaced.
    assert analyse_slide(trained_run, slide_path, tmp_path / "node", config, progress=False).reused
    other = SlideConfig(batch_size=32, roi=(0, 0, 1536, 1536))
    with pytest.raises(UserError, match=r"node: already holds a slide result from other settings \(changed: --roi\); "
                                        r"pass --overwrite"):
        analyse_slide(trained_run, slide_path, tmp_path / "node", other, progress=False)
    other_tta = SlideConfig(batch_size=32, tta=8, threshold=0.3)
    with pytest.raises(UserError, match=r"other settings \(changed: --tta, --threshold\); pass --overwrite"):
        analyse_slide(trained_run, slide_path, tmp_path / "node", other_tta, progress=False)
    summary_path = tmp_path / "node" / "summary.json"
    older = json.loads(summary_path.read_text())
    del older["settings"]  # as results made before the settings were kept
    summary_path.write_text(json.dumps(older))
    with pytest.raises(UserError, match=r"other settings \(changed: an earlier histodetect's, which did not record "
                                        r"them\); pass --overwrite"):
        analyse_slide(trained_run, slide_path, tmp_path / "node", other, progress=False)
    replaced = analyse_slide(trained_run, slide_path, tmp_path / "node", other, overwrite=True, progress=False)
    assert replaced.summary["config"]["roi"] == [0, 0, 1536, 1536]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match=r"mine: already holds files that are not a slide result; choose another --out$"):
        analyse_slide(trained_run, slide_path, tmp_path / "mine", other, overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_refused_result_names_the_flags_that_changed_as_the_command_spells_them():
    # It named --stride-px and --min-tissue-fraction, which slide does not take.
    import dataclasses

    from histodetect.slide.analyse.resume import _changed

    old = {"config": dataclasses.asdict(SlideConfig())}
    new = {"config": dataclasses.asdict(SlideConfig(stride_px=48, min_tissue_fraction=0.5, target_mpp=0.5))}
    assert _changed(old, new) == "--stride, --min-tissue, target_mpp"


def test_a_result_is_reused_only_by_the_same_engine_and_precision(trained_run, slide_path, analysed, tmp_path):
    # Scores in float32, or through an export, differ a little from bf16's: a result made by one was reused by another.
    from histodetect.export import export_run, load_exported_run

    out = tmp_path / "node"
    shutil.copytree(analysed.out_dir, out)
    assert analyse_slide(trained_run, slide_path, out, SlideConfig(), progress=False).reused
    fp32 = load_run(trained_run.run_dir, device="cpu", fp32=True)
    export_run(trained_run.run_dir, out=tmp_path / "model.onnx")
    for other, changed in ((fp32, "the engine or precision"),
                           (load_exported_run(tmp_path / "model.onnx"), "the run or its weights, the engine or precision")):
        with pytest.raises(UserError, match=rf"node: already holds a slide result from other settings \(changed: "
                                            rf"{changed}\); pass --overwrite"):
            analyse_slide(other, slide_path, out, SlideConfig(), progress=False)


def test_where_bf16_is_not_used_a_float32_run_reuses_the_result(trained_run, slide_path, tmp_path, monkeypatch):
    # On a CPU without AMX, model_logits scores in float32 whatever run.bf16 says: --fp32 was refused
    # its own scores there (and a CUDA bf16 result, copied there, was reused).
    from histodetect.slide.analyse import resume
    from histodetect.train import step

    for module in (step, resume):
        monkeypatch.setattr(module, "bf16_is_fast", lambda device: False)
    first = analyse_slide(trained_run, slide_path, tmp_path / "node", SlideConfig(), progress=False)
    fp32 = load_run(trained_run.run_dir, device="cpu", fp32=True)
    again = analyse_slide(fp32, slide_path, tmp_path / "node", SlideConfig(), progress=False)
    assert again.reused and again.summary == first.summary


def test_a_slide_without_tissue_gives_an_empty_result_and_says_so(trained_run, tmp_path):
    rng = np.random.default_rng(0)
    glass = (GLASS + rng.integers(-4, 5, (768, 768, 3))).astype(np.uint8)
    path = write_pyramid(tmp_path / "blank.tif", glass, upsample=2, mpp0=0.486, n_levels=3)
    result = analyse_slide(trained_run, path, tmp_path / "blank", progress=False)
    assert result.summary["tiles_read"] == 0 and result.summary["max_prob"] is None
    assert result.summary["message"].startswith("no tissue found")
    assert read_tiles_csv(tmp_path / "blank") == []
    assert json.loads((tmp_path / "blank" / "regions.geojson").read_text())["features"] == []
    assert np.isnan(np.load(tmp_path / "blank" / "heatmap.npy")).all()


def test_a_slide_without_resolution_asks_for_mpp(banks, trained_run, tmp_path):
    canvas = mosaic(*banks, 4, (1, 3, 1, 3), (1, 2, 1, 2))
    path = write_pyramid(tmp_path / "nompp.tif", canvas, upsample=2, mpp0=None, n_levels=2)
    with pytest.raises(UserError, match=r"nompp.tif: no resolution .* in the slide's metadata; pass --mpp"):
        open_slide(path)
    result = analyse_slide(trained_run, path, tmp_path / "out", SlideConfig(mpp=0.486), progress=False)
    assert result.summary["mpp_source"] == "--mpp" and result.summary["level"] == 1
    inch = write_pyramid(tmp_path / "72dpi.tif", canvas, upsample=2, mpp0=25400 / 72, n_levels=2,
                         resolution_unit="INCH")
    with pytest.raises(UserError, match=r"72dpi.tif: the metadata says 352.8 x 352.8 um/px, not a microscope's"):
        open_slide(inch)
    with pytest.raises(UserError, match=r"--mpp 250.0: expected micrometres per level-0 pixel"):
        open_slide(path, mpp=250.0)


def test_bad_files_are_named_with_what_was_expected(kaggle_sample, tmp_path):
    text = tmp_path / "fake.svs"
    text.write_text("id,label\n")
    with pytest.raises(UserError, match=r"fake.svs: not a readable whole-slide image \(TiffFileError.*pyramidal TIFF"):
        open_slide(text)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (500, 500)).save(photo)
    with pytest.raises(UserError, match=r"photo.png: unsupported slide format '.png'; expected one of .svs"):
        open_slide(photo)
    with pytest.raises(UserError, match=r"missing.svs: no such slide file"):
        open_slide(tmp_path / "missing.svs")
    deep = tmp_path / "fluorescence.tif"
    tifffile.imwrite(deep, np.zeros((300, 300, 3), np.uint16), photometric="rgb")
    with pytest.raises(UserError, match=r"fluorescence.tif: pixels are uint16 with 3 channels; expected an 8-bit"):
        open_slide(deep, mpp=0.5)
    if not openslide_available():
        (tmp_path / "x.mrxs").write_bytes(b"")
        with pytest.raises(UserError, match=r"x.mrxs: .mrxs slides need openslide; pip install openslide-python"):
            open_slide(tmp_path / "x.mrxs")
    patch = next((kaggle_sample / "train").glob("*.tif"))  # a real 96x96 Kaggle patch is a TIFF too
    with pytest.raises(UserError, match=r"smaller than one 96-px tile .* a single patch goes to 'histodetect predict'"):
        plan_grid(open_slide(patch, mpp=0.486), stride_px=96)


def test_bad_options_are_named(slide_path):
    from histodetect.slide import parse_roi

    geometry = open_slide(slide_path)
    inside = r"--roi 3000,0,500,500: expected a region inside the slide's level 0 \(0,0,3072,3072\)"
    with pytest.raises(UserError, match=inside):
        plan_grid(geometry, stride_px=96, roi=(3000, 0, 500, 500))
    with pytest.raises(UserError, match=r"--roi '1,2,3': expected x,y,width,height in level-0 pixels"):
        parse_roi("1,2,3")
    assert parse_roi("10,20,300,400") == (10, 20, 300, 400)
    with pytest.raises(UserError, match=r"--stride 0: expected a positive number of pixels"):
        plan_grid(geometry, stride_px=0)
    # Longer than a tile, the heatmap cells counted tissue no tile had seen; longer than the
    # slide (one tile, on glass), the result said "no tissue found".
    for stride in (97, 500, 2**63):
        with pytest.raises(UserError, match=rf"--stride {stride}: expected a positive number of pixels up to 96 "
                                            r"\(96 = tiles side by side; a longer stride skips the tissue"):
            plan_grid(geometry, stride_px=stride)
    assert plan_grid(geometry, stride_px=96).cols == 16
    from histodetect.slide.analyse import SlideConfig

    for workers in (-1, 257, 2**63):  # 2**63 was an OverflowError traceback from multiprocessing
        with pytest.raises(UserError, match=rf"--workers {workers}: expected 0 \(read in this process\) to 256 "):
            SlideConfig(workers=workers)  # refused when it is made


def test_openslide_is_used_when_installed_for_the_formats_only_it_reads(slide_path, tmp_path, monkeypatch):
    """openslide's API, as a stand-in over tiffslide: RGBA regions, transparent where nothing was scanned."""
    import tiffslide

    class OpenSlide:
        def __init__(self, path):
            self._slide = tiffslide.TiffSlide(path)
            self.level_dimensions, self.level_downsamples = self._slide.level_dimensions, self._slide.level_downsamples
            self.properties = {"openslide.mpp-x": "0.486", "openslide.mpp-y": "0.486"}

        def read_region(self, location, level, size):
            rgb = self._slide.read_region(location, level, size, as_array=True)
            alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
            alpha[:4] = 0  # the top rows were not scanned
            return Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")

        def close(self):
            self._slide.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    fake = types.ModuleType("openslide")
    fake.OpenSlide, fake.OpenSlideError = OpenSlide, RuntimeError
    monkeypatch.setitem(sys.modules, "openslide", fake)
    mirax = tmp_path / "node.mrxs"
    shutil.copy(slide_path, mirax)
    geometry = open_slide(mirax)
    assert geometry.backend == "openslide" and geometry.mpp == pytest.approx(0.486)
    with SlideReader(geometry) as reader, SlideReader(open_slide(slide_path)) as reference:
        region = reader.read(1, 2 * PATCH, 2 * PATCH, PATCH, PATCH)
        expected = reference.read(1, 2 * PATCH, 2 * PATCH, PATCH, PATCH)
    assert (region[:4] == 255).all(), "transparent is white"
    np.testing.assert_array_equal(region[4:], expected[4:])


# --- the command line -----------------------------------------------------------------------


def test_the_command_prints_a_line_per_slide_and_exits_2_when_one_failed(trained_run, slide_path, tmp_path, capsys):
    def histodetect(*argv) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = histodetect("slide", trained_run.run_dir, slide_path, "--out", tmp_path / "one", "--quiet")
    assert code == 0 and "node.tif: 144 tiles, max prob" in out and str(tmp_path / "one") in out
    assert (tmp_path / "one" / "summary.json").is_file()
    folder = tmp_path / "slides"
    folder.mkdir()
    glass = np.full((768, 768, 3), GLASS, np.uint8)
    write_pyramid(folder / "blank.tif", glass, upsample=2, mpp0=0.486, n_levels=2)
    (folder / "broken.svs").write_bytes(b"II*\x00 truncated")
    code, out, err = histodetect("slide", trained_run.run_dir, folder, "--out", tmp_path / "many", "--quiet")
    assert code == 2 and "blank.tif: no tissue found" in out and "broken.svs: failed: " in err
    assert "1 of 2 slides failed" in err and (tmp_path / "many" / "slides.csv").is_file()
    code, _, err = histodetect("slide", trained_run.run_dir, slide_path, "--out", tmp_path / "x", "--roi", "1,2,3")
    assert code == 2 and "--roi '1,2,3': expected x,y,width,height" in err
    (tmp_path / "afile").write_text("not a folder")
    code, _, err = histodetect("slide", trained_run.run_dir, slide_path, "--out", tmp_path / "afile" / "r", "--quiet")
    assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'afile'} is a file, not a folder" in err


def test_a_truncated_or_grey_slide_is_one_line_naming_it(trained_run, slide_path, tmp_path, capsys):
    def histodetect(*argv) -> tuple[int, str]:
        code = cli.main([str(a) for a in argv])
        return code, capsys.readouterr().err

    data = slide_path.read_bytes()
    for n_bytes in (16, 5000, len(data) // 2):
        cut = tmp_path / f"cut{n_bytes}.tif"
        cut.write_bytes(data[:n_bytes])
        code, err = histodetect("slide", trained_run.run_dir, cut, "--out", tmp_path / f"o{n_bytes}", "--quiet")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (n_bytes, err)
        assert str(cut) in err and ("corrupt" in err or "not a readable whole-slide image" in err), (n_bytes, err)
    grey = tmp_path / "grey.tif"
    tifffile.imwrite(grey, np.full((512, 512), 200, np.uint8), tile=(256, 256), resolution=(1e4 / 0.486,) * 2,
                     resolutionunit="CENTIMETER")
    with pytest.raises(UserError, match=r"grey.tif: a one-channel \(grey\) image; expected a brightfield RGB scan"):
        open_slide(grey)
    cmyk = tmp_path / "print.tif"
    tifffile.imwrite(cmyk, np.full((512, 512, 4), 60, np.uint8), photometric="separated", tile=(256, 256),
                     resolution=(1e4 / 0.486,) * 2, resolutionunit="CENTIMETER")
    with pytest.raises(UserError, match=r"print.tif: a CMYK \(print\) image; expected a brightfield RGB scan"):
        open_slide(cmyk)


def test_slides_with_the_same_name_get_numbered_output_folders():
    from histodetect.slide.analyse.batch import _unique_names

    slides = [Path("x/node.tif"), Path("y/node.svs"), Path("z/node-2.tif"), Path("node.ndpi")]
    assert _unique_names(slides) == ["node", "node-2", "node-2-2", "node-3"]


def test_a_full_disk_writing_the_summary_keeps_the_tile_scores(trained_run, slide_path, tmp_path, monkeypatch):
    # summary.json, written last, went through write_file_atomic, which turns ENOSPC into a UserError:
    # the progress file and its key were already deleted, so the scores were lost and the rerun scored again.
    import errno
    import pathlib

    real_open = pathlib.Path.open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_for_the_summary(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return FullDisk(handle) if "summary.json" in self.name and "w" in mode else handle

    out = tmp_path / "node"
    config = SlideConfig(batch_size=32)
    monkeypatch.setattr(pathlib.Path, "open", full_disk_for_the_summary)
    with pytest.raises(UserError, match=rf"^{re.escape(str(out))}: cannot write it \(No space left on device\); "
                                        r"its tile scores are kept: run it again once there is space$"):
        analyse_slide(trained_run, slide_path, out, config, progress=False)
    assert sorted(p.name for p in (tmp_path / ".node.partial").iterdir()) == ["progress.npy", "settings_key"]
    monkeypatch.undo()
    result = analyse_slide(trained_run, slide_path, out, config, progress=False)
    assert result.summary["tiles_resumed"] == result.summary["tiles_read"] == 144
    assert json.loads((out / "summary.json").read_text())["tiles_read"] == 144
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.npy", "heatmap.png", "overlay.png", "regions.geojson",
                                                     "summary.json", "tiles.csv"]
