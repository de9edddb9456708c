"""prepare: decode a source once into a store, with its index, manifest and report."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import UserError, check_bool, check_int, check_number
from ...outputs import WRITE_ERRNOS
from ..decode import PATCH_SHAPE
from ..formats import open_source
from ..record import UNLABELLED
from ..splits import check_seed, make_validation_split
from .layout import (
    INDEX_COLUMNS,
    INDEX_FILE,
    MANIFEST_FILE,
    PATCHES_FILE,
    SKIPPED_FILE,
    STORE_FORMAT_VERSION,
    _fingerprint,
    split_counts,
)
from .out_folder import _check_out_folder, _install, _remove_stale_partials
from .pack import _compact, _decode_all

# Decoding processes: more than the cores only compete for them, and this covers the largest
# machines. --workers 2**63 made the pool fork until the system refused.
MAX_WORKERS = 256


class PrepareWarning(UserWarning):
    """Something about the data the user should know, that does not stop prepare."""


@dataclass
class PrepareReport:
    store: Path
    n_patches: int
    counts: dict[str, dict[str, int]]
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    converted_modes: dict[str, int] = field(default_factory=dict)  # e.g. {"RGBA": 3}
    n_resized: int = 0
    n_deduplicated: int = 0
    made_validation_split: bool = False
    n_moved_to_valid: int = 0  # labelled 'train' patches moved to the validation split made
    moved_by_slide: bool = False  # whole slides were moved (slide ids known)
    kaggle_ids_checked: int = 0  # ids compared with their pixel SHA-1
    kaggle_id_mismatches: list[str] = field(default_factory=list)


def prepare(
    src: Path,
    out: Path,
    *,
    format: str | None = None,
    overwrite: bool = False,
    dedupe: bool = False,
    resize: bool = False,
    skip_bad: bool = False,
    valid_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    chunk_size: int = 256,
    progress: bool = True,
) -> PrepareReport:
    """Decode a source (any of the readers' formats) once into a packed store at `out`.

    Keeps the source's splits; where labelled patches have no validation split,
    moves a stratified `valid_fraction` of 'train' (grouped by slide when slide ids
    are known) to 'valid'. Non-RGB files are converted (one warning), other sizes
    refused unless `resize`, bad files refused unless `skip_bad`.
    """
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    # Python's numbers and bools: the manifest stores them, and numpy's could not go into it.
    dedupe, resize, skip_bad = (check_bool(flag, value) for flag, value in
                                (("--dedupe", dedupe), ("--resize", resize), ("--skip-bad", skip_bad)))
    valid_fraction = check_number("--valid-fraction", valid_fraction)
    if not 0 < valid_fraction < 1:
        raise UserError(f"--valid-fraction {valid_fraction}: expected a fraction between 0 and 1")
    seed = check_seed(seed)
    workers = None if workers is None else check_int("--workers", workers)
    if workers is not None and not 0 <= workers <= MAX_WORKERS:
        raise UserError(f"--workers {workers}: expected 0 (one per core) to {MAX_WORKERS} decoding processes")
    # Resolved, so that '.' or 'stores/x/..' name the folder itself and its real parent.
    out = out.resolve()
    _check_out_folder(out, overwrite)
    source = open_source(src, format)
    if len(source) == 0:
        raise UserError(f"{src}: the source holds no patches")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        rows, sha1s, skipped, converted, n_resized = _decode_all(
            source, partial / PATCHES_FILE, resize=resize, skip_bad=skip_bad,
            workers=workers or os.cpu_count() or 1, chunk_size=chunk_size, progress=progress,
        )
        if len(rows) == 0:
            raise UserError(f"{src}: none of its {len(source)} patches could be decoded (first: {skipped[0][0]}: {skipped[0][1]})")
        ids = [source.ids[r] for r in rows]
        labels = source.labels[rows]
        splits = np.array([source.splits[r] for r in rows], dtype=object)
        slides = [source.slides[r] for r in rows]

        report = PrepareReport(out, 0, {}, 0.0, skipped=skipped, converted_modes=converted, n_resized=n_resized)
        if converted:
            modes = ", ".join(f"{n} {mode}" for mode, n in converted.items())
            warnings.warn(f"{src}: converted {modes} image(s) to RGB", PrepareWarning, stacklevel=2)
        if source.format == "kaggle":
            report.kaggle_ids_checked = len(ids)
            report.kaggle_id_mismatches = [i for i, s in zip(ids, sha1s) if i != s]
            if report.kaggle_id_mismatches:
                warnings.warn(
                    f"{src}: {len(report.kaggle_id_mismatches)} of {len(ids)} Kaggle ids differ from their pixel SHA-1"
                    f" (first: {report.kaggle_id_mismatches[0]}); files renamed or re-encoded?",
                    PrepareWarning, stacklevel=2,
                )

        keep = np.ones(len(rows), dtype=bool)
        if dedupe:
            seen: set[str] = set()
            for row, sha1 in enumerate(sha1s):
                keep[row] = sha1 not in seen
                seen.add(sha1)
            report.n_deduplicated = int((~keep).sum())

        labelled = labels != UNLABELLED
        has_valid = bool((splits == "valid").any())
        if labelled.any() and has_valid and not (labelled & (splits == "valid")).any():
            warnings.warn(
                f"{src}: its 'valid' split has no labels, so no validation split was made from 'train'; "
                "training will validate on 10% of 'train' (or name a labelled split with --val-split)",
                PrepareWarning, stacklevel=2,
            )
        elif labelled.any() and not has_valid:
            from_train = np.flatnonzero(labelled & (splits == "train") & keep)
            if len(from_train) >= 2:
                moved = make_validation_split(labels[from_train], [slides[r] for r in from_train], valid_fraction, seed)
                splits[from_train[moved]] = "valid"
                report.made_validation_split = True
                report.n_moved_to_valid = int(moved.sum())
                report.moved_by_slide = all(slides[r] for r in from_train)

        if len(rows) < len(source) or not keep.all():
            # Drop the blank rows of bad files and the duplicates.
            keep_rows = np.zeros(len(source), dtype=bool)
            keep_rows[rows[keep]] = True
            _compact(partial / PATCHES_FILE, keep_rows)
        index = [
            (ids[r], int(labels[r]), splits[r], slides[r], sha1s[r]) for r in np.flatnonzero(keep)
        ]
        labels_kept, splits_kept = labels[keep], splits[keep]
        with (partial / INDEX_FILE).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(INDEX_COLUMNS)
            writer.writerows(index)
        if skipped:
            with (partial / SKIPPED_FILE).open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(("path", "reason"))
                writer.writerows(skipped)
        report.n_patches = len(index)
        report.counts = split_counts(labels_kept, splits_kept)
        manifest = {
            "format_version": STORE_FORMAT_VERSION,
            "histodetect_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": {"path": str(src.resolve()), "format": source.format},
            "patch_shape": list(PATCH_SHAPE),
            "n_patches": report.n_patches,
            "splits": report.counts,
            "fingerprint": _fingerprint([row[4] for row in index], labels_kept, splits_kept.tolist()),
            "options": {"dedupe": dedupe, "resize": resize, "skip_bad": skip_bad,
                        "valid_fraction": valid_fraction, "seed": seed},
            "made_validation_split": report.made_validation_split,
            "n_skipped": len(skipped),
            "n_deduplicated": report.n_deduplicated,
            "n_resized": n_resized,
            "converted_modes": converted,
            "kaggle_ids_checked": report.kaggle_ids_checked,
            "kaggle_id_mismatches": len(report.kaggle_id_mismatches),
        }
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(partial, out)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        if error.errno not in WRITE_ERRNOS:
            raise
        size_gb = len(source) * np.prod(PATCH_SHAPE) / 1e9
        fix = "choose another --out" if error.errno == errno.EROFS else "free some space or choose another --out"
        raise UserError(f"{out}: cannot write the store ({error.strerror}; its {len(source)} patches take "
                        f"{size_gb:.2f} GB); {fix}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - started
    return report
