"""PatchCamelyon HDF5: camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (+ _meta.csv).

Only the labels (`y`, 1 byte a patch) and shapes are read here; pixels are read
chunk by chunk later (record.read_chunk), never the whole `x` at once.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from .decode import PATCH_SHAPE
from .record import UNLABELLED, PatchSource

SPLITS = ("train", "valid", "test")
_X_NAME = re.compile(r"^(?P<prefix>.*?)(?P<split>train|valid|test)_x\.h5$")


def is_pcam_folder(root: Path) -> bool:
    return any(_X_NAME.match(p.name) for p in root.glob("*_x.h5")) or any(root.glob("*_x.h5.gz"))


def open_h5(path: Path):
    """Open an HDF5 file for reading, or say in one line why it can't be."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: not a readable HDF5 file ({exc}); is the download complete?") from None


def h5_dataset(h5, path: Path, key: str):
    if key not in h5:
        found = ", ".join(repr(k) for k in h5.keys()) or "nothing"
        raise UserError(f"{path}: no dataset {key!r} (found {found}). Is this a PCam file?")
    import h5py

    if not isinstance(h5[key], h5py.Dataset):
        raise UserError(f"{path}: {key!r} is an HDF5 group, not a dataset. Is this a PCam file?")
    return h5[key]


def read_h5_labels(y_path: Path, n_expected: int, x_path: Path) -> np.ndarray:
    with open_h5(y_path) as h5:
        y = h5_dataset(h5, y_path, "y")
        if len(y) != n_expected:
            raise UserError(
                f"{y_path}: {len(y)} labels but {x_path.name} holds {n_expected} patches; the pair must match"
            )
        # One label per patch: PCam's (N, 1, 1, 1), or (N, 1) / (N,). A one-hot (N, 2) would
        # otherwise be read by its first column, every label inverted.
        if y.size != len(y):
            raise UserError(f"{y_path}: dataset 'y' is {tuple(y.shape)}, expected one 0/1 label per patch "
                            "(N, 1, 1, 1) as PCam's; convert one-hot labels with argmax first")
        labels = np.asarray(y[:]).reshape(len(y))
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(f"{y_path}: row {row} has label {labels[row]}; labels must be 0 or 1")
    return labels.astype(np.int8)


def check_x_shape(x_path: Path) -> int:
    """Number of patches in an `x` file, after checking they are (N, 96, 96, 3) uint8."""
    with open_h5(x_path) as h5:
        x = h5_dataset(h5, x_path, "x")
        if tuple(x.shape[1:]) != PATCH_SHAPE or x.dtype != np.uint8:
            raise UserError(
                f"{x_path}: dataset 'x' is {x.dtype}{tuple(x.shape)}, expected uint8 (N, 96, 96, 3) patches"
            )
        return len(x)


def read_slide_ids(meta_path: Path, n_expected: int) -> list[str]:
    """The `wsi` column of a PCam meta CSV, or "" for every row when there is none."""
    if not meta_path.is_file():
        return [""] * n_expected
    try:
        with meta_path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError:
        raise UserError(f"{meta_path}: not a UTF-8 text CSV; save it as UTF-8") from None
    if rows and "wsi" not in rows[0]:
        raise UserError(f"{meta_path}: no 'wsi' column (found {', '.join(rows[0])}); is this a PCam meta CSV?")
    if len(rows) != n_expected:
        raise UserError(f"{meta_path}: {len(rows)} rows but the split holds {n_expected} patches")
    return [row["wsi"] for row in rows]


def read_pcam_folder(root: Path) -> PatchSource:
    """List a folder of PCam h5 files: one split per `*_x.h5`, labels from `*_y.h5` when present."""
    x_files = {}
    for path in sorted(root.glob("*_x.h5")):
        match = _X_NAME.match(path.name)
        if match:
            x_files[match["split"]] = (match["prefix"], path)
    if not x_files:
        gz = sorted(root.glob("*_x.h5.gz"))
        hint = f"gunzip {gz[0].name} first, or run 'histodetect download pcam'" if gz else "nothing found"
        raise UserError(f"{root}: no PCam '*_{{train,valid,test}}_x.h5' file ({hint})")
    ids, labels, splits, slides, parts = [], [], [], [], []
    for split in sorted(x_files, key=SPLITS.index):
        prefix, x_path = x_files[split]
        n = check_x_shape(x_path)
        y_path = root / f"{prefix}{split}_y.h5"
        labels.append(read_h5_labels(y_path, n, x_path) if y_path.exists() else np.full(n, UNLABELLED, np.int8))
        slides += read_slide_ids(root / f"{prefix}{split}_meta.csv", n)
        ids += [f"{split}_{row}" for row in range(n)]
        splits += [split] * n
        parts.append((x_path, n))
    return PatchSource(
        root=root,
        format="pcam_h5",
        ids=ids,
        labels=np.concatenate(labels),
        splits=splits,
        slides=slides,
        h5_parts=parts,
    )


def read_pcam_file(x_path: Path) -> PatchSource:
    """One h5 file of patches (key `x`), unlabelled, ids = row index: for `predict`."""
    n = check_x_shape(x_path)
    return PatchSource(
        root=x_path,
        format="pcam_h5",
        ids=[str(row) for row in range(n)],
        labels=np.full(n, UNLABELLED, np.int8),
        splits=["test"] * n,
        slides=[""] * n,
        h5_parts=[(x_path, n)],
    )
