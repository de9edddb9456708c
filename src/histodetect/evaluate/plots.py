"""The evaluation plots: each draws a bare matplotlib Figure and writes a PNG."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import (
    roc_curve,
)

from ..errors import UserError

from .metrics import accuracy_coverage, check_labels_and_probs, reliability_curve

# The columns of a run's metrics.csv (written by train/loop/run_folder.py) that the training
# plot draws; others, such as lr and seconds, may be present and are ignored.
PLOTTED_TRAINING_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "val_acc")

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
    labels, probs = check_labels_and_probs(labels, probs)
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
    labels, probs = check_labels_and_probs(labels, probs)
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


