"""predict_to_csv(): every patch of the inputs scored into one CSV, `id,prob,pred` (with the
uncertainty columns and review decisions asked for) or Kaggle's `id,label`; --out, the ids
and the review options are checked, and the file is written to a temporary file and renamed."""

from __future__ import annotations

import csv
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.splits import check_seed
from ..errors import UserError, check_number
from ..outputs import check_output_file, write_file_atomic
from ..train import RUN_FILE
from .inference import (
    DEFAULT_BATCH_SIZE,
    check_batch_size,
    mean_over_samples,
    sample_probabilities,
)
from .inputs import input_paths, open_inputs
from .run import LoadedRun, check_run
from .uncertainty import (
    DEFAULT_UNCERTAINTY,
    _check_mc_passes,
    predict_samples,
    uncertainty_measures,
)

# Per-patch uncertainty columns of `predict_to_csv`, all "higher = more doubt":
# closeness to the decision threshold (see `uncertainty_measures`), predictive
# entropy of the mean probability in bits (0 = certain, 1 = a coin toss), and the
# standard deviation of the probability over the dihedral views (TTA) and over
# the MC-dropout passes.
UNCERTAINTY_COLUMNS = {"doubt": "doubt", "entropy": "entropy_bits", "tta_sd": "prob_sd_tta", "mc_sd": "prob_sd_mc"}


def write_csv_atomic(path: Path, header: tuple[str, ...], rows) -> Path:
    """A CSV with Unix line ends (csv's default "\r\n" leaves a "\r" in `cut` and `awk`), written whole."""

    def write(handle) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)

    return write_file_atomic(path, write)


def _check_unique_ids(rows: list[tuple], inputs: list[Path], kaggle_submission: bool) -> None:
    """Kaggle refuses a submission that repeats an id; elsewhere a repeat is worth a warning."""
    counts = Counter(row[0] for row in rows)
    repeated = [patch_id for patch_id, n in counts.items() for _ in range(n - 1)]
    if not repeated:
        return
    where = ", ".join(map(str, inputs))
    if kaggle_submission:
        raise UserError(f"{where}: id {repeated[0]} appears more than once ({len(repeated)} repeats); "
                        "a Kaggle submission needs each test id once: pass the test/ folder once")
    warnings.warn(f"{where}: {len(repeated)} ids appear more than once (first: {repeated[0]}): the same file "
                  "name in two inputs; predict them into separate CSVs to tell them apart", stacklevel=3)


def _check_review(review_above: float | None, review_by: str, tta: int, mc_passes: int) -> float | None:
    """`review_above` as a number (or None), or a UserError naming --review-above or --review-by."""
    if review_above is not None:
        review_above = check_number("--review-above", review_above)
    needs = {"doubt": None, "entropy": None, "tta_sd": ("--tta 4 or more", tta > 1), "mc_sd": ("--mc N", mc_passes > 0)}
    if not isinstance(review_by, str) or review_by not in needs:  # a list was a TypeError (unhashable)
        raise UserError(f"--review-by {review_by!r}: expected one of {', '.join(needs)}")
    if review_above is None and review_by != "doubt":  # it only chooses what --review-above compares: alone it did nothing
        raise UserError(f"--review-by {review_by}: it picks the uncertainty --review-above compares; add "
                        f"--review-above U (e.g. 0.5) to mark patches for review, or drop --review-by "
                        "(--uncertainty writes every uncertainty column)")
    if needs[review_by] is not None and not needs[review_by][1]:
        raise UserError(f"--review-by {review_by}: this uncertainty needs {needs[review_by][0]}; add it or review by doubt")
    if review_above is not None and not 0 <= review_above <= 1:
        raise UserError(f"--review-above {review_above}: expected an uncertainty in [0, 1] "
                        f"(doubt, entropy in bits, or a probability spread), e.g. --review-above 0.5")
    return review_above


