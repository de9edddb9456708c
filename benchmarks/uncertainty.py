"""Calibration and selective prediction of a run: the numbers issue #4 asks for in BENCHMARKS.md.

    .venv/bin/python benchmarks/uncertainty.py RUN --data STORE[:split] [--mc 20] [--json out.json]

On the labelled split (default: the run's validation split):

1. Calibration. ECE and NLL before temperature scaling and after it, with T
   fitted on the whole split (what `histodetect calibrate` does, so "after" is
   in-sample) and 2-fold cross-fitted (T fitted on one stratified half, scored
   on the other: an honest estimate of what calibration buys on new patches).
2. Triage. Accuracy on the most confident 100%, 80% and 50% of patches:
   (a) each method with its own predictions, as it would be deployed: plain
       confidence (one view; distance of the probability from the threshold),
       TTA spread (8 dihedral views, SD of their probabilities), MC-dropout
       spread (--mc passes, one view, SD over passes);
   (b) one common prediction (8 views x MC passes), ranked by each uncertainty,
       so that only the ranking differs: which uncertainty ranks best.
   Probabilities are temperature-scaled with the fitted T.
3. Cost of the sampling on this machine: seconds per 1,000 patches for one view,
   8 views, MC-dropout with the backbone run once (what predict does) and as
   many full passes (what MC-dropout costs when the backbone runs every pass).

Runs without dropout (drop_rate 0) skip the MC rows and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from histodetect.data.store import open_store
from histodetect.evaluate import accuracy_coverage, binary_metrics, parse_data_arg
from histodetect.explain import calibrated_threshold, fit_temperature
from histodetect.predict import (
    has_dropout,
    load_run,
    predict_samples,
    run_thresholds,
    sample_probabilities,
    uncertainty_measures,
)

COVERAGES = (1.0, 0.8, 0.5)
AREA_COVERAGES = tuple(np.round(np.linspace(1.0, 0.5, 11), 2))  # the mean accuracy over these ranks measures


def calibration_numbers(logits_nv: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """ECE/NLL before, after in-sample temperature scaling and after 2-fold cross-fitted scaling."""
    def scores(temperature: float, rows: np.ndarray) -> dict:
        probs = sample_probabilities(logits_nv[rows], temperature).mean(axis=1)
        metrics = binary_metrics(labels[rows], probs)
        return {"nll": metrics["nll"], "ece": metrics["ece"]}

    everything = np.arange(len(labels))
    temperature = fit_temperature(logits_nv, labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for label in (0, 1):  # stratified halves
        rows = rng.permutation(np.flatnonzero(labels == label))
        fold[rows] = np.arange(len(rows)) % 2
    cross_probs = np.empty(len(labels))
    fold_temperatures = []
    for k in (0, 1):
        fit_rows, score_rows = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        fold_temperatures.append(fit_temperature(logits_nv[fit_rows], labels[fit_rows]))
        cross_probs[score_rows] = sample_probabilities(logits_nv[score_rows], fold_temperatures[-1]).mean(axis=1)
    cross = binary_metrics(labels, cross_probs)
    return {"temperature": temperature, "fold_temperatures": fold_temperatures,
            "before": scores(1.0, everything), "after_in_sample": scores(temperature, everything),
            "after_cross_fitted": {"nll": cross["nll"], "ece": cross["ece"]}}


def triage_rows(labels: np.ndarray, preds: np.ndarray, doubt: np.ndarray) -> dict:
    rows = accuracy_coverage(labels, preds, doubt, COVERAGES + AREA_COVERAGES)
    by_coverage = {row["coverage"]: row["accuracy"] for row in rows}
    return {"accuracy": {f"{c:.0%}": by_coverage[c] for c in COVERAGES},
            "mean_accuracy_50_to_100": float(np.mean([by_coverage[c] for c in AREA_COVERAGES]))}


def seconds_per_1000(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", required=True, help="STORE[:split] (default split: the run's validation split)")
    parser.add_argument("--mc", type=int, default=20, help="MC-dropout passes (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-patches", type=int, default=500, help="patches timed per sampling method")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    run = load_run(args.run, device="cpu")
    store_path, split = parse_data_arg(args.data)
    store = open_store(store_path)
    split = split or run.config["val_split"]
    rows = store.split_indices(split)
    rows = rows[store.labels[rows] >= 0]
    labels = store.labels[rows].astype(np.int64)
    patches = store.read_batch(rows)
    mc = args.mc if has_dropout(run.model) else 0
    # One threshold per view count, chosen on validation at the end of training (averaging
    # views pulls probabilities to the middle), each moved by this script's temperature as
    # `calibrate_run` moves them.
    uncalibrated = run_thresholds(run.run, calibrated=False)

    views = predict_samples(run, patches, tta=8)[:, 0, :]  # (N, 8) logits; view 0 is the patch as it is
    calibration = calibration_numbers(views[:, :1], labels, args.seed)
    temperature = calibration["temperature"]
    thresholds = {views: calibrated_threshold(t, temperature) for views, t in uncalibrated.items()}

    def threshold_for(views: int) -> float:  # as LoadedRun.threshold_for: the largest count <= views
        return thresholds[max(n for n in thresholds if n <= views)]

    def probs_of(logits: np.ndarray) -> np.ndarray:
        return sample_probabilities(logits, temperature)

    one_view = probs_of(views[:, None, :1])  # (N, 1, 1)
    eight_views = probs_of(views[:, None, :])  # (N, 1, 8)
    own: dict[str, dict] = {}
    for name, sample, measure in (("plain confidence (1 view)", one_view, "doubt"),
                                  ("TTA spread (8 views)", eight_views, "tta_sd")):
        prob = sample.mean(axis=(1, 2))
        threshold = threshold_for(sample.shape[2])
        own[name] = triage_rows(labels, (prob >= threshold).astype(int), uncertainty_measures(sample, threshold)[measure])
    common_logits = views[:, None, :]
    if mc:
        mc_one_view = probs_of(predict_samples(run, patches, tta=1, mc_passes=mc, seed=args.seed))  # (N, P, 1)
        prob = mc_one_view.mean(axis=(1, 2))
        own[f"MC-dropout spread ({mc} passes)"] = triage_rows(
            labels, (prob >= threshold_for(1)).astype(int), uncertainty_measures(mc_one_view, threshold_for(1))["mc_sd"])
        common_logits = predict_samples(run, patches, tta=8, mc_passes=mc, seed=args.seed)
    common = probs_of(common_logits)
    common_prob = common.mean(axis=(1, 2))
    common_preds = (common_prob >= threshold_for(8)).astype(int)
    ranked = {name: triage_rows(labels, common_preds, doubt)
              for name, doubt in uncertainty_measures(common, threshold_for(8)).items()}
    best = max(ranked, key=lambda name: ranked[name]["mean_accuracy_50_to_100"])

    timed = patches[: args.timing_patches]
    timing = {"1 view": seconds_per_1000(lambda: predict_samples(run, timed), len(timed)),
              "8 views": seconds_per_1000(lambda: predict_samples(run, timed, tta=8), len(timed))}
    if mc:
        timing[f"MC {mc} passes, backbone once"] = seconds_per_1000(
            lambda: predict_samples(run, timed, mc_passes=mc), len(timed))
        # Full MC passes cost what plain passes do (a dropout mask is nothing next to the backbone).
        timing[f"{mc} full passes"] = seconds_per_1000(
            lambda: [predict_samples(run, timed) for _ in range(mc)], len(timed))

    result = {"run": str(args.run), "store": str(store.path), "split": split, "n": len(rows), "mc_passes": mc,
              "calibration": calibration, "thresholds": thresholds, "triage_own_predictions": own,
              "triage_common_prediction": ranked, "best_ranking": best, "seconds_per_1000_patches": timing,
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"}

    print(f"{args.run} on {store.path}:{split} ({len(rows)} patches), {result['machine']}")
    before, in_sample, cross = (calibration[k] for k in ("before", "after_in_sample", "after_cross_fitted"))
    print(f"\nTemperature T = {temperature:.3f} (halves: {', '.join(f'{t:.3f}' for t in calibration['fold_temperatures'])})")
    print("| | ECE | NLL |\n|---|---|---|")
    print(f"| before | {before['ece']:.4f} | {before['nll']:.4f} |")
    print(f"| after, T fitted on the whole split | {in_sample['ece']:.4f} | {in_sample['nll']:.4f} |")
    print(f"| after, 2-fold cross-fitted | {cross['ece']:.4f} | {cross['nll']:.4f} |")
    if not mc:
        print(f"\nMC-dropout: skipped, {run.config['model']} has no dropout (drop_rate {run.config.get('drop_rate', 0)})")
    common_name = f"8 views x {mc} MC passes" if mc else "8 views"
    for title, table in (("each with its own predictions", own),
                         (f"one prediction ({common_name}), ranked by each uncertainty", ranked)):
        print(f"\nAccuracy on the most confident patches, {title}:")
        print("| uncertainty | " + " | ".join(f"{c:.0%}" for c in COVERAGES) + " | mean 50-100% |")
        print("|---" * (len(COVERAGES) + 2) + "|")
        for name, numbers in table.items():
            print(f"| {name} | " + " | ".join(f"{a:.4f}" for a in numbers["accuracy"].values())
                  + f" | {numbers['mean_accuracy_50_to_100']:.4f} |")
    print(f"\nRanks best (mean accuracy over coverages 50-100% of one prediction): {best}")
    print("\nSeconds per 1,000 patches: " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
