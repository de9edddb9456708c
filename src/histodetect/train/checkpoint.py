"""What a run folder keeps: atomic checkpoints, run.json, the package versions."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import UserError
from ..outputs import write_file_atomic

CHECKPOINT_FORMAT = "histodetect-checkpoint-1"
RUN_FILE = "run.json"


class _KeepWriteError:
    """The file torch.save writes to, keeping the OSError of a failed write: torch's zip writer
    reports a full disk as a RuntimeError ("unexpected pos 704 vs 598") and drops the OSError."""

    def __init__(self, handle) -> None:
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash, a full disk or an interrupt never
    leaves half a checkpoint, nor a temporary file beside it (outputs.write_file_atomic)."""
    def save(handle) -> None:
        file = _KeepWriteError(handle)
        try:
            torch.save(obj, file)
        except RuntimeError:
            if file.error is None:
                raise
            raise file.error from None  # write_file_atomic makes it one line naming `path`

    write_file_atomic(path, save, "wb")


def write_text_atomic(path: Path, text: str) -> None:
    """run.json and the like, written whole or not at all (outputs.write_file_atomic)."""
    write_file_atomic(path, lambda handle: handle.write(text))


def feed_digest(digest, handle) -> None:
    """Feed a hashlib object the rest of an open binary file, in blocks."""
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)


def load_checkpoint(path: Path, *, digest=None) -> dict:
    """A histodetect checkpoint, or a UserError in one line saying why it is not one.

    `digest` (a hashlib object) is fed the very bytes loaded: hashing the path again later
    names another file once the run is trained again (save_atomic replaces it).
    """
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint here; is this a histodetect run folder?")
    try:
        with path.open("rb") as handle:
            if digest is not None:
                feed_digest(digest, handle)
                handle.seek(0)
            checkpoint = torch.load(handle, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}); it is damaged, start a new run") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a histodetect checkpoint (expected format {CHECKPOINT_FORMAT})")
    return checkpoint


def package_versions() -> dict[str, str]:
    import sklearn
    import timm

    return {"histodetect": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version()}


def read_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run folder (no {RUN_FILE}); train one with 'histodetect train'")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt ({exc.msg})") from None
    if not isinstance(run, dict):
        raise UserError(f"{path}: not a run file (a JSON {type(run).__name__}, expected an object)")
    return run