def _is_predict_csv(path: Path) -> bool:
    """Whether `path` is empty (`mktemp`) or starts with a header predict writes (`id,prob,pred...`
    or Kaggle's `id,label`): replacing it loses nothing of anyone else's."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(256).strip()
    except OSError:
        return False
    return first == b"" or first.startswith(b"id,prob,pred") or first == b"id,label"


def predict_to_csv(run: LoadedRun, inputs: Path | str | list[Path | str], out: Path | str, *, tta: int = 1, split: str | None = None,
                   kaggle_submission: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: bool = True, uncertainty: bool = False, mc_passes: int = 0,
                   review_above: float | None = None, review_by: str = DEFAULT_UNCERTAINTY,
                   resize: bool = False, seed: int = 0) -> tuple[Path, int]:
    """Score every patch of `inputs` and write `id,prob,pred` (or Kaggle's `id,label`) to `out`.

    A Kaggle submission scores only unlabelled patches (a Kaggle folder's test/).
    With `uncertainty`, `mc_passes` or `review_above`, the CSV also has `doubt`,
    `entropy_bits`, `prob_sd_tta` (with TTA) and `prob_sd_mc` (with MC-dropout;
    `prob` is then the mean over the passes; see `uncertainty_measures`); with
    `review_above` U, a column `decision` says `tumour`, `normal`, or `review`
    where the `review_by` uncertainty is above U, so that a pathologist looks
    only at those. `inputs` is one path or a list of them (files, folders, stores, h5 files).
    Returns the CSV's path and its number of rows.
    """
    run = check_run(run)
    # Never over an input (or the labels and slide table beside it), the run's own files or
    # a model file: only an earlier output of predict is replaced.
    inputs = input_paths(inputs)
    beside = [f for folder in inputs if folder.is_dir()
              for f in (*folder.glob("*labels*.csv"), *folder.glob("*_meta.csv"))]
    check_output_file(out, is_ours=_is_predict_csv, protect=[
        run.run_dir / RUN_FILE, run.run_dir / "checkpoints", *(i for i in inputs if i.is_file()), *beside])
    batch_size = check_batch_size(batch_size)
    run.check_tta(tta)
    mc_passes = _check_mc_passes(run, mc_passes)
    seed = check_seed(seed)
    review_above = _check_review(review_above, review_by, tta, mc_passes)
    with_uncertainty = uncertainty or mc_passes > 0 or review_above is not None
    if kaggle_submission and (uncertainty or review_above is not None):
        raise UserError("--kaggle-submission writes exactly id,label; drop --uncertainty and --review-above "
                        "(or write a second CSV without --kaggle-submission)")
    columns = [name for name in UNCERTAINTY_COLUMNS
               if name in ("doubt", "entropy") or (name == "tta_sd" and tta > 1) or (name == "mc_sd" and mc_passes)]
    rows: list[tuple] = []
    threshold = run.threshold_for(tta)
    total, chunks = open_inputs(inputs, split=split, resize=resize, unlabelled_only=kaggle_submission)
    with tqdm(total=total, unit="patch", desc="predict", disable=not progress) as bar:
        for index, chunk in enumerate(chunks):
            ids, patches = chunk.ids, chunk.patches
            logits = predict_samples(run, patches, tta=tta, mc_passes=mc_passes, batch_size=batch_size,
                                     seed=seed + index, on_batch=bar.update)  # (N, P, V)
            sample_probs = sample_probabilities(logits, run.temperature)
            probs = mean_over_samples(sample_probs)
            if kaggle_submission:
                rows += [(i, f"{p:.6f}") for i, p in zip(ids, probs)]
            elif not with_uncertainty:
                rows += [(i, f"{p:.6f}", int(p >= threshold)) for i, p in zip(ids, probs)]
            else:
                measures = uncertainty_measures(sample_probs, threshold)
                preds = (probs >= threshold).astype(int)
                extra = [[f"{u:.6f}" for u in measures[name]] for name in columns]
                if review_above is not None:
                    decisions = np.where(preds == 1, "tumour", "normal").astype(object)
                    decisions[measures[review_by] > review_above] = "review"
                    extra.append(list(decisions))
                rows += [(i, f"{p:.6f}", pred, *more) for i, p, pred, *more in zip(ids, probs, preds, *extra)]
    if kaggle_submission and not rows:
        raise UserError(f"{', '.join(map(str, inputs))}: no unlabelled patches for a Kaggle submission; pass the test/ folder")
    _check_unique_ids(rows, inputs, kaggle_submission)
    if kaggle_submission:
        header: tuple[str, ...] = ("id", "label")
    else:
        header = ("id", "prob", "pred")
        if with_uncertainty:
            header += tuple(UNCERTAINTY_COLUMNS[name] for name in columns)
            header += ("decision",) if review_above is not None else ()
    return write_csv_atomic(out, header, rows), len(rows)
