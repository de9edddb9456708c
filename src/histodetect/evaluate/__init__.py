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
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.splits import check_seed
from ..errors import UserError, check_int
from ..outputs import check_output_folder, naming_write_errors, replace_folder
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


EVALUATION_FILES = ("metrics.json", "report.html")


def is_evaluation_folder(folder: Path) -> bool:
    """Whether `folder` holds an earlier evaluation's output and nothing else (then --out may replace it)."""
    names = {path.name for path in folder.iterdir()}
    return set(EVALUATION_FILES) <= names and all(
        name in EVALUATION_FILES or name.endswith(".png") for name in names)


def parse_data_arg(text: str) -> tuple[Path, str | None]:
    """'STORE[:split]' -> (store path, split or None)."""
    path, sep, split = text.rpartition(":")
    if sep and split and "/" not in split and not Path(text).exists():
        return Path(path), split
    return Path(text), None


TRIAGE_COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def _triage_tables(labels: np.ndarray, preds: np.ndarray, measures: dict[str, np.ndarray]) -> dict[str, list[dict]]:
    """Accuracy-coverage rows per uncertainty measure (see predict.uncertainty_measures)."""
    return {name: accuracy_coverage(labels, preds, doubt, TRIAGE_COVERAGES) for name, doubt in measures.items()}


def _triage_report_rows(tables: dict[str, list[dict]]) -> list[dict]:
    """One row per coverage: patches kept and the accuracy on them when each measure picks them."""
    first = next(iter(tables.values()))
    return [{"coverage": row["coverage"], "patches": row["n_patches"],
             **{f"accuracy by {name.replace('_', ' ')}": tables[name][i]["accuracy"] for name in tables}}
            for i, row in enumerate(first)]


