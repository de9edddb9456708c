"""analyse_slide: one slide from the tissue mask and the tile grid to its result folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...outputs import WRITE_ERRNOS, naming_write_errors
from ...predict import LoadedRun, check_run
from ..outputs import region_features
from ..reader import SlideReader, open_slide, read_downsampled
from ..tiling import mask_downsample, plan_blocks, plan_grid, tile_tissue_fractions
from ..tissue import tissue_mask
from .config import SlideConfig, SlideResult, check_config
from .results import _summary, _write_outputs
from .resume import (
    PROGRESS_FILE,
    _existing_result,
    _install,
    _keep_scores,
    _load_progress,
    _settings,
    _settings_key,
)
from .scoring import _block_cells, _score_tiles

OVERVIEW_MAX_SIDE_PX = 1024


def analyse_slide(run: LoadedRun, slide_path: Path, out_dir: Path, config: SlideConfig | None = None, *,
                  overwrite: bool = False, progress: bool = True) -> SlideResult:
    """Tile the tissue of one slide, score the tiles with `run`, and write the results to `out_dir`.

    Writes heatmap.npy (rows, cols) float32 (NaN = not scored), heatmap.png,
    overlay.png, regions.geojson, tiles.csv (x, y = top-left in level-0 px, level,
    prob) and summary.json. A slide without tissue gives empty results, not an error.
    """
    run = check_run(run)
    config = config or SlideConfig()
    check_config(config)  # again: a field may have changed since the SlideConfig was made
    started = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    run.check_tta(config.tta)
    threshold = run.threshold_for(config.tta) if config.threshold is None else config.threshold
    geometry = open_slide(slide_path, mpp=config.mpp)
    grid = plan_grid(geometry, stride_px=config.stride_px, target_mpp=config.target_mpp, roi=config.roi)
    settings = _settings(run, slide_path, config, threshold)
    key = _settings_key(settings)
    existing = _existing_result(out_dir, settings, overwrite)
    if existing is not None:
        return SlideResult(slide_path, out_dir, existing, reused=True)

    partial = out_dir.parent / f".{out_dir.name}.partial"
    progress_path = partial / PROGRESS_FILE
    resumed = _load_progress(progress_path, key)
    if resumed is None:
        shutil.rmtree(partial, ignore_errors=True)
        with naming_write_errors(out_dir):
            partial.mkdir(parents=True)
            (partial / "settings_key").write_text(key)
    seconds = {"mask": 0.0, "read": 0.0, "inference": 0.0}

    tick = time.perf_counter()
    with SlideReader(geometry) as reader:
        mask_ds = mask_downsample(grid)
        width0, height0 = geometry.level_dimensions[0]
        mask = tissue_mask(read_downsampled(reader, (0, 0, width0, height0), mask_ds),
                           min_object_px=max(1, int((grid.tile_px0 / mask_ds) ** 2 / 2)),
                           max_hole_px=int(4 * (grid.tile_px0 / mask_ds) ** 2))
        keep = tile_tissue_fractions(mask, mask_ds, grid) >= config.min_tissue_fraction
        seconds["mask"] = time.perf_counter() - tick
        blocks = plan_blocks(keep, _block_cells(grid))
        order = np.concatenate(blocks) if blocks else np.empty(0, np.int64)  # flat grid index per tile
        if resumed is None or len(resumed) != len(order):
            resumed = np.full(len(order), np.nan, np.float32)  # one probability per tile; NaN = to do
        probs = resumed
        n_resumed = int((~np.isnan(probs)).sum())
        _score_tiles(run, reader, geometry, grid, blocks, probs, config, progress_path, seconds,
                     desc=slide_path.name, progress=progress)
        with naming_write_errors(out_dir):
            try:
                heatmap = np.full((grid.rows, grid.cols), np.nan, np.float32)
                heatmap.flat[order] = probs
                region = config.roi or (0, 0, width0, height0)
                overview = read_downsampled(reader, region, max(1.0, max(region[2], region[3]) / OVERVIEW_MAX_SIDE_PX))
                features = region_features(heatmap, grid, threshold, geometry.mpp)
                summary = _summary(slide_path, geometry, grid, config, threshold, probs, features, mask, seconds,
                                   n_resumed, key, time.perf_counter() - started, run)
                summary["settings"] = settings  # a rerun with other settings names what changed
                _write_outputs(partial, heatmap, grid, order, probs, features, overview, region, summary)
                _install(partial, out_dir)
            except BaseException as error:
                # Every tile is scored, and no checkpoint may hold the scores yet: Ctrl-C or SIGTERM while
                # the overview is read or the outputs are written lost them all. The half-written outputs go,
                # the scores stay for the rerun (a full disk: once removing the outputs made room).
                kept = partial.is_dir() and _keep_scores(partial, progress_path, probs)
                if kept and isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
                    raise UserError(f"{out_dir}: cannot write it ({error.strerror}); its tile scores are kept: "
                                    "run it again once there is space") from None
                raise
    return SlideResult(slide_path, out_dir, summary)
