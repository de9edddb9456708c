"""The one record every reader yields, and the read tasks behind it.

A reader (kaggle, pcam_h5, folder) first lists what a source holds without
decoding pixels: a `PatchSource` with ids, labels, splits and slide ids. Its
pixels are then read in chunks by `read_chunk`, a plain function of a picklable
`ReadTask`, so that `prepare` can run chunks in worker processes and `predict`
can stream them in-process. Both end in the same `PatchBatch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from .decode import PATCH_SHAPE, decode_patch_file, patch_sha1

UNLABELLED = -1


@dataclass
class PatchBatch:
    """Patches and what is known about them: the record shared by every format."""

    patches: np.ndarray  # (N, 96, 96, 3) uint8
    labels: np.ndarray  # (N,) int8: 0, 1, or UNLABELLED
    ids: list[str]
    splits: list[str]
    slides: list[str]  # "" where the source names no slide


@dataclass(frozen=True)
class ReadTask:
    """One chunk of a source to decode: either image files or rows of an HDF5 file."""

    start: int  # row of the first item in the source
    files: tuple[Path, ...] = ()
    h5_path: Path | None = None
    h5_rows: tuple[int, int] = (0, 0)  # [begin, end) rows of h5_path's dataset `x`
    resize: bool = False


@dataclass
class ChunkResult:
    """The decoded chunk: pixels of the good items, and why the others are bad."""

    start: int
    good_rows: np.ndarray  # (n_good,) offsets of decoded items within the chunk
    patches: np.ndarray  # (n_good, 96, 96, 3) uint8
    sha1s: list[str]
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    converted_from: list[str] = field(default_factory=list)  # original modes of converted items
    n_resized: int = 0


def _read_h5_rows_one_by_one(dataset, task: ReadTask) -> ChunkResult:
    """Rows [begin, end) of an HDF5 dataset, each read on its own; unreadable rows become errors."""
    begin, end = task.h5_rows
    good_rows, patches, errors = [], [], []
    for row in range(begin, end):
        try:
            patches.append(np.asarray(dataset[row], dtype=np.uint8))
            good_rows.append(row - begin)
        except OSError as exc:
            errors.append((f"{task.h5_path} row {row}", f"is damaged and cannot be read ({exc})"))
    pixels = np.stack(patches) if patches else np.zeros((0, *dataset.shape[1:]), dtype=np.uint8)
    return ChunkResult(task.start, np.asarray(good_rows, dtype=np.int64), pixels,
                       [patch_sha1(p) for p in pixels], errors)


def read_chunk(task: ReadTask) -> ChunkResult:
    """Decode one task. Runs in worker processes: bad files are returned, not raised."""
    if task.h5_path is not None:
        import h5py

        begin, end = task.h5_rows
        with h5py.File(task.h5_path, "r") as h5:
            try:
                patches = np.ascontiguousarray(h5["x"][begin:end], dtype=np.uint8)
            except OSError:
                # A damaged compressed chunk: read row by row to keep the rows that still decode.
                return _read_h5_rows_one_by_one(h5["x"], task)
        return ChunkResult(
            task.start, np.arange(len(patches)), patches, [patch_sha1(p) for p in patches]
        )
    good_rows, patches, sha1s, errors, converted, n_resized = [], [], [], [], [], 0
    for offset, path in enumerate(task.files):
        decoded = decode_patch_file(path, resize=task.resize)
        if decoded.error is not None:
            errors.append((str(path), decoded.error))
            continue
        good_rows.append(offset)
        patches.append(decoded.patch)
        sha1s.append(patch_sha1(decoded.patch))
        if decoded.converted_from:
            converted.append(decoded.converted_from)
        n_resized += decoded.resized_from is not None
    stacked = np.stack(patches) if patches else np.empty((0, *PATCH_SHAPE), np.uint8)
    return ChunkResult(task.start, np.asarray(good_rows, dtype=np.int64), stacked, sha1s, errors, converted, n_resized)


@dataclass
class PatchSource:
    """What a source holds, listed before any pixel is decoded."""

    root: Path
    format: str  # "kaggle", "pcam_h5" or "folder"
    ids: list[str]
    labels: np.ndarray  # (N,) int8: 0, 1, or UNLABELLED
    splits: list[str]
    slides: list[str]  # "" where the source names no slide
    files: list[Path] | None = None  # one per item, for file formats
    h5_parts: list[tuple[Path, int]] = field(default_factory=list)  # (x file, rows) per split, in order

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray) -> PatchSource:
        """The items at `rows`, in that order: for file formats (an h5 part's rows are read together)."""
        return replace(self, ids=[self.ids[r] for r in rows], labels=self.labels[rows],
                       splits=[self.splits[r] for r in rows], slides=[self.slides[r] for r in rows],
                       files=[self.files[r] for r in rows])

    def tasks(self, chunk_size: int = 256, *, resize: bool = False) -> list[ReadTask]:
        """Split the source into read tasks of about `chunk_size` items, in order."""
        if self.files is not None:
            return [
                ReadTask(start, tuple(self.files[start : start + chunk_size]), resize=resize)
                for start in range(0, len(self.files), chunk_size)
            ]
        tasks, first_row = [], 0
        for x_path, n_rows in self.h5_parts:
            for begin in range(0, n_rows, chunk_size):
                end = min(begin + chunk_size, n_rows)
                tasks.append(ReadTask(first_row + begin, h5_path=x_path, h5_rows=(begin, end)))
            first_row += n_rows
        return tasks

    def iter_batches(self, chunk_size: int = 256, *, resize: bool = False) -> Iterator[PatchBatch]:
        """Decode in this process, chunk by chunk; the first bad file raises UserError."""
        for task in self.tasks(chunk_size, resize=resize):
            result = read_chunk(task)
            if result.errors:
                path, reason = result.errors[0]
                raise UserError(f"{path}: {reason}")
            rows = slice(task.start, task.start + len(result.patches))
            yield PatchBatch(
                result.patches,
                self.labels[rows],
                self.ids[rows],
                self.splits[rows],
                self.slides[rows],
            )
