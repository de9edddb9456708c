"""Where a store goes: checking --out, clearing killed prepares' partials, moving a store in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ...errors import UserError
from .layout import MANIFEST_FILE, is_store


def _check_out_folder(out: Path, overwrite: bool) -> None:
    if out.is_file():
        raise UserError(f"{out}: is a file; --out must name a folder for the store")
    blocking = next((parent for parent in out.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{out}: {blocking} is a file, not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_store(out):
        raise UserError(f"{out}: exists, is not empty and is not a store; choose a new --out")
    if not overwrite:
        raise UserError(f"{out}: already holds a store; pass --overwrite to replace it")


def _remove_stale_partials(out: Path) -> None:
    """Delete hidden partial stores left by prepares that were killed."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = int(partial.name.rsplit("-", 1)[1]) if partial.name.rsplit("-", 1)[1].isdigit() else -1
        try:
            os.kill(pid, 0)
        except (OSError, ValueError):
            shutil.rmtree(partial, ignore_errors=True)


def _install(partial: Path, out: Path) -> None:
    """Move a finished store into place; an old store is removed only after that.

    An empty folder at `out` (perhaps the shell's working folder) is kept and filled,
    the manifest last: until it lands, the folder is not a store.
    """
    if out.is_dir() and not any(out.iterdir()):
        for item in sorted(partial.iterdir(), key=lambda path: path.name == MANIFEST_FILE):
            os.replace(item, out / item.name)
        partial.rmdir()
        return
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
