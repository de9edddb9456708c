"""Honest evaluation: metrics, bootstrap intervals, plots and a self-contained report.

Conventions shared by every function here: `labels` holds 0 (normal) or 1
(tumour in the centre 32x32) per patch, `probs` the model's probability of
tumour per patch, and a patch is called tumour when `prob >= threshold` (the
rule scikit-learn's `roc_curve` uses, so a threshold taken from the ROC curve
reproduces its operating point exactly).

The metric functions take numpy arrays and return Python numbers, so their
output goes straight into `metrics.json`. Plots draw on a bare matplotlib
`Figure` with the Agg canvas and write a PNG; `write_report` inlines those PNGs
into one HTML file that can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
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

from histodetect import __version__
from histodetect.errors import UserError

# float32 sigmoids saturate: any logit above ~17 gives exactly 1.0, and float32
# cannot tell probabilities closer than ~6e-8 to 1 apart anyway. Clipping to
# [1e-7, 1 - 1e-7] keeps one confidently wrong patch from making the log loss
# infinite while changing nothing a float32 model could express.
NLL_CLIP_EPS = 1e-7

# The columns of a run's metrics.csv (written by train.py) that the training
# plot draws; others, such as lr and seconds, may be present and are ignored.
PLOTTED_TRAINING_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "val_acc")


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


def _check_labels_and_probs(labels, probs) -> tuple[np.ndarray, np.ndarray]:
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
    """
    labels, probs = _check_labels_and_probs(labels, probs)
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
    best = thresholds[candidates]
    return float(best[np.argmin(np.abs(best - 0.5))])


