"""The store's files and format version, and what the manifest records of its content."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..record import UNLABELLED

STORE_FORMAT_VERSION = 1
PATCHES_FILE = "patches.npy"
INDEX_FILE = "index.csv"
MANIFEST_FILE = "manifest.json"
SKIPPED_FILE = "skipped.csv"
INDEX_COLUMNS = ("id", "label", "split", "slide", "sha1")


def is_store(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def _fingerprint(sha1s: list[str], labels: np.ndarray, splits: list[str]) -> str:
    """SHA-1 over every patch's pixel hash, label and split, in store order."""
    digest = hashlib.sha1()
    for sha1, label, split in zip(sha1s, labels.tolist(), splits):
        digest.update(f"{sha1},{label},{split}\n".encode())
    return digest.hexdigest()


def split_counts(labels: np.ndarray, splits: np.ndarray) -> dict[str, dict[str, int]]:
    counts = {}
    for split in dict.fromkeys(splits.tolist()):
        in_split = labels[splits == split]
        counts[split] = {
            "n": int(len(in_split)),
            "positive": int((in_split == 1).sum()),
            "negative": int((in_split == 0).sum()),
            "unlabelled": int((in_split == UNLABELLED).sum()),
        }
    return counts
