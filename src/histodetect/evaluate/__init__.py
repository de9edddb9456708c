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

import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import UserError
from .metrics import (
    accuracy_coverage,
    binary_metrics,
    bootstrap_ci,
    check_labels_and_probs,
    choose_threshold,
    expected_calibration_error,
    reliability_curve,
)
from .plots import (
    plot_accuracy_coverage,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    plot_training_curves,
    read_training_curves,
)
from .report import write_json_atomic, write_report

__all__ = [
    "accuracy_coverage", "binary_metrics", "bootstrap_ci", "check_labels_and_probs", "choose_threshold",
    "evaluate_run", "expected_calibration_error", "parse_data_arg", "plot_accuracy_coverage",
    "plot_confusion_matrix", "plot_reliability", "plot_roc", "plot_training_curves", "read_training_curves",
    "reliability_curve", "write_json_atomic", "write_report",
]


def parse_data_arg(text: str) -> tuple[Path, str | None]:
    """'STORE[:split]' -> (store path, split or None)."""
    path, sep, split = text.rpartition(":")
    if sep and split and "/" not in split and Path(path).exists():
        return Path(path), split
    return Path(text), None


def evaluate_run(run_dir: Path, data: Path | None = None, *, split: str | None = None, tta: int = 1,
                 out: Path | None = None, device: str = "auto", n_boot: int = 1000) -> dict:
    """Score a run on a labelled split of a store and write metrics.json, PNGs and report.html.

    `data` defaults to the store the run trained on; `split` to its 'test' split
    when that is labelled, else the run's validation split. The decision
    threshold is the one chosen on validation at the end of training.
    """
    from ..data.store import open_store
    from ..predict import load_run, predict_logits, probabilities

    run = load_run(run_dir, device=device)
    store = open_store(data or Path(run.run["data"]["path"]))
    if split is None:
        test_labelled = "test" in store.split_names and (store.labels[store.splits == "test"] >= 0).any()
        split = "test" if test_labelled else run.config["val_split"]
    rows = store.split_indices(split)
    rows = rows[store.labels[rows] >= 0]
    if len(rows) == 0:
        raise UserError(f"{store.path}: split {split!r} has no labelled patches to evaluate on")
    logits = np.concatenate([predict_logits(run, store.read_batch(rows[b : b + 4096]), tta=tta)
                             for b in range(0, len(rows), 4096)])
    probs = probabilities(run, logits)
    labels = store.labels[rows].astype(np.int64)
    metrics = binary_metrics(labels, probs, threshold=run.threshold)
    slides = store.slides[rows]
    groups = slides if all(slides) else None
    from sklearn.metrics import roc_auc_score

    metrics["roc_auc_ci"] = list(bootstrap_ci(labels, probs, roc_auc_score, n_boot=n_boot, groups=groups))
    metrics["accuracy_at_0.5"] = binary_metrics(labels, probs, threshold=0.5)["accuracy"]
    metrics.update(run=str(run.run_dir), store=str(store.path), split=split, tta=tta,
                   store_fingerprint=store.fingerprint, trained_on=run.run["data"]["fingerprint"],
                   temperature=run.temperature, bootstrap="slide-grouped" if groups is not None else "patch")

    out = Path(out or run.run_dir / f"eval-{split}-tta{tta}")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        confidence_gap = -np.abs(probs - run.threshold)  # uncertainty: closeness to the threshold
        images = {
            "Confusion matrix": plot_confusion_matrix(metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"],
                                                      partial / "confusion_matrix.png"),
            "ROC curve": plot_roc(labels, probs, metrics["roc_auc"], tuple(metrics["roc_auc_ci"]), partial / "roc.png"),
            "Reliability diagram": plot_reliability(labels, probs, metrics["ece"], 15, partial / "reliability.png"),
            "Accuracy on the most confident patches": plot_accuracy_coverage(
                labels, probs, confidence_gap, partial / "accuracy_coverage.png", threshold=run.threshold),
        }
        metrics_csv = run.run_dir / "metrics.csv"
        if len(read_training_curves(metrics_csv)["epoch"]):
            images["Training curves"] = plot_training_curves(metrics_csv, partial / "training_curves.png")
        coverage = accuracy_coverage(labels, (probs >= run.threshold).astype(int), confidence_gap)
        write_json_atomic(partial / "metrics.json", {**metrics, "accuracy_coverage": coverage})
        notes = [f"Decision threshold {run.threshold:.3f}, chosen on the validation split at the end of training.",
                 f"ROC AUC interval: 95% {metrics['bootstrap']} bootstrap, {n_boot} resamples."]
        if store.fingerprint == run.run["data"]["fingerprint"] and split == run.config["val_split"]:
            notes.append("This is the validation split that chose the best epoch and the threshold: "
                         "scores on it are slightly optimistic.")
        write_report(partial, f"histodetect evaluation: {run.run_dir.name} on {store.path.name}:{split} (TTA {tta})",
                     metrics, {k: v for k, v in images.items()}, {"Accuracy-coverage": coverage}, notes)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    metrics["report"] = str(out / "report.html")
    metrics["out"] = str(out)
    return metrics
