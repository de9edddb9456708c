"""fit(config) -> run folder: the training loop and the files it writes.

    training.py    fit(): the training loop, top to bottom
    checks.py      what fit() checks before anything is written; what --resume may change
    run_folder.py  metrics.csv, and whether a folder may take a new run
    thresholds.py  the decision thresholds chosen on the validation split after training

A test that patches a name fit() looks up patches it in training.py, where the lookup is.
"""

from .checks import RESUME_SETTINGS
from .run_folder import METRICS_COLUMNS, METRICS_FILE, write_metrics_csv
from .thresholds import MOVED_CROP_THRESHOLD_ROWS
from .training import FitResult, fit

__all__ = ["METRICS_COLUMNS", "METRICS_FILE", "MOVED_CROP_THRESHOLD_ROWS", "RESUME_SETTINGS", "FitResult", "fit",
           "write_metrics_csv"]
