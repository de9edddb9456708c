"""analyse_slide(): a scanned slide in, a tumour heatmap, regions and a summary out.

Steps: open the slide and check its resolution (reader.py); pick the level and
lay the tile grid (tiling.py); find tissue on a thumbnail (tissue.py); read the
tissue tiles block by block, in worker processes or inline, and score them with
`histodetect.predict` in batches (so TTA, the run's centre crop and its
calibration apply exactly as for patches); write the outputs (outputs.py).

Memory is bounded whatever the slide's size: at most `2 * workers` blocks of
tiles are in flight and one batch is being scored. What grows with the slide is
small: a few bytes per tile, and the tissue mask's thumbnail at ~12 um/px (27 MB
for a 25 x 50 mm section). The outputs are written in a hidden `.NAME.partial` folder,
renamed to NAME when complete; the scores done so far are saved there every
`CHECKPOINT_SECONDS`, so an interrupted run, rerun with the same settings,
resumes where it stopped (and with other settings starts clean).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..augment import TTA_VIEW_COUNTS
from ..errors import UserError
from ..outputs import check_folder_location, write_file_atomic, write_json_atomic
from ..predict import DEFAULT_BATCH_SIZE, LoadedRun, predict_patches, write_csv_atomic
from .outputs import geojson_text, region_features, write_heatmap_png, write_overlay_png
from .reader import (
    SlideGeometry,
    SlideReader,
    has_slide_suffix,
    open_slide,
    read_downsampled,
    slide_stem,
)
from .tiling import (
    PCAM_MPP,
    TileGrid,
    init_worker,
    mask_downsample,
    plan_blocks,
    plan_grid,
    read_block_tiles,
    tile_tissue_fractions,
    worker_read_block,
)
from .tissue import tissue_mask

# Read in the main process by default: on the 2-core dev CPU, reading workers steal
# the cores inference needs. benchmarks/slide_speed.py, `cpu` run (histo_tinynet),
# 1,616 tiles, best (median) of 3 interleaved rounds: 241 (226) tiles/s inline,
# 194 (144) with 1 worker, 180 (134) with 2; reading alone runs at ~3,300 tiles/s,
# inference at ~260. On a GPU, where inference stops being the bottleneck,
# --workers may pay: not measured yet.
DEFAULT_WORKERS = 0
BLOCK_READ_PX = 1024  # a block of tiles is read as one region about this wide (level pixels)
MAX_BLOCK_CELLS = 16  # ... of at most 16 x 16 tiles (256 tiles, 7 MB of uint8)
CHECKPOINT_SECONDS = 30.0
OVERVIEW_MAX_SIDE_PX = 1024
SUMMARY_FILE = "summary.json"
PROGRESS_FILE = "progress.npy"
SLIDES_TABLE = "slides.csv"


@dataclass
class SlideConfig:
    """How to analyse a slide. The CLI fills it in; summary.json stores it."""

    stride_px: int = 96  # pixels (at PCam's resolution) between tiles; 32 = one tile per PCam label region
    tta: int = 1  # dihedral views averaged per tile (1, 4 or 8)
    mpp: float | None = None  # micrometres per level-0 pixel; None = from the slide's metadata
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height in level-0 pixels; None = whole slide
    threshold: float | None = None  # tumour regions: cells with prob >= this; None = the run's validation threshold
    min_tissue_fraction: float = 0.25  # a tile is scored when at least this share of it is tissue
    target_mpp: float = PCAM_MPP  # the resolution the model was trained at
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = DEFAULT_WORKERS  # reading processes; 0 = read in the main process


@dataclass
class SlideResult:
    slide: Path
    out_dir: Path
    summary: dict
    reused: bool = False  # a complete result with the same settings was already there


@dataclass
class SlidesReport:
    results: list[SlideResult] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (slide, one-line reason)
    table: Path | None = None  # slides.csv, when more than one slide was asked for


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """'x,y,w,h' (level-0 pixels) -> a tuple of 4 ints, or a UserError naming --roi."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise UserError(f"--roi {text!r}: expected x,y,width,height in level-0 pixels, "
                        f"e.g. --roi 20000,15000,4096,4096")
    return values


