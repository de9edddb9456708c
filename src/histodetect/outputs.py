"""Where results go: `--out` paths checked before any work starts, and files written whole.

A command that scores 57,000 patches for an hour must not fail at its last line
because `--out` names a folder, sits inside a file or on a read-only disk; and it
must never delete what was there (`evaluate --out .` once emptied the working folder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import UserError


def _nearest_existing(path: Path) -> Path:
    return next(folder for folder in (path, *path.parents) if folder.exists())


def _check_parent_writable(path: Path, flag: str) -> None:
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {existing} (permission denied or a read-only disk)")


def check_folder_location(path: Path, flag: str = "--out") -> Path:
    """Refuse a folder path that is a file or cannot be made (a file in the way, a read-only
    disk), before any work; what it may already hold is the command's own business."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file; name a folder for the output")
    _check_parent_writable(path, flag)
    return path


def is_stdout(path: Path) -> bool:
    return str(path) in ("-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")


def is_stream(path: Path) -> bool:
    """/dev/stdout, /dev/null, /proc/self/fd/N, a named pipe: written straight through, never replaced
    by a renamed temporary file (with stdout sent to a file, /dev/stdout resolves to that file).
    A file in a folder below /dev (/dev/shm/run/last.pt, a tmpfs) is a file like any other."""
    path = Path(path)
    if is_stdout(path) or str(path).startswith("/proc/") or str(path.parent) in ("/dev", "/dev/fd"):
        return True
    if not path.exists():
        return False
    mode = path.stat().st_mode
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))  # a pipe, a socket, a character device


def check_output_file(path: Path, flag: str = "--out", example: str = "preds.csv", *,
                      is_ours: Callable[[Path], bool] | None = None, protect: list[Path] = ()) -> Path:
    """Refuse an output file path that cannot be written, before the work that fills it.

    With `is_ours`, an existing file is replaced only if it says it is an earlier output
    of the command (`predict --out photo.jpg` must not turn an input image into a CSV);
    nothing is ever written at or inside a `protect` path (a run's checkpoints, an input).
    """
    path = Path(path)
    if is_stream(path):
        return path
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; pass a file name such as {path / example}")
    resolved = path.resolve()
    for kept in protect:
        kept = Path(kept).resolve()
        if resolved == kept or kept in resolved.parents:
            raise UserError(f"{flag} {path}: would overwrite {kept}; choose another path such as {example}")
    if is_ours is not None and path.is_file() and not is_ours(path):
        raise UserError(f"{flag} {path}: exists and is not an earlier output of this command; "
                        f"choose another path such as {example}")
    _check_parent_writable(path, flag)
    return path


def check_output_folder(path: Path, flag: str, is_ours: Callable[[Path], bool], keep: list[Path]) -> Path:
    """Refuse an output folder that exists and is not an earlier output of the same command.

    `is_ours(folder)` says whether an existing folder is one this command wrote (it
    will be replaced); `keep` lists folders that must survive (the run, the store),
    so neither they nor anything holding them, nor the working folder, can be `--out`.
    """
    path = Path(path)
    resolved = path.resolve()
    for kept in [Path.cwd(), *keep]:
        kept = Path(kept).resolve()
        if resolved == kept or resolved in kept.parents:
            raise UserError(f"{flag} {path}: would replace {kept}; name a new folder for the output")
    check_folder_location(path, flag)
    if path.is_dir() and any(path.iterdir()) and not is_ours(path):
        raise UserError(f"{flag} {path}: exists and holds other files; name a new folder for the output")
    return path


def replace_folder(partial: Path, out: Path) -> None:
    """Move a finished output folder into place; an earlier one goes only after the new one is there."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)


# What only a write can fail with: a full disk, a quota, a file too large for its file system, a read-only one.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class FileWriteError(UserError):
    """`write_file_atomic`'s one line, with the OSError's errno kept, so that `naming_write_errors`
    can name the output the user asked for rather than a file in a hidden partial folder."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"{path}: cannot write it ({error.strerror or error})")
        self.errno = error.errno


@contextlib.contextmanager
def naming_write_errors(where: Path, advice: str = "") -> Iterator[None]:
    """A full or read-only disk while the block fills an output: one line naming `where`
    (Pillow, numpy and csv raise it without a file name: "[Errno 28] No space left on device")."""
    try:
        yield
    except (OSError, FileWriteError) as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        # os.strerror: h5py's strerror is a whole paragraph ("Can't synchronously write data (file write failed: ...").
        # The advice (free some space, ...) is for a full disk, not a read-only one.
        raise UserError(f"{where}: cannot write it ({os.strerror(error.errno)})"
                        f"{advice if error.errno != errno.EROFS else ''}") from None


def write_file_atomic(path: Path, write: Callable[[IO], None], mode: str = "w") -> Path:
    """Call `write(handle)` on a temporary file beside `path`, then rename it over `path`.

    A reader never sees half a file, and a failure leaves the old one. A `path` that is
    not a regular file (/dev/stdout, a named pipe) is written straight through instead.
    Disk errors become one-line UserErrors naming the file. Text is UTF-8 whatever the
    locale (a file name in a CSV, a micrometre sign in a report).
    """
    path = Path(path)
    newline = {"newline": "", "encoding": "utf-8"} if "b" not in mode else {}
    try:
        if is_stdout(path):
            # This process's own stdout, not a reopening of it: opened anew, /dev/stdout redirected
            # to a file would start at offset 0 again and the next print would overwrite the CSV.
            sys.stdout.flush()
            with os.fdopen(os.dup(sys.stdout.fileno()), mode, **newline) as handle:
                write(handle)
            return path
        if is_stream(path):
            with path.open(mode, **newline) as handle:
                write(handle)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open(mode, **newline) as handle:
                write(handle)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise FileWriteError(path, exc) from None
    return path


def write_json_atomic(path: Path, obj) -> Path:
    """Write `obj` as indented JSON (e.g. metrics.json), atomically; NaN is refused, as JSON has none."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    return write_file_atomic(path, lambda handle: handle.write(text))


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, else `name-2`, `name-3`, ...: the first not in `taken`, which it is added to."""
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}-{n}"
    taken.add(unique)
    return unique
