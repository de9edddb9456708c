"""Validation splits for sources that come without one (Kaggle train, label/* folders)."""

from __future__ import annotations

import numpy as np


def make_validation_split(labels: np.ndarray, slides: list[str], fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the rows to move to validation: stratified by label, and
    grouped by slide when slide ids are known, so that no slide is on both sides
    (patches of one slide are correlated; a split across slides is the honest one).
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    rows = np.arange(len(labels))
    mask = np.zeros(len(labels), dtype=bool)
    n_slides = len(set(slides))
    if all(slides) and n_slides >= 2:
        n_folds = min(max(2, round(1 / fraction)), n_slides)
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        _, valid_rows = next(folds.split(rows, labels, groups=np.asarray(slides)))
    else:
        stratify = labels if np.bincount(labels, minlength=2).min() >= 2 else None
        _, valid_rows = train_test_split(rows, test_size=fraction, stratify=stratify, random_state=seed)
    mask[valid_rows] = True
    return mask