def evaluate_run(run_dir: Path, data: Path | None = None, *, split: str | None = None, tta: int = 1,
                 out: Path | None = None, device: str = "auto", n_boot: int = 1000, mc_passes: int = 0,
                 seed: int = 0, fp32: bool = False, progress: bool = True) -> dict:
    """Score a run on a labelled split of a store and write metrics.json, PNGs and report.html.

    `data` defaults to the store the run trained on; `split` to its 'test' split
    when that is labelled, else the run's validation split. The decision
    threshold is the one chosen on validation at the end of training for `tta`
    views (moved with the temperature when the run is calibrated). The report shows NLL and
    ECE before and after temperature scaling, and selective prediction: the
    accuracy on the most confident patches by each uncertainty (closeness to
    the threshold, entropy, TTA spread with `tta` > 1, MC-dropout spread with
    `mc_passes`). `fp32` scores in float32 instead of bf16 autocast where that is
    fast (see `predict.LoadedRun.bf16`). `progress` shows a bar of the patches scored.
    """
    from ..data.store import open_store

    # The triage PNG and metrics.json's "accuracy_coverage" rank patches by predict's
    # DEFAULT_UNCERTAINTY (the one benchmarks/uncertainty.py found best); the table
    # compares every uncertainty this evaluation has.
    from ..predict import (
        DEFAULT_UNCERTAINTY,
        load_run,
        mean_over_samples,
        predict_samples,
        run_thresholds,
        sample_probabilities,
        uncertainty_measures,
    )

    # Before loading and scoring (minutes): n_boot was first read by the bootstrap after them. As
    # Python's ints, as metrics.json holds tta and mc_passes (numpy's failed there, after the scoring).
    tta, mc_passes, n_boot = check_int("--tta", tta), check_int("--mc", mc_passes), check_int("--bootstrap", n_boot)
    if n_boot < 1:
        raise UserError(f"--bootstrap {n_boot}: expected at least 1 resample of the AUC interval, e.g. --bootstrap 1000")
    seed = check_seed(seed)
    run = load_run(run_dir, device=device, fp32=fp32)
    store = open_store(data or Path(run.run["data"]["path"]))
    if split is None:
        test_labelled = "test" in store.split_names and (store.labels[store.splits == "test"] >= 0).any()
        split = "test" if test_labelled else run.config["val_split"]
    rows = store.split_indices(split)
    rows = rows[store.labels[rows] >= 0]
    if len(rows) == 0:
        raise UserError(f"{store.path}: split {split!r} has no labelled patches to evaluate on")
    if len(np.unique(store.labels[rows])) < 2:
        only = int(store.labels[rows][0])
        raise UserError(f"{store.path}: split {split!r} holds only label {only} ({len(rows)} patches); "
                        "ROC AUC and the threshold's trade-off need both classes")
    # Checked before the scoring (minutes to hours): an --out that cannot be written, or that
    # holds anything but an earlier evaluation, is refused now. The default names the store
    # when it is not the one trained on, so evaluations on other stores do not replace each other.
    trained_here = store.fingerprint == run.run["data"]["fingerprint"]
    on_training_split = trained_here and split == run.config["train_split"]
    default_name = f"eval-{split}-tta{tta}" if trained_here else f"eval-{store.path.name}-{split}-tta{tta}"
    out = check_output_folder(Path(out or run.run_dir / default_name), "--out", is_evaluation_folder,
                              keep=[run.run_dir, store.path])
    if on_training_split:  # scored on what it learnt from: a user comparing numbers should know
        # After the --out check: a refused --out is then one line, not a warning and an error.
        warnings.warn(f"{store.path}:{split} is the split {run.run_dir} trained on: its scores show how well the "
                      f"model fits it, not how well it generalises (evaluate on {run.config['val_split']} or a test split)",
                      stacklevel=2)
    # A bar, because the scoring can take minutes to hours: Kaggle's 22,003 validation patches
    # took 165 s with --tta 8 on one CPU thread before a first line was printed (--tta 72: 9 times that).
    # It moves per batch: per 4,096-patch read it stood still for 3 minutes at --tta 72 on one thread.
    # The reads stay 4,096 patches, as the MC-dropout seeds are tied to them (seed + begin).
    chunks = []
    with tqdm(total=len(rows), unit="patch", desc="evaluate", disable=not progress) as bar:
        for begin in range(0, len(rows), 4096):
            part = rows[begin : begin + 4096]
            chunks.append(predict_samples(run, store.read_batch(part), tta=tta, mc_passes=mc_passes, seed=seed + begin,
                                          on_batch=bar.update))
    logits = np.concatenate(chunks)  # (N, P, V)
    sample_probs = sample_probabilities(logits, run.temperature)  # (N, P, V)
    probs = mean_over_samples(sample_probs)
    uncalibrated_probs = mean_over_samples(sample_probabilities(logits))
    labels = store.labels[rows].astype(np.int64)
    threshold = run.threshold_for(tta)
    metrics = binary_metrics(labels, probs, threshold=threshold)
    uncalibrated = binary_metrics(labels, uncalibrated_probs)
    slides = store.slides[rows]
    groups = slides if all(slides) else None
    from sklearn.metrics import roc_auc_score

    metrics["roc_auc_ci"] = list(bootstrap_ci(labels, probs, roc_auc_score, n_boot=n_boot, groups=groups))
    metrics["accuracy_at_0.5"] = binary_metrics(labels, probs, threshold=0.5)["accuracy"]
    calibration = run.run.get("calibration") or {}
    # What made these numbers, to trace them back months later: the store as an absolute path (as
    # typed, 'store' named whatever the working folder held), the weights, precision and seeds.
    metrics.update(nll_uncalibrated=uncalibrated["nll"], ece_uncalibrated=uncalibrated["ece"],
                   **run.computed_by(), store=str(store.path.resolve()), split=split, tta=tta, mc_passes=mc_passes,
                   seed=seed, store_fingerprint=store.fingerprint, trained_on=run.run["data"]["fingerprint"],
                   temperature=run.temperature, bootstrap="slide-grouped" if groups is not None else "patch",
                   bootstrap_resamples=n_boot)
    preds = (probs >= threshold).astype(np.int64)
    measures = uncertainty_measures(sample_probs, threshold)
    triage = _triage_tables(labels, preds, measures)
    metrics["triage_uncertainty"] = DEFAULT_UNCERTAINTY

    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with naming_write_errors(out):
        try:
            images = {
                "Confusion matrix": plot_confusion_matrix(metrics["tn"], metrics["fp"], metrics["fn"], metrics["tp"],
                                                          partial / "confusion_matrix.png"),
                "ROC curve": plot_roc(labels, probs, metrics["roc_auc"], tuple(metrics["roc_auc_ci"]),
                                      partial / "roc.png"),
                "Reliability diagram": plot_reliability(labels, probs, metrics["ece"], 15, partial / "reliability.png"),
            }
            if calibration:
                images["Reliability diagram before temperature scaling"] = plot_reliability(
                    labels, uncalibrated_probs, uncalibrated["ece"], 15, partial / "reliability_uncalibrated.png")
            images[f"Accuracy on the most confident patches (by {DEFAULT_UNCERTAINTY})"] = plot_accuracy_coverage(
                labels, probs, measures[DEFAULT_UNCERTAINTY], partial / "accuracy_coverage.png", threshold=threshold)
            metrics_csv = run.run_dir / "metrics.csv"
            if metrics_csv.is_file() and len(read_training_curves(metrics_csv)["epoch"]):
                images["Training curves"] = plot_training_curves(metrics_csv, partial / "training_curves.png")
            write_json_atomic(partial / "metrics.json", {**metrics, "accuracy_coverage": triage[DEFAULT_UNCERTAINTY],
                                                         "accuracy_coverage_by_uncertainty": triage})
            threshold_note = (f"Decision threshold {threshold:.3f}: the one chosen on the validation split at the end "
                              f"of training for {tta}-view predictions")
            if calibration:
                chosen = run_thresholds(run.run, calibrated=False)
                threshold_note += f" ({chosen.get(tta, chosen[1]):.3f}), moved by the temperature."
                notes = [threshold_note,
                         (f"Temperature scaling T = {run.temperature:.3f}, fitted on {calibration['split']} "
                          f"({calibration['n']} patches): NLL {uncalibrated['nll']:.4f} -> {metrics['nll']:.4f}, "
                          f"ECE {uncalibrated['ece']:.4f} -> {metrics['ece']:.4f} here.")]
                if calibration["store_fingerprint"] == store.fingerprint and calibration["split"] == split:
                    notes.append("The temperature was fitted on this split: its calibration scores are optimistic.")
            else:
                notes = [threshold_note + ".",
                         (f"Not calibrated (T = 1): run 'histodetect calibrate {run.run_dir} --data STORE:valid' "
                          "to fit temperature scaling.")]
            notes += [f"ROC AUC interval: 95% {metrics['bootstrap']} bootstrap, {n_boot} resamples.",
                      ("Selective prediction: each column keeps the given share of patches that an uncertainty "
                       "ranks most confident (doubt = closeness to the decision threshold; entropy in bits; "
                       "spread = standard deviation of the probability over TTA views or MC-dropout passes) "
                       "and refers the rest to a pathologist.")]
            if store.fingerprint == run.run["data"]["fingerprint"] and split == run.config["val_split"]:
                notes.append("This is the validation split that chose the best epoch and the threshold: "
                             "scores on it are slightly optimistic.")
            if on_training_split:
                notes.append("This is the split the run trained on: its scores show how well the model fits it, "
                             "not how well it generalises.")
            title = f"histodetect evaluation: {run.run_dir.name} on {store.path.name}:{split} (TTA {tta}"
            title += f", MC-dropout {mc_passes})" if mc_passes else ")"
            write_report(partial, title, metrics, images, {"Accuracy-coverage": _triage_report_rows(triage)}, notes)
            replace_folder(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    metrics["accuracy_coverage"] = triage[DEFAULT_UNCERTAINTY]
    metrics["accuracy_coverage_by_uncertainty"] = triage
    metrics["report"] = str(out / "report.html")
    metrics["out"] = str(out)
    return metrics
