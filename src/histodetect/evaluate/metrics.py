"""Metrics and bootstrap intervals: numpy in, Python numbers out (see evaluate/__init__)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ..errors import UserError

# float32 sigmoids saturate: any logit above ~17 gives exactly 1.0, and float32
# cannot tell probabilities closer than ~6e-8 to 1 apart anyway. Clipping to
# [1e-7, 1 - 1e-7] keeps one confidently wrong patch from making the log loss
# infinite while changing nothing a float32 model could express.
NLL_CLIP_EPS = 1e-7

# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _check_labels(labels, name: str = "labels") -> np.ndarray:
    """Return `labels` as int64 after checking it is a non-empty 1-D array of 0/1."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise UserError(
            f"{name}: expected a non-empty 1-D array with one value per patch, found shape "
            f"{labels.shape}. Flatten (N, 1) model outputs with .ravel()."
        )
    found_values = np.unique(labels)
    if not np.isin(found_values, (0, 1)).all():
        raise UserError(
            f"{name}: expected 0 (normal) or 1 (tumour), found values {found_values[:6].tolist()}. "
            "Map them to 0/1 (threshold probabilities) before evaluating."
        )
    return labels.astype(np.int64)


def check_labels_and_probs(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels as int64, probs as float64) after checking shape and range."""
    labels = _check_labels(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != labels.shape:
        raise UserError(
            f"probs: expected one tumour probability per label, shape {labels.shape}, found "
            f"{probs.shape}. Pass labels and probs for the same patches."
        )
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise UserError(
            f"probs: expected tumour probabilities in [0, 1], found range "
            f"[{np.nanmin(probs):.4g}, {np.nanmax(probs):.4g}] (NaN present: {bool(np.isnan(probs).any())}). "
            "Apply a sigmoid to the logits first."
        )
    return labels, probs


def _require_both_classes(labels: np.ndarray, needed_for: str) -> None:
    n_positive = int(labels.sum())
    if n_positive == 0 or n_positive == labels.size:
        only = "tumour (1)" if n_positive else "normal (0)"
        raise UserError(
            f"labels: {needed_for} needs both normal (0) and tumour (1) patches, found only "
            f"{only} in {labels.size} patches. Evaluate on a split that has both classes."
        )


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def choose_threshold(labels, probs) -> float:
    """Pick the decision threshold on validation data by maximising balanced accuracy.

    Balanced accuracy is (sensitivity + specificity) / 2, so maximising it is
    maximising Youden's J = sensitivity + specificity - 1 = TPR - FPR. Unlike
    accuracy it does not depend on the class balance of the validation split,
    which rarely matches the slides the model will see. Candidates are the ROC
    curve's thresholds (each a probability that occurs in `probs`); among equally
    good ones the threshold closest to 0.5 wins, so a calibrated model keeps its
    natural threshold. Returns a probability: call a patch tumour when prob >= it.

    The value returned lies halfway between that candidate and the next lower
    probability in `probs` (0 below the lowest), so it makes the same decisions on
    `probs` while no patch sits on it (unless the two are a float64 step apart: then
    it is the candidate itself). bf16 logits take few values: up to 5 of 200
    pcam-jpeg validation patches shared the candidate's probability, and predict's
    CSV printed them rounded to 6 decimals, often below the threshold, with pred 1.
    """
    labels, probs = check_labels_and_probs(labels, probs)
    _require_both_classes(labels, "choosing a threshold")
    # drop_intermediate=False keeps points on straight ROC segments: they can tie
    # for the best J, and the tie rule must see them.
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    n_positive = int(labels.sum())
    n_negative = labels.size - n_positive
    # J scaled by n_positive * n_negative is an integer, so ties are exact.
    true_positives = np.rint(tpr * n_positive).astype(np.int64)
    false_positives = np.rint(fpr * n_negative).astype(np.int64)
    scaled_j = true_positives * n_negative - false_positives * n_positive
    candidates = np.isfinite(thresholds) & (scaled_j == scaled_j[np.isfinite(thresholds)].max())
    best = np.flatnonzero(candidates)
    chosen = best[np.argmin(np.abs(thresholds[best] - 0.5))]
    # roc_curve's thresholds are the distinct probabilities, descending (drop_intermediate=False).
    next_lower = thresholds[chosen + 1] if chosen + 1 < len(thresholds) else 0.0
    halfway = (thresholds[chosen] + next_lower) / 2
    # Probabilities a float64 step apart have nothing between them: halfway rounds onto one
    # of them, and onto the lower one it would call that patch tumour too. Keep the candidate.
    return float(halfway if halfway > next_lower else thresholds[chosen])


def reliability_curve(labels, probs, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin patches by predicted tumour probability into `n_bins` equal-width bins on [0, 1].

    Returns `(mean_prob, tumour_frequency, count)`, each of shape (n_bins,):
    the mean predicted probability, the observed fraction of tumour labels and
    the number of patches per bin; mean_prob and tumour_frequency are NaN for
    empty bins. A probability of exactly 1 falls in the last bin.
    """
    labels, probs = check_labels_and_probs(labels, probs)
    if n_bins < 1:
        raise UserError(f"n_bins: expected a positive number of bins, found {n_bins}. Use 15.")
    # sklearn's calibration_curve drops empty bins and does not return counts,
    # which both the ECE weights and the plot need, so bin here.
    bin_index = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    prob_sum = np.bincount(bin_index, weights=probs, minlength=n_bins)
    tumour_sum = np.bincount(bin_index, weights=labels, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return prob_sum / count, tumour_sum / count, count


def expected_calibration_error(labels, probs, n_bins: int = 15) -> float:
    """Expected calibration error of the tumour probability, in [0, 1].

    ECE = sum over bins of (count / N) * |mean predicted prob - observed tumour
    frequency|, with `n_bins` equal-width bins (Guo et al., 2017 use 15). For a
    binary model this uses the positive-class reliability, not the "top-label"
    (max(p, 1-p)) variant: the two differ, and the tumour probability is what
    users read and threshold.
    """
    mean_prob, tumour_frequency, count = reliability_curve(labels, probs, n_bins)
    filled = count > 0
    gaps = np.abs(mean_prob[filled] - tumour_frequency[filled])
    return float(np.sum(count[filled] * gaps) / count.sum())


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict[str, float]:
    """Every number the report shows for one split, as plain Python numbers.

    Threshold-free: roc_auc, nll (log loss, probabilities clipped to
    [1e-7, 1 - 1e-7]), brier, ece (15 bins, see `expected_calibration_error`).
    At `threshold` (tumour when prob >= threshold): accuracy, balanced_accuracy,
    f1, sensitivity (recall of tumour), specificity (recall of normal), precision
    (0 when no patch is called tumour) and the confusion counts tn, fp, fn, tp.
    Also n, n_positive and the threshold itself.
    """
    labels, probs = check_labels_and_probs(labels, probs)
    _require_both_classes(labels, "binary_metrics")
    preds = (probs >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(c) for c in confusion_matrix(labels, preds, labels=[0, 1]).ravel())
    clipped = np.clip(probs, NLL_CLIP_EPS, 1 - NLL_CLIP_EPS)
    return {
        "n": int(labels.size),
        "n_positive": int(labels.sum()),
        "threshold": float(threshold),
        "roc_auc": float(roc_auc_score(labels, probs)),
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "f1": float(f1_score(labels, preds, zero_division=0.0)),
        "sensitivity": float(recall_score(labels, preds)),
        "specificity": float(tn / (tn + fp)),
        "precision": float(precision_score(labels, preds, zero_division=0.0)),
        "nll": float(log_loss(labels, clipped, labels=[0, 1])),
        "brier": float(brier_score_loss(labels, probs)),
        "ece": expected_calibration_error(labels, probs),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def accuracy_coverage(
    labels,
    preds,
    uncertainty,
    coverages: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
) -> list[dict]:
    """Accuracy on the most confident fraction of patches, for selective prediction.

    For each coverage c, keeps the round(c * N) patches (at least one) with the
    lowest `uncertainty` (ties keep input order) and returns one row per
    coverage: `{"coverage", "n_patches", "accuracy", "max_uncertainty"}`, where
    max_uncertainty is the cut-off a deployment would use to refer the rest to
    a pathologist.
    """
    labels = _check_labels(labels)
    preds = _check_labels(preds, "preds")
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    if preds.shape != labels.shape or uncertainty.shape != labels.shape:
        raise UserError(
            f"preds, uncertainty: expected one value per patch, shape {labels.shape}, found "
            f"{preds.shape} and {uncertainty.shape}. Pass arrays aligned with labels."
        )
    if not all(0 < c <= 1 for c in coverages):
        raise UserError(
            f"coverages: expected fractions in (0, 1], found {list(coverages)}. Use e.g. (1.0, 0.9, 0.8)."
        )
    order = np.argsort(uncertainty, kind="stable")
    correct_in_order = (preds == labels)[order]
    rows = []
    for coverage in coverages:
        n_kept = max(1, int(round(coverage * labels.size)))
        rows.append(
            {
                "coverage": float(coverage),
                "n_patches": int(n_kept),
                "accuracy": float(correct_in_order[:n_kept].mean()),
                "max_uncertainty": float(uncertainty[order[n_kept - 1]]),
            }
        )
    return rows


# ---------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------

# Resample counts are made in blocks of about this many cells (32 MiB of int64),
# so 1,000 resamples of 30,000 patches never need a 240 MiB matrix at once.
_BOOTSTRAP_BLOCK_CELLS = 2**22


def _resample_weight_blocks(
    rng: np.random.Generator, n_boot: int, group_index: np.ndarray, n_groups: int
) -> Iterator[np.ndarray]:
    """Yield (rows, n_patches) blocks of resample counts: how often each patch is drawn.

    Drawing `n_groups` groups with replacement and giving each patch its group's
    count covers both bootstraps: with one group per patch it is the ordinary one.
    """
    rows_per_block = max(1, _BOOTSTRAP_BLOCK_CELLS // max(n_groups, group_index.size))
    for start in range(0, n_boot, rows_per_block):
        rows = min(rows_per_block, n_boot - start)
        drawn = rng.integers(0, n_groups, size=(rows, n_groups))
        row_offsets = np.arange(rows)[:, None] * n_groups
        group_counts = np.bincount((drawn + row_offsets).ravel(), minlength=rows * n_groups)
        yield group_counts.reshape(rows, n_groups)[:, group_index]


def _weighted_roc_auc(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of resample counts `weights` (rows, N), via Mann-Whitney U.

    Scores are ranked once per block: AUC = sum over tumour patches of (normal
    patches scored lower + half of those tied) / (n_tumour * n_normal), every
    count weighted by how often each patch was drawn.
    """
    _, score_rank = np.unique(probs, return_inverse=True)  # (N,) dense rank of each score
    n_scores = int(score_rank.max()) + 1
    cell = score_rank * 2 + labels  # one (score, class) cell per patch
    rows = weights.shape[0]
    cell_offsets = np.arange(rows)[:, None] * (2 * n_scores)
    counts = np.bincount(
        (cell + cell_offsets).ravel(), weights=weights.ravel(), minlength=rows * 2 * n_scores
    ).reshape(rows, n_scores, 2)
    normal, tumour = counts[..., 0], counts[..., 1]
    normal_below = np.cumsum(normal, axis=1) - normal
    u_statistic = np.sum(tumour * (normal_below + 0.5 * normal), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return u_statistic / (tumour.sum(axis=1) * normal.sum(axis=1))


def bootstrap_ci(
    labels,
    probs,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups=None,
) -> tuple[float, float]:
    """Percentile bootstrap interval (1 - alpha) for `metric_fn(labels, probs)`.

    Resamples patches with replacement `n_boot` times and skips resamples that
    hold only one class (AUC and sensitivity are undefined there). With
    `groups` (one id per patch, e.g. the slide), resamples whole groups instead
    (cluster bootstrap): patches cut from one slide share its staining, scanner
    and patient, so they are not independent, and treating them as such gives
    intervals that are too narrow. The same seed gives the same interval.

    Pass `sklearn.metrics.roc_auc_score` itself for AUC: it is recognised and
    computed from ranks in blocks of resamples: the same numbers, ~11x faster.
    """
    labels, probs = check_labels_and_probs(labels, probs)
    _require_both_classes(labels, "bootstrap_ci")
    if n_boot < 1 or not 0 < alpha < 1:
        raise UserError(
            f"n_boot, alpha: expected n_boot >= 1 and 0 < alpha < 1, found {n_boot} and {alpha}. "
            "Use n_boot=1000, alpha=0.05 for a 95% interval."
        )
    if groups is None:
        group_index, n_groups = np.arange(labels.size), labels.size
    else:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise UserError(
                f"groups: expected one group id per patch, shape {labels.shape}, found {groups.shape}. "
                "Pass the slide id of each patch."
            )
        _, group_index = np.unique(groups, return_inverse=True)
        n_groups = int(group_index.max()) + 1
    rng = np.random.default_rng(seed)
    statistics = []
    for weights in _resample_weight_blocks(rng, n_boot, group_index, n_groups):
        n_tumour = weights @ labels
        has_both_classes = (n_tumour > 0) & (n_tumour < weights.sum(axis=1))
        weights = weights[has_both_classes]
        # 1,000 resamples of 30,000 patches on the 2-core dev machine under load:
        # 2.8-4.3 s here, against 31-49 s calling roc_auc_score per resample
        # (timed on 100 and scaled; it re-sorts every resample), 11x faster.
        # tests/test_evaluate.py checks both give the same interval.
        if metric_fn is roc_auc_score:
            statistics.extend(_weighted_roc_auc(labels, probs, weights).tolist())
        else:
            for row in weights:
                drawn = np.repeat(np.arange(labels.size), row)
                statistics.append(float(metric_fn(labels[drawn], probs[drawn])))
    if not statistics:
        raise UserError(
            f"groups: all {n_boot} resamples of {n_groups} groups held only one class. "
            "Use more groups with both classes, or bootstrap patches (groups=None)."
        )
    if len(statistics) < n_boot / 2:
        # A few slides, each of one class: most resamples are unusable, the rest nearly identical.
        warnings.warn(f"only {len(statistics)} of {n_boot} bootstrap resamples of {n_groups} "
                      f"{'groups' if groups is not None else 'patches'} held both classes: the interval is "
                      "unreliable (too narrow); score more slides", stacklevel=2)
    low, high = np.quantile(statistics, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


