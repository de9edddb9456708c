"""Temperature scaling (Guo et al. 2017): one scalar T, fitted on validation, that makes probabilities honest.

Logits are divided by T before the sigmoid: T > 1 softens an over-confident
model, T < 1 sharpens an under-confident one, and the ranking of patches (ROC
AUC) does not change. T minimises the validation negative log-likelihood.
`calibrate_run` stores it in the run's run.json, where `load_run` reads it, so
`predict`, `evaluate` and `explain` apply it from then on.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from tqdm import tqdm

from ..data.store import open_store
from ..errors import UserError
from ..evaluate.metrics import NLL_CLIP_EPS, binary_metrics
from ..predict import (
    LoadedRun,
    load_run,
    predict_logits,
    run_folder,
    run_thresholds,
    sample_probabilities,
)
from ..train import RUN_FILE, read_run, write_text_atomic

# T is searched in [1/100, 100] on a log scale: beyond that a model is not
# miscalibrated but broken (or constant), and the fit says so by hitting a bound.
_LOG_TEMPERATURE_BOUNDS = (-math.log(100.0), math.log(100.0))
_LOGIT_CHUNK = 4096  # patches scored at a time, as evaluate does


def nll_at_temperature(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of labels (N,) under logits (N,) or (N, V) divided by `temperature`.

    With V views, the probability is the mean of the views' probabilities, as
    predict computes it; probabilities are clipped as in `binary_metrics`.
    """
    probs = sample_probabilities(logits, temperature).reshape(len(labels), -1).mean(axis=1)
    probs = np.clip(probs, NLL_CLIP_EPS, 1 - NLL_CLIP_EPS)
    return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T that minimises the NLL of labels (N,) under logits (N,) or (N, V) / T.

    Bounded Brent search on log T (the NLL of one view is convex in 1/T). Never
    worse than no scaling: if the search ends above the NLL at T = 1, returns 1.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.shape != (len(logits),) or not np.isin(labels, (0, 1)).all():
        raise UserError(f"labels: expected one 0/1 label per row of logits {logits.shape}, found shape {labels.shape} "
                        f"with values {np.unique(labels)[:6].tolist()}; pass the labels of the scored patches")
    if len(np.unique(labels)) < 2:
        raise UserError(f"labels: temperature scaling needs both normal (0) and tumour (1) patches, "
                        f"found only {int(labels[0])} in {len(labels)}; calibrate on a split with both classes")
    result = minimize_scalar(lambda log_t: nll_at_temperature(logits, labels, math.exp(log_t)),
                             bounds=_LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-5})
    temperature = math.exp(float(result.x))
    if nll_at_temperature(logits, labels, temperature) > nll_at_temperature(logits, labels, 1.0):
        return 1.0
    return temperature


TIE_MARGIN = 1e-12  # see calibrated_threshold


def calibrated_threshold(threshold: float, temperature: float) -> float:
    """Where a decision threshold on uncalibrated probabilities lands after dividing the logits by T.

    A threshold chosen on validation before `choose_threshold` moved it halfway to the
    next lower probability is one of its probabilities, so some patch (and its
    duplicates) sits exactly on it and counts as tumour. Rounding in the mapping
    could move such a tie to either side; lowering the result by 1e-12, far below
    any difference between real patches, keeps it on the tumour side.
    """
    p = min(max(threshold, NLL_CLIP_EPS), 1 - NLL_CLIP_EPS)
    return float(1 / (1 + math.exp(-math.log(p / (1 - p)) / temperature))) - TIE_MARGIN


