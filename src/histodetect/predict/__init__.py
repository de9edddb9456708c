"""load_run(), predict_patches(): a trained run applied to patches from any input.

Inputs are a store, an image folder (any reader format), image files or a PCam
h5 file; output is a CSV `id,prob,pred` (or Kaggle's `id,label`), written to a
temporary file and renamed. Asked for, each patch also gets its uncertainty:
the spread of its probability over the 8 dihedral views (TTA) and over
MC-dropout passes, and its predictive entropy; `review_above` sends the
uncertain ones to a pathologist.

Uncertainty sampling lives here, not in `explain`, because predict's columns
need it and imports flow down the pipeline (explain imports predict).

The package, in the order a prediction meets it:

    run.py          load_run(): LoadedRun, the run's thresholds and temperature
    inference.py    logits over test-time views, calibrated probabilities, predict_patches()
    uncertainty.py  MC-dropout sampling, predict_samples(), the uncertainty measures
    inputs.py       stores, folders, image files and h5 files, counted and read chunk by chunk
    csv_output.py   predict_to_csv(): the checks on --out, ids and review, the CSV written whole
"""

from .csv_output import UNCERTAINTY_COLUMNS, predict_to_csv, write_csv_atomic
from .inference import (
    DEFAULT_BATCH_SIZE,
    check_batch_size,
    check_patches,
    mean_over_samples,
    predict_logits,
    predict_patches,
    probabilities,
    sample_probabilities,
)
from .inputs import InputChunk, input_paths, iter_inputs, open_inputs
from .run import (
    LoadedRun,
    check_run,
    check_threads,
    file_sha256,
    load_run,
    run_folder,
    run_thresholds,
)
from .uncertainty import (
    DEFAULT_UNCERTAINTY,
    MAX_MC_PASSES,
    entropy_bits,
    has_dropout,
    mc_dropout,
    predict_samples,
    uncertainty_measures,
)

__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_UNCERTAINTY", "MAX_MC_PASSES", "UNCERTAINTY_COLUMNS", "InputChunk", "LoadedRun",
    "check_batch_size", "check_patches", "check_run", "check_threads", "entropy_bits", "file_sha256", "has_dropout",
    "input_paths", "iter_inputs", "load_run", "mc_dropout", "mean_over_samples", "open_inputs",
    "predict_logits", "predict_patches", "predict_samples", "predict_to_csv", "probabilities", "run_folder", "run_thresholds",
    "sample_probabilities", "uncertainty_measures", "write_csv_atomic",
]
