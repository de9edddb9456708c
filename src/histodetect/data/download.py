"""Download PatchCamelyon from Zenodo: resumable, md5-checked, unpacked to `.h5`.

Each file streams to `<name>.part`, is renamed to `<name>` only once its md5
matches, and each `.h5.gz` is then unpacked to `.h5` and deleted. So a file's
final name always means "complete", and running the command again after an
interruption resumes the `.part` it left and skips what is finished.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from histodetect.errors import UserError
from histodetect.outputs import naming_write_errors

# `/record/` rather than `/records/`: Zenodo redirects the old form, and it is the
# one PCam's README cites. No `?download=1`: the plain path serves the file.
DEFAULT_BASE_URL = "https://zenodo.org/record/2546921/files"

CHUNK_BYTES = 1 << 20

# File name -> md5 of the file as served. PCam's README swaps the valid and test
# md5s (github.com/basveeling/pcam); these are the corrected ones. The meta CSVs
# have no published md5, so nothing is checked for them (None).
PCAM_FILES: dict[str, str | None] = {
    "camelyonpatch_level_2_split_train_x.h5.gz": "1571f514728f59376b705fc836ff4b63",
    "camelyonpatch_level_2_split_train_y.h5.gz": "35c2d7259d906cfc8143347bb8e05be7",
    "camelyonpatch_level_2_split_valid_x.h5.gz": "d5b63470df7cfa627aeec8b9dc0c066e",
    "camelyonpatch_level_2_split_valid_y.h5.gz": "2b85f58b927af9964a4c15b8f7e8f179",
    "camelyonpatch_level_2_split_test_x.h5.gz": "d8c2d60d490dbd479f8199bdfa0cf6ec",
    "camelyonpatch_level_2_split_test_y.h5.gz": "60a7035772fbdb7f34eb86d4420cf66a",
    "camelyonpatch_level_2_split_train_meta.csv": None,
    "camelyonpatch_level_2_split_valid_meta.csv": None,
    "camelyonpatch_level_2_split_test_meta.csv": None,
}


def download_pcam(
    root: Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    files: dict[str, str | None] | None = None,
    progress: bool = True,
    timeout_s: float = 60,
) -> list[Path]:
    """Download PCam into `root`, verify each md5 and unpack the `.h5.gz` files.

    `files` maps each name under `base_url` to its md5 (None: not checked);
    default `PCAM_FILES`. Files already finished are skipped and a `.part` left
    by an interrupted run is resumed. Returns the final paths (`.h5`, `.csv`) in
    the order of `files`. Raises `UserError` on a network error or a bad md5.
    """
    root = Path(root)
    if not base_url.lower().startswith(("http://", "https://")):
        raise UserError(f"--base-url {base_url!r}: expected an http:// or https:// address")
    blocking = next((folder for folder in (root, *root.parents) if folder.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"{root}: {blocking} is a file, not a folder; choose another --root")
    root.mkdir(parents=True, exist_ok=True)
    final_paths = []
    for name, md5_expected in (PCAM_FILES if files is None else files).items():
        archive = root / name
        final = archive.with_suffix("") if name.endswith(".gz") else archive
        if not final.exists():
            # An archive under its own name is complete: it is only ever renamed
            # from `.part` after its md5 matched.
            # A full disk names the file (Python's write error names none); the rerun resumes.
            with naming_write_errors(final, "; free some space and run the same command again to resume"):
                if not archive.exists():
                    _download(f"{base_url.rstrip('/')}/{name}", archive, md5_expected, progress, timeout_s)
                if archive != final:
                    _gunzip(archive, final, progress)
        final_paths.append(final)
    return final_paths


def _download(url: str, target: Path, md5_expected: str | None, progress: bool, timeout_s: float) -> None:
    """Fetch `url` to `target` through `target.part`, checking the md5 before the rename."""
    part = target.with_name(target.name + ".part")
    md5_found = _fetch(url, part, progress, timeout_s)
    if md5_expected is not None and md5_found != md5_expected:
        part.unlink()
        raise UserError(
            f"{target}: md5 {md5_found}, expected {md5_expected}; deleted the corrupt download, "
            "run the same command again to fetch it afresh."
        )
    part.replace(target)


def _fetch(url: str, part: Path, progress: bool, timeout_s: float) -> str:
    """Stream `url` into `part`, resuming from its current size; return the md5 of all of it."""
    offset_bytes = part.stat().st_size if part.exists() else 0
    try:
        with _open(url, offset_bytes, timeout_s) as response:
            if response.status != 206:  # the server ignored our Range: start over
                offset_bytes = 0
            md5 = _md5_of(part) if offset_bytes else hashlib.md5()
            remaining = response.headers.get("Content-Length")
            total_bytes = offset_bytes + int(remaining) if remaining is not None else None
            with (
                open(part, "ab" if offset_bytes else "wb") as out,
                _byte_bar(part.stem, progress, total_bytes, offset_bytes) as bar,
            ):
                _copy(response, out, bar, md5)
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
        raise UserError(f"{url}: {_describe(error)}; run the same command again to resume.") from error
    # http.client reads a body cut short as a normal end, so compare sizes here.
    size_bytes = part.stat().st_size
    if total_bytes is not None and size_bytes != total_bytes:
        raise UserError(
            f"{url}: connection closed after {size_bytes} of {total_bytes} bytes; "
            "run the same command again to resume."
        )
    return md5.hexdigest()


def _open(url: str, offset_bytes: int, timeout_s: float) -> http.client.HTTPResponse:
    """GET `url` from byte `offset_bytes` on (a Range request when it is not 0)."""
    headers = {"Range": f"bytes={offset_bytes}-"} if offset_bytes else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset_bytes:
            raise
        # 416: the `.part` is already as long as the file (a run stopped just
        # before the rename). Fetch it again rather than trust bytes that may
        # have no md5 to check them.
        error.close()
        return urllib.request.urlopen(url, timeout=timeout_s)


def _describe(error: Exception) -> str:
    """What went wrong with a request, in a few words."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"cannot connect ({error.reason})"
    return f"{type(error).__name__}: {error}"


def _gunzip(archive: Path, target: Path, progress: bool) -> None:
    """Unpack `archive` to `target` through `target.part`, then delete the archive.

    The archive goes only once the unpacked file is complete, so an interrupted
    unpack is redone from it; and as each archive goes before the next download,
    at most one archive and its unpacked copy sit beside the finished files.
    """
    part = target.with_name(target.name + ".part")
    with (
        gzip.open(archive, "rb") as source,
        open(part, "wb") as out,
        _byte_bar(f"unpack {target.name}", progress) as bar,
    ):
        _copy(source, out, bar)
    part.replace(target)
    archive.unlink()


def _byte_bar(desc: str, progress: bool, total_bytes: int | None = None, initial_bytes: int = 0) -> tqdm:
    """A progress bar counting bytes in binary multiples; silent unless `progress`."""
    return tqdm(
        desc=desc, total=total_bytes, initial=initial_bytes, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not progress,
    )


def _copy(source: BinaryIO, target: BinaryIO, bar: tqdm, md5: hashlib._Hash | None = None) -> None:
    """Copy `source` to `target` in chunks, advancing `bar` and updating `md5`."""
    while chunk := source.read(CHUNK_BYTES):
        target.write(chunk)
        bar.update(len(chunk))
        if md5 is not None:
            md5.update(chunk)


def _md5_of(path: Path) -> hashlib._Hash:
    """An md5 object fed with the bytes of `path` (the prefix of a resumed download)."""
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            md5.update(chunk)
    return md5
