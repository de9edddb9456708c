"""Validation splits for sources that come without one (Kaggle train, label/* folders)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError, check_int


def check_seed(seed: int) -> int:
    """Refuse a --seed numpy or torch cannot take or tell apart (prepare's split, predict's MC masks).

    numpy's seeds stop at 2**32; torch's CPU generator keeps 32 bits of its seed (--seed
    4294967296 drew the masks of --seed 0) and raised a traceback from 2**64 on.
    Returns it as an int (numpy's ints could not go into a store's manifest).
    """
    seed = check_int("--seed", seed)
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed {seed}: expected an integer in [0, 2**32), e.g. --seed 0")
    return seed


def make_validation_split(labels: np.ndarray, slides: list[str], fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the rows to move to validation: stratified by label, and
    grouped by slide when slide ids are known, so that no slide is on both sides
    (patches of one slide are correlated; a split across slides is the honest one).

    With slides, whole slides move, so the share moved only approximates `fraction`
    (with two slides it is one of them); the caller reports the share it got.
    At least one row stays on each side.
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    rows = np.arange(len(labels))
    mask = np.zeros(len(labels), dtype=bool)
    slide_ids = np.asarray(slides)
    n_slides = len(set(slides))
    n_folds = max(2, round(1 / fraction))
    if all(slides) and n_slides >= n_folds:
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        _, valid_rows = next(folds.split(rows, labels, groups=slide_ids))
    elif all(slides) and n_slides >= 2:
        # Too few slides for folds of the requested size: move the shuffled slides
        # whose patch count comes closest to the fraction, keeping one slide for training.
        order = np.random.default_rng(seed).permutation(sorted(set(slides)))
        sizes = np.array([np.count_nonzero(slide_ids == s) for s in order])
        cumulative = np.cumsum(sizes)[:-1]
        n_moved = 1 + int(np.argmin(np.abs(cumulative - fraction * len(labels))))
        valid_rows = rows[np.isin(slide_ids, order[:n_moved])]
    else:
        n_valid = min(max(1, math.ceil(fraction * len(labels))), len(labels) - 1)
        n_classes = len(np.unique(labels))
        # Stratify only where each side can hold every class (sklearn refuses otherwise).
        stratify = (labels if np.bincount(labels, minlength=2).min() >= 2
                    and min(n_valid, len(labels) - n_valid) >= n_classes else None)
        _, valid_rows = train_test_split(rows, test_size=n_valid, stratify=stratify, random_state=seed)
    mask[valid_rows] = True
    return mask
