"""write_synthetic: check the arguments, draw the patches, write one layout atomically."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ...errors import UserError, check_int
from ...outputs import naming_write_errors
from ..decode import PATCH_SIZE_PX
from ..formats import FORMATS
from .layouts import _write_folder, _write_kaggle, _write_pcam_h5
from .patches import _UNLABELLED_STREAM, _draw_labelled_patches, make_synthetic_patches
from .splits import DEFAULT_SPLITS, _check_splits, _split_indices


def _memory_bytes() -> float:
    """This machine's physical memory in bytes (inf where the system does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return float("inf")


def _check_patches_fit_in_memory(n: int, unlabelled: int) -> None:
    # Every patch is drawn into one array before the first file is written: --n 1e11
    # (or 2**63) failed in numpy with a traceback instead of naming the flag.
    needed = (n + unlabelled) * PATCH_SIZE_PX * PATCH_SIZE_PX * 3
    available = _memory_bytes()
    if needed > available:
        counts, flags = (f"--n {n} and --unlabelled {unlabelled}", "--n or --unlabelled") if unlabelled else (f"--n {n}", "--n")
        raise UserError(f"{counts}: the patches are drawn in memory ({needed / 1e9:,.1f} GB at "
                        f"{PATCH_SIZE_PX}x{PATCH_SIZE_PX}x3 bytes each), more than this machine's "
                        f"{available / 1e9:,.1f} GB; pass a smaller {flags} (PCam holds 327,680 patches).")


def write_synthetic(
    out: Path,
    n: int,
    *,
    format: str = "folder",
    seed: int = 0,
    splits: dict[str, float] | None = None,
    unlabelled: int = 0,
) -> Path:
    """Write `n` labelled synthetic patches to `out` in one of the layouts in `FORMATS`.

    "kaggle": out/train/<sha1>.tif, out/train_labels.csv (id,label) and, when
    unlabelled > 0, out/test/<sha1>.tif. "pcam_h5": out/camelyonpatch_level_2_split_
    {split}_{x,y}.h5 and _meta.csv per split. "folder": out/{split}/{label}/synthNNNNNNN.png.
    Splits map names to fractions (defaults in DEFAULT_SPLITS) and are stratified by
    label. The labelled patches are make_synthetic_patches(n, seed=seed); unlabelled
    ones come from another stream of the same seed. Files go to a temporary sibling
    folder renamed to `out` once complete. Returns `out`.
    """
    out = Path(out)
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: unknown layout; expected one of {', '.join(FORMATS)}.")
    # Its range is make_synthetic_patches' (a seed >= 0), checked before anything is written.
    n, unlabelled, seed = check_int("--n", n), check_int("--unlabelled", unlabelled), check_int("--seed", seed)
    if n < 1:
        raise UserError(f"--n {n}: expected at least 1 patch; pass e.g. --n 1000.")
    if unlabelled < 0:
        raise UserError(f"--unlabelled {unlabelled}: expected a count >= 0; pass 0 for none.")
    if format != "kaggle" and unlabelled > 0:
        raise UserError(
            f"--unlabelled {unlabelled}: only the kaggle layout has unlabelled patches "
            f"(out/test/), found --format {format}; pass --format kaggle or --unlabelled 0."
        )
    _check_patches_fit_in_memory(n, unlabelled)
    if format == "kaggle":
        if splits is not None:
            raise UserError(
                f"splits={splits}: the kaggle layout has no splits (all labelled patches "
                "go to out/train/); drop splits or pass --format folder or pcam_h5."
            )
    else:
        splits = DEFAULT_SPLITS[format] if splits is None else splits
        _check_splits(splits, n, format)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out}: already exists and is not an empty folder; expected a new or empty "
            "folder. Pass another --out or remove it."
        )

    patches_uint8, labels = make_synthetic_patches(n, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same file system, so the final rename is atomic: a reader
    # never sees a half-written data set under `out`.
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        with naming_write_errors(out):
            if format == "kaggle":
                unlabelled_uint8, _ = _draw_labelled_patches(
                    np.random.default_rng([seed, _UNLABELLED_STREAM]), unlabelled, 0.5
                )
                _write_kaggle(partial, patches_uint8, labels, unlabelled_uint8)
            elif format == "pcam_h5":
                _write_pcam_h5(partial, patches_uint8, labels, _split_indices(labels, splits), seed)
            else:
                _write_folder(partial, patches_uint8, labels, _split_indices(labels, splits))
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
