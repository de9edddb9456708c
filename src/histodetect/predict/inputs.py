"""The patches to score: stores, image folders (any reader format), image files and PCam
h5 files, grouped, counted and decoded chunk by chunk as InputChunks."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.decode import IMAGE_SUFFIXES
from ..data.folder import list_image_files
from ..data.formats import open_source
from ..data.record import UNLABELLED, read_chunk
from ..data.store import is_store, open_store
from ..errors import UserError


@dataclass
class InputChunk:
    ids: list[str]
    patches: np.ndarray  # (N, 96, 96, 3) uint8
    labels: np.ndarray  # (N,) int8, UNLABELLED where unknown


def input_paths(inputs: Path | str | Iterable[Path | str], kinds: str = "files, folders, stores") -> list[Path]:
    """The inputs as a list of paths: one path (str or Path) is a list of one, not of its characters.

    Any iterable of paths is a list of them: Path.glob's generator, a numpy array of str, a set.
    `kinds` says in the message what the paths may name.
    """
    if isinstance(inputs, (str, os.PathLike)):
        return [Path(inputs)]
    try:
        items = list(inputs)
    except TypeError:  # not iterable: named below as what was found
        items = [inputs]
    wrong = [item for item in items if not isinstance(item, (str, os.PathLike))]
    if wrong:
        raise UserError(f"inputs: expected a path or a list of paths ({kinds}), found "
                        f"{type(wrong[0]).__name__} {wrong[0]!r:.60}")
    return [Path(item) for item in items]


def _group_inputs(inputs: list[Path]) -> list[Path | list[Path]]:
    """Image files given one by one are read as one group; folders, stores and h5 files alone."""
    groups: list[Path | list[Path]] = []
    files: list[Path] = []
    for path in map(Path, inputs):
        if not path.exists():
            store, _, split = str(path).rpartition(":")
            if store and split and is_store(Path(store)):  # evaluate's and calibrate's STORE:split
                raise UserError(f"{path}: no such file or folder; name a store's split with --split: "
                                f"'{store} --split {split}'")
            raise UserError(f"{path}: no such file or folder")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        elif path.is_file() and path.suffix.lower() not in (".h5", ".hdf5"):
            raise UserError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}), h5 file, store or folder")
        else:
            groups.append(path)
    return groups + ([files] if files else [])


def _open_input(item: Path | list[Path], split: str | None, resize: bool, unlabelled_only: bool):
    """(number of patches, a function yielding InputChunks)."""
    if isinstance(item, list):
        source = list_image_files(item)
    elif is_store(item):
        store = open_store(item)
        rows = store.split_indices(split) if split else np.arange(len(store))
        if unlabelled_only:
            rows = rows[store.labels[rows] == UNLABELLED]

        def chunks(chunk_size: int) -> Iterator[InputChunk]:
            for begin in range(0, len(rows), chunk_size):
                part = rows[begin : begin + chunk_size]
                yield InputChunk(list(store.ids[part]), store.read_batch(part), store.labels[part])

        return len(rows), chunks
    else:
        source = open_source(item)
    keep = np.array([split is None or s == split for s in source.splits])
    name = item if not isinstance(item, list) else ", ".join(map(str, item))
    if split and not keep.any():
        raise UserError(f"{name}: no patches in split {split!r} (found {', '.join(sorted(set(source.splits)))})")
    if len(source) == 0:
        raise UserError(f"{name}: holds no patches")
    if unlabelled_only:
        keep &= source.labels == UNLABELLED
    if source.files is not None and not keep.all():
        # Only the files kept are decoded: a Kaggle folder's submission decoded train/'s
        # 220,025 files too (23 s of 70), and its bar counted them (277,483 for 57,458 scored).
        source, keep = source.subset(np.flatnonzero(keep)), np.ones(int(keep.sum()), dtype=bool)

    def chunks(chunk_size: int) -> Iterator[InputChunk]:
        # read_chunk rather than source.iter_batches: it also counts the resized files.
        n_resized = 0
        for task in source.tasks(chunk_size, resize=resize):
            result = read_chunk(task)
            if result.errors:
                path, reason = result.errors[0]
                raise UserError(f"{path}: {reason}")
            n_resized += result.n_resized
            rows = np.arange(task.start, task.start + len(result.patches))
            mask = keep[rows]
            if mask.any():
                yield InputChunk([source.ids[r] for r in rows[mask]], result.patches[mask], source.labels[rows[mask]])
        # One line with the input's total, once its chunks are read: a warning per chunk said
        # "resized 1024 patches", then the last chunk's count, for 3,000 resized files.
        if n_resized:
            warnings.warn(f"{item if not isinstance(item, list) else 'inputs'}: resized {n_resized} "
                          "patches that were not 96x96 pixels (--resize); their scores are less reliable",
                          stacklevel=2)

    return int(keep.sum()), chunks


def open_inputs(inputs: list[Path], *, split: str | None = None, chunk_size: int = 1024, resize: bool = False,
                unlabelled_only: bool = False) -> tuple[int, Iterator[InputChunk]]:
    """List every input once: the number of patches, and their chunks, decoded in order as they are iterated.

    Listed once because a Kaggle folder of 277,483 files took 4-5 s to list: counting
    first and listing again to read doubled the wait before `predict`'s first line.
    Image files not 96x96 are refused, or resized with `resize`. `unlabelled_only`
    keeps the unlabelled patches (a Kaggle folder's test/), for a Kaggle submission.
    """
    opened = [_open_input(item, split, resize, unlabelled_only) for item in _group_inputs(inputs)]
    return sum(n for n, _ in opened), (chunk for _, chunks in opened for chunk in chunks(chunk_size))


def iter_inputs(inputs: list[Path], *, split: str | None = None, chunk_size: int = 1024,
                resize: bool = False) -> Iterator[InputChunk]:
    """Decode the inputs chunk by chunk, in order (`open_inputs` without the count)."""
    yield from open_inputs(inputs, split=split, chunk_size=chunk_size, resize=resize)[1]
