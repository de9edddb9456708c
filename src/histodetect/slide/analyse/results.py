"""A slide's result files: the summary (summary.json) and the heatmap, overlay, regions and tiles it comes with."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ...predict import LoadedRun
from ..outputs import geojson_text, write_heatmap_png, write_overlay_png
from ..reader import SlideGeometry
from ..tiling import TileGrid
from .config import SlideConfig
from .resume import PROGRESS_FILE, SUMMARY_FILE


def _summary(slide_path: Path, geometry: SlideGeometry, grid: TileGrid, config: SlideConfig, threshold: float,
             probs: np.ndarray, features: list[dict], mask: np.ndarray, seconds: dict,
             n_resumed: int, key: str, total_seconds: float, run: LoadedRun) -> dict:
    scored = len(probs) > 0
    tumour_area = sum(f["properties"]["measurements"]["area_mm2"] for f in features)
    message = "" if scored else "no tissue found: nothing was scored (is the slide blank, or the --roi off the tissue?)"
    return {
        "slide": str(slide_path.resolve()), **run.computed_by(), "message": message,
        "max_prob": float(probs.max()) if scored else None,
        "mean_prob": float(probs.mean()) if scored else None,
        "tumour_area_mm2": round(tumour_area, 6), "n_regions": len(features), "threshold": threshold,
        "tiles_read": len(probs), "tiles_resumed": n_resumed, "tiles_in_grid": grid.rows * grid.cols,
        "tissue_fraction_of_slide": round(float(mask.mean()), 6),
        "seconds": round(total_seconds, 3), "seconds_mask": round(seconds["mask"], 3),
        "seconds_read": round(seconds["read"], 3), "seconds_inference": round(seconds["inference"], 3),
        "tiles_per_second": round(len(probs) / total_seconds, 2) if total_seconds > 0 else None,
        "level": grid.level, "level_mpp": geometry.level_mpp(grid.level), "mpp": geometry.mpp,
        "mpp_source": geometry.mpp_source, "backend": geometry.backend,
        "level_dimensions": [list(d) for d in geometry.level_dimensions],
        "grid": {"rows": grid.rows, "cols": grid.cols, "origin_x0": grid.origin_x0, "origin_y0": grid.origin_y0,
                 "stride_px0": grid.stride_px0, "tile_px0": grid.tile_px0, "read_px": grid.read_px,
                 "cell": "heatmap cell (r, c) is the stride-wide square centred on tile (r, c)"},
        "config": json.loads(json.dumps(asdict(config))),  # as read back from the file: roi a list
        "tta": config.tta, "temperature": run.temperature,
        "settings_key": key,
    }


def _write_outputs(folder: Path, heatmap: np.ndarray, grid: TileGrid, order: np.ndarray, probs: np.ndarray,
                   features: list[dict], overview: np.ndarray, region: tuple, summary: dict) -> None:
    np.save(folder / "heatmap.npy", heatmap)
    write_heatmap_png(heatmap, folder / "heatmap.png")
    name = Path(summary["slide"]).name
    peak = "no tissue" if summary["max_prob"] is None else f"max prob {summary['max_prob']:.3f}"
    write_overlay_png(overview, heatmap, grid, region, features, folder / "overlay.png",
                      f"{name}: {summary['tiles_read']} tiles, {peak}, {summary['n_regions']} regions "
                      f">= {summary['threshold']:.2f} ({summary['tumour_area_mm2']:.3f} mm^2)")
    (folder / "regions.geojson").write_text(geojson_text(features))
    rows, cols = np.divmod(order, grid.cols)
    xs, ys = grid.tile_xy0(rows, cols)
    with (folder / "tiles.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("x", "y", "level", "prob"))
        writer.writerows((int(x), int(y), grid.level, f"{p:.6f}") for x, y, p in zip(xs, ys, probs))
    # Written straight into the partial folder (installed whole), so that a full disk is the OSError
    # analyse_slide answers by keeping the tile scores: write_json_atomic's UserError lost them.
    # The progress and its key go only once the summary is written, for the same reason.
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    (folder / "settings_key").unlink(missing_ok=True)
