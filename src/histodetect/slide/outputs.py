"""What a slide's analysis writes: heatmap (.npy, colour PNG, over the thumbnail), regions (GeoJSON), tiles (CSV).

All coordinates written are level-0 pixels, the convention of QuPath, ASAP and
the Camelyon annotations, so the files line up with the slide in any viewer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from .regions import label_regions, trace_rings
from .tiling import TileGrid

HEATMAP_COLORMAP = "inferno"
HEATMAP_PNG_MIN_SIDE_PX = 512  # small grids are enlarged (nearest neighbour) to at least this
OVERLAY_ALPHA = 0.5
OUTLINE_RGB = (0, 229, 255)  # cyan: apart from both the colour map and H&E


def heatmap_rgba(heatmap: np.ndarray) -> np.ndarray:
    """(rows, cols) probabilities, NaN where no tile was scored -> (rows, cols, 4) uint8, NaN transparent."""
    rgba = colormaps[HEATMAP_COLORMAP](np.nan_to_num(heatmap, nan=0.0), bytes=True)
    rgba[np.isnan(heatmap), 3] = 0
    return rgba


def write_heatmap_png(heatmap: np.ndarray, path: Path) -> Path:
    """One block of pixels per cell, background transparent."""
    scale = max(1, -(-HEATMAP_PNG_MIN_SIDE_PX // max(heatmap.shape)))
    rgba = heatmap_rgba(heatmap).repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def region_features(heatmap: np.ndarray, grid: TileGrid, threshold: float, mpp: float) -> list[dict]:
    """GeoJSON Features, one per 4-connected group of cells with probability >= threshold.

    Coordinates are level-0 pixels (x right, y down). Outlines run clockwise on
    screen, which is counter-clockwise with y up, as RFC 7946 asks; holes the other way.
    """
    from scipy import ndimage

    above = np.nan_to_num(heatmap, nan=0.0) >= threshold
    labels, _ = label_regions(above)
    cell_area_mm2 = (grid.stride_px0 * mpp / 1000) ** 2
    features = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        cells = labels[box] == k
        rings = []
        for ring in trace_rings(cells):
            cols = np.array([p[0] for p in ring]) + box[1].start
            rows = np.array([p[1] for p in ring]) + box[0].start
            xs, ys = grid.cell_corner_xy0(cols, rows)
            rings.append([[round(float(x), 1), round(float(y), 1)] for x, y in zip(xs, ys)])
        probs = heatmap[box][cells]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                # QuPath reads objectType and classification; "Tumor" is its built-in class.
                "objectType": "annotation",
                "name": f"tumour region {k}",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "measurements": {
                    "area_mm2": round(float(cells.sum() * cell_area_mm2), 6),
                    "max_prob": round(float(probs.max()), 6),
                    "mean_prob": round(float(probs.mean()), 6),
                    "n_cells": int(cells.sum()),
                },
            },
        })
    return features


def geojson_text(features: list[dict]) -> str:
    return json.dumps({"type": "FeatureCollection", "features": features}) + "\n"


def write_overlay_png(thumbnail: np.ndarray, heatmap: np.ndarray, grid: TileGrid,
                      region: tuple[int, int, int, int], features: list[dict], path: Path, title: str) -> Path:
    """The heatmap (semi-transparent) and the regions' outlines over the thumbnail of `region` (level-0 x, y, w, h).

    Drawn with PIL, not matplotlib: a matplotlib figure of this size peaked at
    ~100 MB of Python memory (tracemalloc), more than the whole tiling pipeline.
    """
    x0, y0, w0, h0 = region
    height, width = thumbnail.shape[:2]
    scale_x, scale_y = width / w0, height / h0  # thumbnail pixels per level-0 pixel
    # Heatmap cell of every thumbnail pixel (-1 outside the grid).
    xs, ys = x0 + (np.arange(width) + 0.5) / scale_x, y0 + (np.arange(height) + 0.5) / scale_y
    margin = (grid.tile_px0 - grid.stride_px0) / 2
    cols = np.floor((xs - grid.origin_x0 - margin) / grid.stride_px0).astype(int)
    rows = np.floor((ys - grid.origin_y0 - margin) / grid.stride_px0).astype(int)
    cols[(cols < 0) | (cols >= grid.cols)] = -1
    rows[(rows < 0) | (rows >= grid.rows)] = -1
    # Colour the cells, then index: colouring per thumbnail pixel took 30 MB (float64 lookups).
    cell_rgba = heatmap_rgba(np.pad(heatmap, ((0, 1), (0, 1)), constant_values=np.nan))  # index -1: transparent
    colour = cell_rgba[rows[:, None], cols[None, :]]  # (height, width, 4) uint8
    alpha = (colour[..., 3:] * OVERLAY_ALPHA).astype(np.uint16)  # 0..255
    blended = ((thumbnail * (255 - alpha) + colour[..., :3] * alpha + 127) // 255).astype(np.uint8)

    bar_px = 44
    font = ImageFont.load_default(size=13)
    title_px = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 8
    canvas = Image.new("RGB", (max(width, 260, title_px), height + bar_px), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for feature in features:
        for ring in feature["geometry"]["coordinates"]:
            draw.line([((x - x0) * scale_x, (y - y0) * scale_y) for x, y in ring], fill=OUTLINE_RGB, width=2)
    ramp = colormaps[HEATMAP_COLORMAP](np.linspace(0, 1, 200), bytes=True)[:, :3]
    canvas.paste(Image.fromarray(np.repeat(ramp[None], 10, axis=0)), (30, height + 6))
    draw.text((4, height + 3), "p=0", fill="black", font=font)
    draw.text((234, height + 3), "1", fill="black", font=font)
    draw.text((4, height + 22), title, fill="black", font=font)
    canvas.save(path)
    return path
