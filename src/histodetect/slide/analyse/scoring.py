"""Scoring the tissue tiles: blocks read inline or in worker processes, batches scored, checkpoints saved."""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...predict import LoadedRun, predict_patches
from ..reader import SlideGeometry, SlideReader
from ..tiling import TileGrid, init_worker, read_block_tiles, worker_read_block
from .config import SlideConfig
from .resume import _save_progress

BLOCK_READ_PX = 1024  # a block of tiles is read as one region about this wide (level pixels)
MAX_BLOCK_CELLS = 16  # ... of at most 16 x 16 tiles (256 tiles, 7 MB of uint8)
CHECKPOINT_SECONDS = 30.0


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
