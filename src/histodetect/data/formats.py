"""Detect a source's format and list it with the matching reader."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .folder import list_image_files, read_image_folder
from .kaggle import is_kaggle_folder, read_kaggle_folder
from .pcam_h5 import is_pcam_folder, read_pcam_file, read_pcam_folder
from .record import PatchSource

FORMATS = ("kaggle", "pcam_h5", "folder")


def detect_format(root: Path) -> str:
    """'kaggle' if train_labels.csv is there, 'pcam_h5' if *_x.h5 files are, else 'folder'."""
    if is_kaggle_folder(root):
        return "kaggle"
    if is_pcam_folder(root):
        return "pcam_h5"
    return "folder"


def open_source(src: Path, format: str | None = None) -> PatchSource:
    """List what `src` holds (a folder in one of FORMATS, or one .h5 file), without decoding pixels."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if format is not None and format not in FORMATS:
        raise UserError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if src.is_file():
        if src.suffix.lower() in (".h5", ".hdf5"):
            return read_pcam_file(src)
        return list_image_files([src])
    format = format or detect_format(src)
    reader = {"kaggle": read_kaggle_folder, "pcam_h5": read_pcam_folder, "folder": read_image_folder}[format]
    return reader(src)
