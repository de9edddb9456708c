"""Decoding a source into patches.npy, in worker processes when it pays, and compacting it."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import multiprocessing
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...errors import UserError, install_handlers, restore_handlers
from ...outputs import WRITE_ERRNOS
from ..decode import PATCH_SHAPE
from ..record import ChunkResult, PatchSource, ReadTask, read_chunk

# Below this many patches, worker processes cost more to start than they save.
MIN_PATCHES_FOR_WORKERS = 2048


def _allocate(fd: int, length: int) -> None:
    """Allocate the first `length` bytes of `fd` without writing them; OSError EOPNOTSUPP where the
    file system cannot. On Linux fallocate(2) itself: glibc's posix_fallocate, where the file system
    has no fallocate (NFS before 4.2, ZFS before 2.2, ext2), writes a byte into every block instead,
    which made `prepare` 3x slower (pcam-jpeg onto ext2: 6.0 s against 1.8 s), for no reservation
    on a copy-on-write file system."""
    if not sys.platform.startswith("linux"):
        os.posix_fallocate(fd, 0, length)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = getattr(libc, "fallocate64", None) or libc.fallocate  # 64-bit offsets on 32-bit glibc too
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    while fallocate(fd, 0, 0, length) != 0:
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def reserve_space(path: Path) -> None:
    """Reserve the disk blocks of the .npy file just made at `path` (a sparse memory map).

    Writing a sparse memory map on a full disk kills the writer with SIGBUS: `prepare`
    onto a disk too small for its store hung, the pool waiting for the dead worker's
    chunk (or, with one worker, died with "Bus error"). Reserved, a full disk is an
    ENOSPC OSError here, before any decoding. A file system that cannot reserve
    space (EOPNOTSUPP) is written as before.
    """
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    with path.open("r+b") as handle:
        try:
            _allocate(handle.fileno(), path.stat().st_size)
        except OSError as error:
            if error.errno in WRITE_ERRNOS:
                raise
            # EOPNOTSUPP, EINVAL: this file system reserves nothing; write as before


def _decode_into(job: tuple[ReadTask, Path]) -> ChunkResult:
    """Decode one task and write its pixels straight into the store's memory map.

    Runs in the workers: only ids' hashes and errors travel back to the parent.
    Sending the pixels back through a pipe made 2 workers slower than 1 on 2 cores
    (pcam-jpeg: 780 vs 1,170 patches/s, benchmarks/prepare_speed.py).
    """
    task, patches_path = job
    result = read_chunk(task)
    if len(result.good_rows):
        patches = np.load(patches_path, mmap_mode="r+")
        rows = task.start + result.good_rows
        if rows[-1] - rows[0] + 1 == len(rows):  # contiguous: a plain slice copy
            patches[rows[0] : rows[-1] + 1] = result.patches
        else:
            patches[rows] = result.patches
        patches.flush()
        del patches
    return dataclasses.replace(result, patches=result.patches[:0])


def ignore_interrupts() -> None:
    """Worker initializer: Ctrl-C reaches the whole process group, but only the parent
    should answer it (it stops the pool and removes the partial store); a worker that
    raised KeyboardInterrupt would print its own traceback. SIGTERM keeps its default:
    the pool's terminate() sends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_all(source: PatchSource, patches_path: Path, *, resize: bool, skip_bad: bool,
                workers: int, chunk_size: int, progress: bool):
    """Decode every item into row `i` of `patches_path`.

    Returns (source rows decoded, their SHA-1s, bad files, converted modes, number resized).
    """
    np.lib.format.open_memmap(patches_path, mode="w+", dtype=np.uint8, shape=(len(source), *PATCH_SHAPE)).flush()
    reserve_space(patches_path)
    jobs = [(task, patches_path) for task in source.tasks(chunk_size, resize=resize)]
    sha1_by_row = np.empty(len(source), dtype=object)
    good = np.zeros(len(source), dtype=bool)
    skipped: list[tuple[str, str]] = []
    converted: Counter[str] = Counter()
    n_resized = 0
    pool = None
    if workers > 1 and len(source) >= MIN_PATCHES_FOR_WORKERS:
        # fork where there is one: spawn re-runs the caller's __main__ in every worker,
        # which breaks (recursively) for a script without an `if __name__` guard. The
        # workers only decode with Pillow and numpy, never touching the parent's threads.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        # SIGTERM kills this process at once while its pool runs, as it did before the CLI answered
        # it (cli.entry): a scheduler signals the whole group, and a worker killed while it waited
        # for a task kept the task queue's lock, so the cleanup's pool.terminate() waited forever.
        # The hidden partial store left behind is removed by the next prepare (_remove_stale_partials).
        term_replaced = install_handlers(signal.SIG_DFL, (signal.SIGTERM,))
        pool = context.Pool(workers, initializer=ignore_interrupts)
        results = pool.imap_unordered(_decode_into, jobs)
    else:
        results = map(_decode_into, jobs)
    bar = tqdm(total=len(source), unit="patch", desc="prepare", disable=not progress, smoothing=0.05)
    try:
        for result in results:
            if result.errors and not skip_bad:
                path, reason = result.errors[0]
                raise UserError(f"{path}: {reason} (fix or remove it, or pass --skip-bad to skip bad files)")
            skipped += result.errors
            rows = result.start + result.good_rows
            good[rows] = True
            sha1_by_row[rows] = result.sha1s
            converted.update(result.converted_from)
            n_resized += result.n_resized
            bar.update(len(result.good_rows) + len(result.errors))
    finally:
        bar.close()
        if pool is not None:
            try:
                pool.terminate()
                pool.join()
            finally:
                restore_handlers(term_replaced)
    rows = np.flatnonzero(good)
    skipped.sort()
    return rows, list(sha1_by_row[rows]), skipped, dict(converted), n_resized


def _compact(patches_path: Path, keep: np.ndarray, chunk_rows: int = 4096) -> None:
    """Rewrite patches.npy with only the rows where `keep` is true, in order."""
    old = np.load(patches_path, mmap_mode="r")
    new_path = patches_path.with_suffix(".compact.npy")
    new = np.lib.format.open_memmap(new_path, mode="w+", dtype=np.uint8, shape=(int(keep.sum()), *PATCH_SHAPE))
    reserve_space(new_path)
    cursor = 0
    for begin in range(0, len(keep), chunk_rows):
        end = min(begin + chunk_rows, len(keep))
        chunk = old[begin:end][keep[begin:end]]
        new[cursor : cursor + len(chunk)] = chunk
        cursor += len(chunk)
    new.flush()
    del new, old
    os.replace(new_path, patches_path)
