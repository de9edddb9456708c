"""Image folders: split/label/*.{jpg,png,tif}, label/*, or a flat folder of unlabelled patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .decode import IMAGE_SUFFIXES
from .record import UNLABELLED, PatchSource

LABEL_DIRS = ("0", "1")
# Common spellings of the splits (any case), each stored under one name.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "valid": "valid", "val": "valid", "validation": "valid", "dev": "valid",
    "test": "test", "testing": "test",
}


def split_name(folder_name: str) -> str:
    """A split folder's name as stored: 'Val', 'validation' -> 'valid'; unknown names as they are."""
    return SPLIT_ALIASES.get(folder_name.lower(), folder_name)


def _images(folder: Path) -> list[Path]:
    # Hidden files are skipped as hidden folders are: macOS leaves "._name.jpg" beside each image.
    # Sorted by name, the order of Paths in one folder, and faster to sort (kaggle.py).
    return sorted(
        (p for p in folder.iterdir()
         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda path: path.name,
    )


def _is_ours(folder: Path) -> bool:
    """A store (manifest.json) or run folder (run.json) histodetect wrote: not a split or label folder.

    `prepare data --out data/store` put one beside the label folders, and the next
    `prepare data` refused the folder for its unexpected "store" folder. A folder holding
    label folders is a split folder, and a label folder a label folder, whatever else they
    hold (another tool's manifest.json)."""
    if folder.name in LABEL_DIRS or any((folder / label).is_dir() for label in LABEL_DIRS):
        return False
    return (folder / "manifest.json").is_file() or (folder / "run.json").is_file()


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and not _is_ours(p))


def _labelled(folder: Path, split: str) -> list[tuple[Path, int, str]]:
    return [(path, int(label), split) for label in LABEL_DIRS if (folder / label).is_dir() for path in _images(folder / label)]


def list_image_files(paths: list[Path]) -> PatchSource:
    """Explicit image files, unlabelled: for `predict`."""
    return _source(paths[0].parent, [(p, UNLABELLED, "test") for p in paths])


def read_image_folder(root: Path) -> PatchSource:
    """List an image folder in one of the three layouts; anything else is a UserError."""
    subdirs = _subdirs(root)
    names = {d.name for d in subdirs}
    if names and names <= set(LABEL_DIRS):
        items = _labelled(root, "train")
    elif subdirs and all({d.name for d in _subdirs(s)} & set(LABEL_DIRS) for s in subdirs):
        items = [item for split_dir in subdirs for item in _labelled(split_dir, split_name(split_dir.name))]
    else:
        items = [(path, UNLABELLED, "test") for path in _images(root)]
        if not items and subdirs:
            raise UserError(
                f"{root}: found folders {', '.join(sorted(names)[:5])} but expected split/label/*.png, "
                "label/*.png (label 0 or 1) or a flat folder of images"
            )
    if not items:
        raise UserError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found; is this the right folder?")
    return _source(root, items)


def _source(root: Path, items: list[tuple[Path, int, str]]) -> PatchSource:
    def relative(path: Path) -> Path:
        return path.relative_to(root) if path.is_relative_to(root) else path

    # The file name without its extension; where two files share one, the path relative
    # to the root (the same name in two folders), and the extension too if that is not enough.
    for id_of in (lambda path: path.stem, lambda path: str(relative(path).with_suffix("")), lambda path: str(relative(path))):
        ids = [id_of(path) for path, _, _ in items]
        if len(set(ids)) == len(ids):
            break
    return PatchSource(
        root=root,
        format="folder",
        ids=ids,
        labels=np.array([label for _, label, _ in items], dtype=np.int8),
        splits=[split for _, _, split in items],
        slides=[""] * len(items),
        files=[path for path, _, _ in items],
    )