def calibrate_run(run_dir: Path | str | LoadedRun, data: Path | str | None = None, *, split: str | None = None,
                  tta: int = 1, device: str = "auto", fp32: bool = False, progress: bool = True) -> dict:
    """Fit temperature scaling on a labelled split and store it under "calibration" in the run's run.json.

    `data` defaults to the store the run trained on, `split` to its validation
    split; the training split is refused (it would hide over-confidence). The
    record holds the temperature, NLL and ECE before and after, the split and
    the store's fingerprint, and where the decision threshold moves to.
    Given a LoadedRun (loaded with its own `device` and `fp32`), that run is scored and
    takes the new temperature and thresholds too; a LoadedRun of the same folder loaded
    before keeps the ones it was loaded with (load_run again).
    """
    if isinstance(run_dir, LoadedRun):
        run = run_dir
        if device != "auto" or fp32:
            raise UserError("calibrate_run: device and fp32 are set when a run is loaded; pass "
                            f"load_run({str(run.run_dir)!r}, device=..., fp32=...) or the folder's path")
        # run.json's temperature is applied to best.pt's logits wherever the run is loaded: one
        # fitted on last.pt's, or on an export's away from its folder, calibrated the wrong weights.
        exported = getattr(run.model, "exported", None)
        if exported is not None:
            raise UserError(f"calibrate_run: this LoadedRun runs the export {exported.path}; calibrate the run "
                            "folder it was exported from, then export it again")
        if run.checkpoint != "best":
            raise UserError(f"calibrate_run: this LoadedRun runs checkpoints/{run.checkpoint}.pt, but run.json's "
                            f"calibration applies to best.pt; pass load_run({str(run.run_dir)!r}) or the folder's path")
        run_dir = run.run_dir
    else:
        run_dir = run_folder(run_dir)
        run = load_run(run_dir, device=device, fp32=fp32)
    store = open_store(data or Path(run.run["data"]["path"]))
    split = split or run.config["val_split"]
    if split == run.config["train_split"] and store.fingerprint == run.run["data"]["fingerprint"]:
        raise UserError(f"{store.path}:{split}: the run trained on this split, where it looks better calibrated "
                        f"than it is; calibrate on the validation split ({store.path}:{run.config['val_split']})")
    rows = store.split_indices(split)
    rows = rows[store.labels[rows] >= 0]
    if len(rows) == 0:
        raise UserError(f"{store.path}: split {split!r} has no labelled patches to calibrate on")
    labels = store.labels[rows].astype(np.int64)
    chunks = []
    with tqdm(total=len(rows), unit="patch", desc="calibrate", disable=not progress) as bar:
        for begin in range(0, len(rows), _LOGIT_CHUNK):
            part = rows[begin : begin + _LOGIT_CHUNK]
            chunks.append(predict_logits(run, store.read_batch(part), tta=tta, on_batch=bar.update))
    logits = np.concatenate(chunks)  # (N, tta), uncalibrated
    temperature = fit_temperature(logits, labels)
    before = binary_metrics(labels, sample_probabilities(logits).mean(axis=1))
    after = binary_metrics(labels, sample_probabilities(logits, temperature).mean(axis=1))
    uncalibrated = {str(views): t for views, t in run_thresholds(run.run, calibrated=False).items()}
    record = {
        "temperature": temperature,
        "nll_before": before["nll"], "nll_after": after["nll"],
        "ece_before": before["ece"], "ece_after": after["ece"],
        "split": split, "store": str(store.path.resolve()), "store_fingerprint": store.fingerprint,
        "n": len(rows), "tta": tta,
        "threshold": calibrated_threshold(uncalibrated["1"], temperature),
        "uncalibrated_threshold": uncalibrated["1"],
        # one per TTA view count (see train.loop.thresholds._validation_thresholds)
        "thresholds": {views: calibrated_threshold(t, temperature) for views, t in uncalibrated.items()},
        "uncalibrated_thresholds": uncalibrated,
        "fitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # With what it was fitted: the logits, and so the temperature, move with the precision used.
        **{key: value for key, value in run.computed_by().items() if key not in ("run", "run_started")},
    }
    # Read again just before writing: the run may have changed while the logits were computed.
    run_json = read_run(run_dir)
    run_json["calibration"] = record
    write_text_atomic(run_dir / RUN_FILE, json.dumps(run_json, indent=2) + "\n")
    run.run, run.temperature = run_json, temperature
    run.thresholds = run_thresholds(run_json, where=str(run_dir / RUN_FILE))
    return record