def find_slides(inputs: list[str | Path]) -> list[Path]:
    """Slide files from files, folders (their slide files, not recursive) and glob patterns, in order."""
    found: list[Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and has_slide_suffix(p))
            if not matches:
                raise UserError(f"{path}: no slide files in this folder (looked for .svs, .tif, .tiff, .ndpi, ...)")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file() and has_slide_suffix(Path(p)))
            if not matches:
                raise UserError(f"{item}: no slide file matches this pattern (looked for .svs, .tif, .tiff, ...)")
        else:
            raise UserError(f"{path}: no such slide file, folder or pattern")
        found += [m for m in matches if m not in found]
    return found


def analyse_slides(run: LoadedRun, inputs: list[str | Path], out: Path, config: SlideConfig | None = None, *,
                   overwrite: bool = False, progress: bool = True) -> SlidesReport:
    """Analyse one slide into `out`, or several (folders, patterns) into `out/NAME/` plus `out/slides.csv`.

    With several slides, one that fails is recorded (in the report and the table)
    and the others go on; slides already done with the same settings are reused.
    """
    config = config or SlideConfig()
    check_folder_location(out)
    slides = find_slides(inputs)
    if len(inputs) == 1 and Path(inputs[0]).is_file():
        return SlidesReport(results=[analyse_slide(run, slides[0], out, config, overwrite=overwrite,
                                                   progress=progress)])
    report = SlidesReport()
    names = _unique_names(slides)
    for slide, name in zip(slides, names):
        try:
            result = analyse_slide(run, slide, Path(out) / name, config, overwrite=overwrite, progress=progress)
        # One bad slide in a batch of hundreds must not cost the others: record any error
        # (a UserError, or a decoder failing on a corrupt tile) and go on.
        except Exception as exc:  # noqa: BLE001
            reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            report.failed.append((slide, reason))
            if progress:
                tqdm.write(f"{slide}: failed: {reason}")
        else:
            report.results.append(result)
        report.table = _write_slides_table(Path(out) / SLIDES_TABLE, report, names, slides)
    return report


def _unique_names(slides: list[Path]) -> list[str]:
    names: list[str] = []
    for slide in slides:
        name = slide_stem(slide)
        candidate, n = name, 1
        while candidate in names:
            n += 1
            candidate = f"{name}-{n}"
        names.append(candidate)
    return names


def _write_slides_table(path: Path, report: SlidesReport, names: list[str], slides: list[Path]) -> Path:
    columns = ("max_prob", "mean_prob", "tumour_area_mm2", "n_regions", "tiles_read", "seconds")
    by_slide = {r.slide: r for r in report.results}
    failed = dict(report.failed)
    rows = []
    for slide, name in zip(slides, names):
        if slide in by_slide:
            result = by_slide[slide]
            status = "reused" if result.reused else ("no tissue" if result.summary["tiles_read"] == 0 else "done")
            rows.append((str(slide), name, status, *(_cell(result.summary[c]) for c in columns), ""))
        elif slide in failed:
            rows.append((str(slide), name, "failed", *([""] * len(columns)), failed[slide]))
    return write_csv_atomic(path, ("slide", "out", "status", *columns, "error"), rows)


def _cell(value) -> str:
    return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))


