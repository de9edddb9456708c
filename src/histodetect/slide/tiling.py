"""Where the tiles go: the pyramid level, the tile grid, which tiles hold tissue, and reading them.

Coordinates: a `TileGrid` places tile (row, col)'s top-left corner at
`origin + (col, row) * stride` in level-0 pixels; the tile is `tile_px0` level-0
pixels wide and is read from `level` as `read_px` pixels, then resized to 96 if
that level's resolution is not PCam's. The heatmap cell of a tile is the
`stride`-wide square centred on the tile, so with `--stride 32` a cell is
exactly the centre 32x32 region that a PCam label describes.

Like reader.py, this module stays free of torch: worker processes import it.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import UserError
from .reader import SlideGeometry, SlideReader

PATCH_PX = 96
# PCam's patches come from Camelyon16 level 2: 0.243 um/px at level 0, times 4
# (Veeling et al., 2018, "Rotation equivariant CNNs for digital pathology"), i.e. 10x.
PCAM_MPP = 0.972
# A level within 10% of the target resolution is read as is (96 px tiles): scanners
# differ by that much at the same nominal magnification, and resampling blurs.
MPP_TOLERANCE = 0.10
# The tissue mask has this many pixels along a tile's side (one per 12 PCam pixels, ~12 um).
MASK_PX_PER_TILE = 8


def choose_level(level_mpps: list[float], target_mpp: float) -> int:
    """The pyramid level to read tiles from.

    The level nearest `target_mpp` when it is within MPP_TOLERANCE; else the
    coarsest level finer than the target (tiles are shrunk: no detail invented);
    else the finest level (tiles are enlarged).
    """
    ratios = [abs(math.log(m / target_mpp)) for m in level_mpps]
    nearest = int(np.argmin(ratios))
    if ratios[nearest] <= math.log(1 + MPP_TOLERANCE):
        return nearest
    finer = [i for i, m in enumerate(level_mpps) if m < target_mpp]
    if finer:
        return max(finer, key=lambda i: level_mpps[i])
    return min(range(len(level_mpps)), key=lambda i: level_mpps[i])


@dataclass(frozen=True)
class TileGrid:
    """The tiles of a slide (or of a region of it), in level-0 pixels."""

    level: int
    level_downsample: float
    origin_x0: float  # level-0 x of tile (0, 0)'s top-left corner
    origin_y0: float
    stride_px0: float  # level-0 pixels from one tile to the next
    tile_px0: float  # a tile's side in level-0 pixels
    read_px: int  # a tile's side in `level`'s pixels (resized to 96 when it differs)
    rows: int
    cols: int

    def tile_xy_level(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corners (x, y) of tiles in `level`'s pixels (int64 arrays)."""
        x = np.rint((self.origin_x0 + np.asarray(cols) * self.stride_px0) / self.level_downsample)
        y = np.rint((self.origin_y0 + np.asarray(rows) * self.stride_px0) / self.level_downsample)
        return x.astype(np.int64), y.astype(np.int64)

    def tile_xy0(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corners (x, y) in level-0 pixels of the tiles as read (int64 arrays)."""
        x, y = self.tile_xy_level(rows, cols)
        return (np.rint(x * self.level_downsample).astype(np.int64),
                np.rint(y * self.level_downsample).astype(np.int64))

    def cell_corner_xy0(self, corner_cols: np.ndarray, corner_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 (x, y) of heatmap cell corners: corner (c, r) is the top-left of cell (r, c)."""
        margin = (self.tile_px0 - self.stride_px0) / 2
        return (self.origin_x0 + margin + np.asarray(corner_cols) * self.stride_px0,
                self.origin_y0 + margin + np.asarray(corner_rows) * self.stride_px0)


# Tiles in one grid. The heatmap, probabilities, order and coordinates take some 30-40 bytes
# a tile (estimated from their dtypes), so --stride 1 over a 25 x 50 mm section (1.3 billion
# tiles) would need about 50 GB before the first tile is scored; 20 million tiles is about
# --stride 8 over that section, already hours of scoring on a GPU.
MAX_GRID_TILES = 20_000_000


def plan_grid(geometry: SlideGeometry, *, stride_px: int, target_mpp: float = PCAM_MPP,
              roi: tuple[int, int, int, int] | None = None) -> TileGrid:
    """Tiles of 96 target-resolution pixels every `stride_px` of them, over `roi` (level-0 x, y, w, h)."""
    # A heatmap cell is the stride-wide square centred on its tile: a stride longer than the
    # tile counted tissue no tile had seen (--stride 500: 0.47 mm^2 of "tumour" from 4 tiles of
    # 0.009 mm^2 each), and one longer than the slide reported "no tissue found".
    if not 1 <= stride_px <= PATCH_PX:
        raise UserError(f"--stride {stride_px}: expected a positive number of pixels up to {PATCH_PX} (96 = tiles "
                        "side by side; a longer stride skips the tissue between tiles, which the heatmap and the "
                        "tumour area would still count)")
    level = choose_level([geometry.level_mpp(i) for i in range(len(geometry.level_downsamples))], target_mpp)
    level_mpp = geometry.level_mpp(level)
    native = abs(math.log(level_mpp / target_mpp)) <= math.log(1 + MPP_TOLERANCE)
    tile_mpp = level_mpp if native else target_mpp  # the resolution the model sees
    width0, height0 = geometry.level_dimensions[0]
    x0, y0, w0, h0 = roi if roi is not None else (0, 0, width0, height0)
    if roi is not None and (w0 <= 0 or h0 <= 0 or x0 < 0 or y0 < 0 or x0 + w0 > width0 or y0 + h0 > height0):
        raise UserError(f"--roi {x0},{y0},{w0},{h0}: expected a region inside the slide's level 0 "
                        f"(0,0,{width0},{height0}) as x,y,width,height in level-0 pixels")
    tile_px0 = PATCH_PX * tile_mpp / geometry.mpp
    stride_px0 = stride_px * tile_mpp / geometry.mpp
    if w0 < tile_px0 or h0 < tile_px0:
        where = f"--roi {x0},{y0},{w0},{h0}" if roi is not None else f"{geometry.path}"
        raise UserError(f"{where}: {w0}x{h0} level-0 px is smaller than one {PATCH_PX}-px tile at "
                        f"{tile_mpp:.3g} um/px ({tile_px0:.0f} level-0 px); "
                        f"a single patch goes to 'histodetect predict'")
    rows, cols = int((h0 - tile_px0) // stride_px0) + 1, int((w0 - tile_px0) // stride_px0) + 1
    if rows * cols > MAX_GRID_TILES:
        where = f"--roi {x0},{y0},{w0},{h0}" if roi is not None else f"{geometry.path}"
        at_96 = (int((h0 - tile_px0) // tile_px0) + 1) * (int((w0 - tile_px0) // tile_px0) + 1)
        raise UserError(f"{where}: --stride {stride_px} makes {rows * cols:,} tiles, more than {MAX_GRID_TILES:,}; "
                        f"use a larger --stride (96: {at_96:,} tiles) or a smaller --roi")
    return TileGrid(
        level=level, level_downsample=geometry.level_downsamples[level], origin_x0=float(x0), origin_y0=float(y0),
        stride_px0=stride_px0, tile_px0=tile_px0,
        read_px=PATCH_PX if native else max(1, round(PATCH_PX * tile_mpp / level_mpp)),
        rows=rows, cols=cols,
    )


def mask_downsample(grid: TileGrid) -> float:
    """Level-0 pixels per tissue-mask pixel."""
    return grid.tile_px0 / MASK_PX_PER_TILE


def tile_tissue_fractions(mask: np.ndarray, mask_downsample0: float, grid: TileGrid) -> np.ndarray:
    """Share of each tile's footprint that the mask (of the whole slide, level-0 / mask_downsample0) calls tissue.

    Returns (rows, cols) float32, from a summed-area table: O(1) per tile.
    """
    summed = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    summed[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    cols, rows = np.arange(grid.cols), np.arange(grid.rows)
    left = np.clip(np.rint((grid.origin_x0 + cols * grid.stride_px0) / mask_downsample0), 0, mask.shape[1]).astype(int)
    top = np.clip(np.rint((grid.origin_y0 + rows * grid.stride_px0) / mask_downsample0), 0, mask.shape[0]).astype(int)
    side = max(1, round(grid.tile_px0 / mask_downsample0))
    right, bottom = np.minimum(left + side, mask.shape[1]), np.minimum(top + side, mask.shape[0])
    inside = (summed[bottom][:, right] - summed[top][:, right] - summed[bottom][:, left] + summed[top][:, left])
    return (inside / float(side * side)).astype(np.float32)


def plan_blocks(keep: np.ndarray, block_cells: int) -> list[np.ndarray]:
    """Group the kept tiles (True cells of `keep`, (rows, cols)) into square blocks read in one piece.

    Returns, per non-empty block, the flat indices (row * cols + col) of its tiles,
    blocks in row-major order: reading a block decodes each stored TIFF tile once
    instead of once per overlapping 96-px tile.
    """
    rows, cols = keep.shape
    blocks = []
    for r0 in range(0, rows, block_cells):
        for c0 in range(0, cols, block_cells):
            r, c = np.nonzero(keep[r0 : r0 + block_cells, c0 : c0 + block_cells])
            if len(r):
                blocks.append((r + r0) * cols + (c + c0))
    return blocks


def read_block_tiles(reader: SlideReader, grid: TileGrid, flat_indices: np.ndarray) -> np.ndarray:
    """The tiles (N, 96, 96, 3) uint8 at these flat grid indices, read as one region of `grid.level`."""
    rows, cols = np.divmod(np.asarray(flat_indices), grid.cols)
    xs, ys = grid.tile_xy_level(rows, cols)
    left, top = int(xs.min()), int(ys.min())
    region = reader.read(grid.level, left, top, int(xs.max()) - left + grid.read_px,
                         int(ys.max()) - top + grid.read_px)
    tiles = np.empty((len(xs), PATCH_PX, PATCH_PX, 3), np.uint8)
    for i, (x, y) in enumerate(zip(xs - left, ys - top)):
        tile = region[y : y + grid.read_px, x : x + grid.read_px]
        if grid.read_px != PATCH_PX:
            shrink = grid.read_px > PATCH_PX
            tile = np.asarray(Image.fromarray(tile).resize(
                (PATCH_PX, PATCH_PX), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR))
        tiles[i] = tile
    return tiles


# --- worker processes: each opens the slide once -------------------------------------------

_worker_reader: SlideReader | None = None


def init_worker(geometry: SlideGeometry) -> None:
    """Open the slide in a reader process. Ctrl-C is left to the parent, which stops the
    pool; a worker answering it too would print a traceback of its own."""
    global _worker_reader
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_reader = SlideReader(geometry)


def worker_read_block(grid: TileGrid, flat_indices: np.ndarray) -> np.ndarray:
    return read_block_tiles(_worker_reader, grid, flat_indices)