def reliability_curve(labels, probs, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin patches by predicted tumour probability into `n_bins` equal-width bins on [0, 1].

    Returns `(mean_prob, tumour_frequency, count)`, each of shape (n_bins,):
    the mean predicted probability, the observed fraction of tumour labels and
    the number of patches per bin; mean_prob and tumour_frequency are NaN for
    empty bins. A probability of exactly 1 falls in the last bin.
    """
    labels, probs = _check_labels_and_probs(labels, probs)
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
    labels, probs = _check_labels_and_probs(labels, probs)
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
    labels, probs = _check_labels_and_probs(labels, probs)
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
    low, high = np.quantile(statistics, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------

PLOT_DPI = 120


def _new_figure(width_in: float, height_in: float) -> Figure:
    # A bare Figure on the Agg canvas, not pyplot: pyplot keeps every figure
    # alive until plt.close and shares global state across threads (the web
    # service plots from several). This figure is freed when it goes out of scope.
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=PLOT_DPI)
    figure.clear()
    return path


def plot_confusion_matrix(tn: int, fp: int, fn: int, tp: int, path: Path) -> Path:
    """Write the 2x2 confusion matrix as a PNG: counts and the share of each true class."""
    counts = np.array([[tn, fp], [fn, tp]])
    row_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = _new_figure(4.2, 3.6)
    axes = figure.add_subplot()
    axes.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for true_class in range(2):
        for predicted_class in range(2):
            share = row_share[true_class, predicted_class]
            axes.text(
                predicted_class,
                true_class,
                f"{counts[true_class, predicted_class]:,}\n{share:.1%}",
                ha="center",
                va="center",
                color="white" if share > 0.5 else "black",
                fontsize=12,
            )
    class_names = ["normal (0)", "tumour (1)"]
    axes.set_xticks([0, 1], class_names)
    axes.set_yticks([0, 1], class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix (% of true class)")
    return _save_png(figure, path)


def plot_roc(labels, probs, auc: float, ci: tuple[float, float] | None, path: Path) -> Path:
    """Write the ROC curve as a PNG, with the AUC (and its interval, if given) in the legend."""
    labels, probs = _check_labels_and_probs(labels, probs)
    fpr, tpr, _ = roc_curve(labels, probs)
    legend = f"AUC {auc:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "")
    figure = _new_figure(4.5, 4.2)
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, linewidth=2, label=legend)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.set_title("ROC curve")
    axes.legend(loc="lower right")
    return _save_png(figure, path)


def plot_reliability(labels, probs, ece: float, n_bins: int, path: Path) -> Path:
    """Write a reliability diagram (observed tumour frequency per bin) over a count histogram."""
    mean_prob, tumour_frequency, count = reliability_curve(labels, probs, n_bins)
    bin_edges = np.linspace(0, 1, n_bins + 1)
    bin_width = 1 / n_bins
    figure = _new_figure(4.5, 5.2)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(bin_edges[:-1], np.nan_to_num(tumour_frequency), width=bin_width, align="edge",
            color="tab:blue", alpha=0.35, edgecolor="tab:blue", label="observed frequency")
    top.plot(mean_prob, tumour_frequency, marker="o", color="tab:blue", label="observed at bin mean prob")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("observed tumour frequency")
    top.set_title(f"Reliability (ECE {ece:.3f}, {n_bins} bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(bin_edges[:-1], count, width=bin_width, align="edge", color="grey", edgecolor="black")
    # Most patches sit near 0 or 1, so a linear axis hides the middle bins.
    bottom.set_yscale("log")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("predicted tumour probability")
    bottom.set_ylabel("patches")
    return _save_png(figure, path)


def read_training_curves(metrics_csv_path: Path) -> dict[str, np.ndarray]:
    """Read the plotted columns of a training `metrics.csv` (one row per epoch) as float arrays."""
    metrics_csv_path = Path(metrics_csv_path)
    if not metrics_csv_path.is_file():
        raise UserError(f"{metrics_csv_path}: no such file. Pass the metrics.csv inside a training run folder.")
    with metrics_csv_path.open(newline="") as csv_file:
        reader = csv.DictReader(csv_file)
        found_columns = reader.fieldnames or []
        missing = [column for column in PLOTTED_TRAINING_COLUMNS if column not in found_columns]
        if missing:
            raise UserError(
                f"{metrics_csv_path}: expected columns {','.join(PLOTTED_TRAINING_COLUMNS)}, missing "
                f"{','.join(missing)} (found {','.join(found_columns)!r}). "
                "Is this a training run's metrics.csv?"
            )
        rows = list(reader)
    if not rows:
        raise UserError(
            f"{metrics_csv_path}: expected one row per epoch, found none. Train for at least one epoch first."
        )
    for line_number, row in enumerate(rows, start=2):
        for column in PLOTTED_TRAINING_COLUMNS:
            try:
                float(row[column])
            except (TypeError, ValueError):  # TypeError: the row is cut short, the value is None
                raise UserError(
                    f"{metrics_csv_path}: line {line_number}, column {column!r}: expected a number, "
                    f"found {row[column]!r}. Was the file edited or cut short?"
                ) from None
    return {column: np.array([float(row[column]) for row in rows]) for column in PLOTTED_TRAINING_COLUMNS}


def plot_training_curves(metrics_csv_path: Path, path: Path) -> Path:
    """Write losses and validation AUC/accuracy against epoch, read from a run's metrics.csv."""
    curves = read_training_curves(metrics_csv_path)
    figure = _new_figure(8, 3.4)
    losses, scores = figure.subplots(1, 2)
    losses.plot(curves["epoch"], curves["train_loss"], marker=".", label="train loss")
    losses.plot(curves["epoch"], curves["val_loss"], marker=".", label="validation loss")
    losses.set_xlabel("epoch")
    losses.set_ylabel("binary cross-entropy")
    losses.set_title("Loss")
    losses.legend()
    scores.plot(curves["epoch"], curves["val_auc"], marker=".", label="validation ROC AUC")
    scores.plot(curves["epoch"], curves["val_acc"], marker=".", label="validation accuracy")
    scores.set_xlabel("epoch")
    scores.set_title("Validation scores")
    scores.legend(loc="lower right")
    return _save_png(figure, path)


def plot_accuracy_coverage(labels, probs, uncertainty, path: Path, threshold: float = 0.5) -> Path:
    """Write accuracy against coverage (the most confident fraction of patches kept) as a PNG."""
    labels, probs = _check_labels_and_probs(labels, probs)
    preds = (probs >= threshold).astype(np.int64)
    coverages = np.linspace(1.0, 0.05, 39)
    rows = accuracy_coverage(labels, preds, uncertainty, coverages=coverages.tolist())
    accuracies = [row["accuracy"] for row in rows]
    figure = _new_figure(4.8, 3.6)
    axes = figure.add_subplot()
    axes.plot(coverages, accuracies, marker=".", label="kept patches")
    axes.axhline(accuracies[0], linestyle="--", color="grey", linewidth=1, label="all patches")
    axes.invert_xaxis()  # read left to right as referring more patches to a pathologist
    axes.set_xlabel("coverage (fraction of patches kept, most confident first)")
    axes.set_ylabel("accuracy")
    axes.set_title("Selective prediction")
    axes.legend(loc="lower right")
    return _save_png(figure, path)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

_METRIC_LABELS = {
    "n": "patches",
    "n_positive": "tumour patches",
    "roc_auc": "ROC AUC",
    "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity (tumour recall)",
    "specificity": "specificity (normal recall)",
    "nll": "log loss (NLL)",
    "brier": "Brier score",
    "ece": "expected calibration error",
    "tn": "true negatives",
    "fp": "false positives",
    "fn": "false negatives",
    "tp": "true positives",
}

_IMAGE_MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

_REPORT_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 980px; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
.summary { color: #444; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .95rem; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .8rem; text-align: left;
         font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5rem; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #555; }
footer { margin-top: 2rem; font-size: .8rem; color: #888; }
"""


def _format_value(value) -> str:
    """Format a number for the report: counts with thousands separators, scores to 3 decimals."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"[{_format_value(value[0])}, {_format_value(value[1])}]"
    return str(value)


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) per metric; an `X_ci` entry joins X's row as `0.953 [0.944, 0.961]`."""
    rows = []
    for key, value in metrics.items():
        if key.endswith("_ci") and key[: -len("_ci")] in metrics:
            continue
        shown = _format_value(value)
        if f"{key}_ci" in metrics:
            shown += " " + _format_value(metrics[f"{key}_ci"])
        rows.append((_METRIC_LABELS.get(key, key.replace("_", " ")), shown))
    return rows


def _summary_line(metrics: dict) -> str:
    parts = []
    if "n" in metrics:
        parts.append(f"{_format_value(metrics['n'])} patches")
        if "n_positive" in metrics:
            parts[-1] += f" ({_format_value(metrics['n_positive'])} tumour)"
    if "roc_auc" in metrics:
        parts.append(f"ROC AUC {_format_value(metrics['roc_auc'])}")
        if "roc_auc_ci" in metrics:
            parts[-1] += f" {_format_value(metrics['roc_auc_ci'])}"
    if "accuracy" in metrics:
        parts.append(f"accuracy {_format_value(metrics['accuracy'])}")
        if "threshold" in metrics:
            parts[-1] += f" at threshold {_format_value(metrics['threshold'])}"
    return " · ".join(parts)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(text)}</td>" for text in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_data_uri(caption: str, image_path: Path) -> str:
    image_path = Path(image_path)
    mime_type = _IMAGE_MIME_TYPES.get(image_path.suffix.lower())
    if mime_type is None:
        raise UserError(
            f"images[{caption!r}]: expected a .png or .jpg file, found {image_path}. Save the figure as PNG."
        )
    return f"data:{mime_type};base64," + base64.b64encode(image_path.read_bytes()).decode("ascii")


def _write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`.

    A reader (or a crash) never sees half a file: the rename is atomic on one
    filesystem, which is why the temporary file lives in the same folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: it creates files readable by their owner only, and
    # reports are meant to be shared; open() honours the user's umask.
    temporary_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary_path.open("x", encoding="utf-8") as temporary:
            temporary.write(text)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, obj) -> Path:
    """Write `obj` as indented JSON (e.g. metrics.json), atomically; NaN is refused, as JSON has none."""
    return _write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_report(
    out_dir: Path,
    title: str,
    metrics: dict,
    images: dict[str, Path],
    tables: dict[str, list[dict]] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write `out_dir/report.html`: one self-contained page with metrics, figures, tables and notes.

    Images (key = caption) are inlined as base64 data URIs and the CSS is
    inline, so the file needs no other file, network or JavaScript. Every
    string is HTML-escaped. Returns the report's path.
    """
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="summary">{html.escape(_summary_line(metrics))}</p>',
        "<h2>Metrics</h2>",
        _html_table(("metric", "value"), _metric_rows(metrics)),
    ]
    if images:
        figures = "".join(
            f'<figure><img src="{_image_data_uri(caption, image_path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, image_path in images.items()
        )
        sections += ["<h2>Figures</h2>", f'<div class="figures">{figures}</div>']
    for table_title, table_rows in (tables or {}).items():
        columns = list(dict.fromkeys(column for row in table_rows for column in row))
        cells = [[_format_value(row.get(column, "")) for column in columns] for row in table_rows]
        sections += [f"<h2>{html.escape(table_title)}</h2>", _html_table(columns, cells)]
    if notes:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        sections += ["<h2>Notes</h2>", f"<ul>{items}</ul>"]
    sections.append(f"<footer>histodetect {html.escape(__version__)}</footer>")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_REPORT_CSS}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    return _write_text_atomic(Path(out_dir) / "report.html", page)
