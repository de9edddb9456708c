"""Splits of a synthetic data set: checking the fractions, and stratified patch indices."""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ...errors import UserError, check_number
from ..pcam_h5 import SPLITS as PCAM_SPLITS

DEFAULT_SPLITS = {
    "pcam_h5": {"train": 0.8, "valid": 0.1, "test": 0.1},
    "folder": {"train": 0.8, "valid": 0.2},
}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _check_splits(splits: dict[str, float], n: int, format: str) -> None:
    """Raise a UserError unless `splits` are usable names with fractions that give every split patches."""
    if not isinstance(splits, Mapping):  # a list of names failed as an AttributeError
        raise UserError(f"splits={splits!r}: expected a mapping of split names to fractions, found "
                        f"{type(splits).__name__}; pass e.g. {DEFAULT_SPLITS[format]}.")
    names = PCAM_SPLITS if format == "pcam_h5" else None
    for name in splits:
        if names is not None and name not in names:
            raise UserError(
                f"splits: {name!r} is not a PCam split; the pcam_h5 layout names its files "
                f"after {', '.join(names)}; use those names."
            )
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise UserError(
                f"splits: split name {name!r} is not a plain folder name; use letters, "
                "digits, '_' or '-' (e.g. 'train')."
            )
    fractions = np.array([check_number(f"splits[{name!r}]", splits[name]) for name in splits], dtype=np.float64)
    if not splits or np.any(fractions <= 0) or abs(fractions.sum() - 1.0) > 1e-6:
        raise UserError(
            f"splits={splits}: expected positive fractions that sum to 1 (found sum "
            f"{fractions.sum():.3g}); pass e.g. {DEFAULT_SPLITS[format]}."
        )
    for name, size in zip(splits, np.diff(_split_bounds(fractions, n))):
        if size == 0:
            raise UserError(
                f"--n {n}: split {name!r} (fraction {splits[name]}) would get no patches; pass a larger --n."
            )


def _split_bounds(fractions: np.ndarray, n: int) -> np.ndarray:
    """Where each split starts and ends in a sequence of n patches: (len(fractions) + 1,)."""
    return np.rint(np.concatenate([[0.0], np.cumsum(fractions)]) * n).astype(int)


def _split_indices(labels: np.ndarray, splits: dict[str, float]) -> dict[str, np.ndarray]:
    """Patch indices per split, in ascending order, each split with both labels in proportion."""
    # Interleave the labels by rank within their class, then cut the sequence by
    # the fractions: every split gets its share of each class.
    rank_in_class = np.empty(len(labels), dtype=np.float64)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        rank_in_class[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.argsort(rank_in_class, kind="stable")
    bounds = _split_bounds(np.array(list(splits.values())), len(labels))
    return {name: np.sort(order[start:stop]) for name, start, stop in zip(splits, bounds[:-1], bounds[1:])}