def check_config(config: SlideConfig, threshold: float) -> None:
    """The options' ranges, checked before any work, as UserErrors naming the flag."""
    checks = [
        (config.tta in TTA_VIEW_COUNTS, f"--tta {config.tta}: expected one of {', '.join(map(str, TTA_VIEW_COUNTS))}"),
        (0 <= threshold <= 1, f"--threshold {threshold}: expected a probability between 0 and 1"),
        (0 <= config.min_tissue_fraction <= 1,
         f"--min-tissue {config.min_tissue_fraction}: expected a share of the tile between 0 and 1"),
        (config.batch_size >= 1, f"--batch-size {config.batch_size}: expected at least 1"),
        (config.workers >= 0, f"--workers {config.workers}: expected 0 (read in this process) or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def analyse_slide(run: LoadedRun, slide_path: Path, out_dir: Path, config: SlideConfig | None = None, *,
                  overwrite: bool = False, progress: bool = True) -> SlideResult:
    """Tile the tissue of one slide, score the tiles with `run`, and write the results to `out_dir`.

    Writes heatmap.npy (rows, cols) float32 (NaN = not scored), heatmap.png,
    overlay.png, regions.geojson, tiles.csv (x, y = top-left in level-0 px, level,
    prob) and summary.json. A slide without tissue gives empty results, not an error.
    """
    config = config or SlideConfig()
    started = time.perf_counter()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    check_config(config, 0.5 if config.threshold is None else config.threshold)
    run.check_tta(config.tta)
    threshold = run.threshold_for(config.tta) if config.threshold is None else config.threshold
    geometry = open_slide(slide_path, mpp=config.mpp)
    grid = plan_grid(geometry, stride_px=config.stride_px, target_mpp=config.target_mpp, roi=config.roi)
    key = _settings_key(run, slide_path, config, threshold)
    existing = _existing_result(out_dir, key, overwrite)
    if existing is not None:
        return SlideResult(slide_path, out_dir, existing, reused=True)

    partial = out_dir.parent / f".{out_dir.name}.partial"
    progress_path = partial / PROGRESS_FILE
    resumed = _load_progress(progress_path, key)
    if resumed is None:
        shutil.rmtree(partial, ignore_errors=True)
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

        heatmap = np.full((grid.rows, grid.cols), np.nan, np.float32)
        heatmap.flat[order] = probs
        region = config.roi or (0, 0, width0, height0)
        overview = read_downsampled(reader, region, max(1.0, max(region[2], region[3]) / OVERVIEW_MAX_SIDE_PX))
    features = region_features(heatmap, grid, threshold, geometry.mpp)
    summary = _summary(slide_path, geometry, grid, config, threshold, probs, features, mask, seconds,
                       n_resumed, key, time.perf_counter() - started, run)
    _write_outputs(partial, heatmap, grid, order, probs, features, overview, region, summary)
    _install(partial, out_dir)
    return SlideResult(slide_path, out_dir, summary)


def _block_cells(grid: TileGrid) -> int:
    stride_level = grid.stride_px0 / grid.level_downsample
    return int(max(1, min(BLOCK_READ_PX // max(stride_level, 1), MAX_BLOCK_CELLS)))


def _iter_block_tiles(reader: SlideReader, geometry: SlideGeometry, grid: TileGrid, blocks: list[np.ndarray],
                      todo: list[int], workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """(block number, tiles) for the blocks in `todo`, in order; at most 2 * workers blocks in flight."""
    if workers <= 0:
        for b in todo:
            yield b, read_block_tiles(reader, grid, blocks[b])
        return
    # spawn, not fork: this process runs torch's thread pools, which fork can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=init_worker, initargs=(geometry,)) as pool:
        pending: deque = deque()
        todo_iter = iter(todo)
        try:
            for b in todo_iter:
                pending.append((b, pool.submit(worker_read_block, grid, blocks[b])))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                b, future = pending.popleft()
                tiles = future.result()
                next_b = next(todo_iter, None)
                if next_b is not None:
                    pending.append((next_b, pool.submit(worker_read_block, grid, blocks[next_b])))
                yield b, tiles
        finally:
            for _, future in pending:
                future.cancel()


def _score_tiles(run: LoadedRun, reader: SlideReader, geometry: SlideGeometry, grid: TileGrid,
                 blocks: list[np.ndarray], probs: np.ndarray, config: SlideConfig, progress_path: Path,
                 seconds: dict, *, desc: str, progress: bool) -> None:
    """Fill `probs` (one per tile, blocks concatenated; NaN = to do) batch by batch, checkpointing."""
    starts = np.cumsum([0] + [len(b) for b in blocks])
    todo = [b for b in range(len(blocks)) if np.isnan(probs[starts[b] : starts[b + 1]]).any()]
    buffer: list[np.ndarray] = []
    buffered_blocks: list[int] = []
    last_checkpoint = time.perf_counter()
    with tqdm(total=len(probs), initial=len(probs) - sum(len(blocks[b]) for b in todo), unit="tile",
              desc=desc, disable=not progress, leave=False) as bar:

        def score_buffer() -> None:
            tick = time.perf_counter()
            scores = predict_patches(run, np.concatenate(buffer), tta=config.tta, batch_size=config.batch_size)
            seconds["inference"] += time.perf_counter() - tick
            offset = 0
            for b in buffered_blocks:
                n = starts[b + 1] - starts[b]
                probs[starts[b] : starts[b + 1]] = scores[offset : offset + n]
                offset += n
            bar.update(offset)
            buffer.clear()
            buffered_blocks.clear()

        tiles_iter = _iter_block_tiles(reader, geometry, grid, blocks, todo, config.workers)
        try:
            while True:
                tick = time.perf_counter()
                item = next(tiles_iter, None)
                seconds["read"] += time.perf_counter() - tick
                if item is None:
                    break
                buffer.append(item[1])
                buffered_blocks.append(item[0])
                if sum(len(t) for t in buffer) >= config.batch_size:
                    score_buffer()
                    if time.perf_counter() - last_checkpoint > CHECKPOINT_SECONDS:
                        _save_progress(progress_path, probs)
                        last_checkpoint = time.perf_counter()
            if buffer:
                score_buffer()
        except BaseException:
            _save_progress(progress_path, probs)  # Ctrl-C or a crash: keep what was scored for the rerun
            raise
        finally:
            tiles_iter.close()


def _settings_key(run: LoadedRun, slide_path: Path, config: SlideConfig, threshold: float) -> str:
    """Fingerprint of everything the results depend on (not workers / batch size)."""
    slide_stat = slide_path.stat()
    weights = run.run_dir / "checkpoints" / "best.pt"
    weights_stat = weights.stat() if weights.exists() else None
    settings = {
        "slide": [str(slide_path.resolve()), slide_stat.st_size, slide_stat.st_mtime_ns],
        "run": [str(run.run_dir.resolve()), weights_stat and weights_stat.st_mtime_ns],
        "config": {k: v for k, v in asdict(config).items() if k not in ("workers", "batch_size")},
        "threshold": threshold, "temperature": run.temperature, "version": __version__,
    }
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _existing_result(out_dir: Path, key: str, overwrite: bool) -> dict | None:
    """The summary of a complete result with these settings; a UserError if out_dir holds anything else."""
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file; --out names the folder to write the results into")
    summary_path = out_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary is not None and summary.get("settings_key") == key and not overwrite:
        return summary
    if overwrite and (summary is not None or not any(out_dir.iterdir())):
        return None
    if summary is None:  # never replaced, --overwrite or not: they are someone's files
        raise UserError(f"{out_dir}: already holds files that are not a slide result; choose another --out")
    raise UserError(f"{out_dir}: already holds a slide result from other settings; pass --overwrite to replace it, "
                    "or choose another --out")


def _load_progress(path: Path, key: str) -> np.ndarray | None:
    key_path = path.parent / "settings_key"
    if not path.is_file() or not key_path.is_file() or key_path.read_text() != key:
        return None
    return np.load(path)


def _save_progress(path: Path, probs: np.ndarray) -> None:
    write_file_atomic(path, lambda handle: np.save(handle, probs), "wb")


def _summary(slide_path: Path, geometry: SlideGeometry, grid: TileGrid, config: SlideConfig, threshold: float,
             probs: np.ndarray, features: list[dict], mask: np.ndarray, seconds: dict,
             n_resumed: int, key: str, total_seconds: float, run: LoadedRun) -> dict:
    scored = len(probs) > 0
    tumour_area = sum(f["properties"]["measurements"]["area_mm2"] for f in features)
    message = "" if scored else "no tissue found: nothing was scored (is the slide blank, or the --roi off the tissue?)"
    return {
        "slide": str(slide_path), "run": str(run.run_dir), "message": message,
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
        "settings_key": key, "histodetect": __version__,
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
    (folder / PROGRESS_FILE).unlink(missing_ok=True)
    (folder / "settings_key").unlink(missing_ok=True)
    write_json_atomic(folder / SUMMARY_FILE, summary)  # last: its presence marks a complete result


def _install(partial: Path, out_dir: Path) -> None:
    """Rename the complete partial folder to out_dir, replacing an old result only once the new one is whole."""
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)
