"""PatchStore: a prepared store opened, checked and memory-mapped; open_store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ...errors import UserError
from .layout import (
    INDEX_COLUMNS,
    INDEX_FILE,
    MANIFEST_FILE,
    PATCHES_FILE,
    STORE_FORMAT_VERSION,
)


class PatchStore:
    """A prepared store, memory-mapped: `patches[i]` reads one (96, 96, 3) uint8 patch."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.is_file():
            if (self.path / "run.json").is_file():
                raise UserError(f"{self.path}: a run folder, not a store; pass the store it was trained on "
                                "(run.json's data.path)")
            # Images (or an h5 file) there are the source to prepare; elsewhere the store can go there.
            holds_source = self.path.is_file() or (self.path.is_dir() and any(self.path.iterdir()))
            how = (f"'histodetect prepare {self.path} --out STORE'" if holds_source
                   else f"'histodetect prepare SRC --out {self.path}'")
            raise UserError(f"{self.path}: not a histodetect store (no {MANIFEST_FILE}); make one with {how}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{manifest_path}: corrupt ({exc.msg}); prepare the store again") from None
        missing = [key for key in ("n_patches", "splits", "fingerprint", "source")
                   if not isinstance(self.manifest, dict) or key not in self.manifest]
        if missing or not isinstance(self.manifest["n_patches"], int):
            what = f"no {', '.join(repr(k) for k in missing)}" if missing else "'n_patches' is not a count"
            raise UserError(f"{manifest_path}: not a store manifest ({what}); prepare the store again")
        version = self.manifest.get("format_version")
        if version != STORE_FORMAT_VERSION:
            raise UserError(
                f"{manifest_path}: store format {version}, this histodetect reads {STORE_FORMAT_VERSION}; prepare it again"
            )
        try:
            self.patches = np.load(self.path / PATCHES_FILE, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            raise UserError(f"{self.path / PATCHES_FILE}: unreadable ({exc or 'empty'}); prepare the store again") from None
        damaged = "the store is damaged, prepare it again"
        try:
            with (self.path / INDEX_FILE).open(newline="") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                columns = list(zip(*reader)) or [()] * len(INDEX_COLUMNS)
            if header is None or tuple(header) != INDEX_COLUMNS or len(columns) != len(INDEX_COLUMNS):
                raise ValueError(f"expected the columns {','.join(INDEX_COLUMNS)}")
            self.labels = np.asarray([int(label) for label in columns[1]], dtype=np.int8)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path / INDEX_FILE}: unreadable ({exc}); {damaged}") from None
        self.ids = np.asarray(columns[0], dtype=object)
        self.splits = np.asarray(columns[2], dtype=object)
        self.slides = np.asarray(columns[3], dtype=object)
        self.sha1s = np.asarray(columns[4], dtype=object)
        if not (len(self.patches) == len(self.ids) == self.manifest["n_patches"]):
            raise UserError(
                f"{self.path}: {len(self.patches)} patches but {len(self.ids)} index rows and a manifest of "
                f"{self.manifest['n_patches']}; {damaged}"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        counts = {split: int((self.splits == split).sum()) for split in self.split_names}
        return f"PatchStore({str(self.path)!r}, patches={len(self)}, splits={counts}, fingerprint={self.fingerprint[:12]!r})"

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest["splits"])

    def split_indices(self, split: str) -> np.ndarray:
        """Rows of one split, in store order; an unknown split is a UserError listing the known ones."""
        if split not in self.manifest["splits"]:
            raise UserError(f"{self.path}: no split {split!r} (found {', '.join(self.split_names)})")
        return np.flatnonzero(self.splits == split)

    def read_batch(self, indices: np.ndarray) -> np.ndarray:
        """Patches at `indices` (N, 96, 96, 3) uint8, in the order given."""
        # One fancy-index gather from the memory map: 267,000 patches/s in random
        # batches of 256 from a 100,000-patch store in the page cache, 4x faster than
        # sorting the indices first and scattering back (benchmarks/prepare_speed.py).
        return np.asarray(self.patches[np.asarray(indices)])


def open_store(path: Path) -> PatchStore:
    return PatchStore(path)
