"""The run folder's files other than checkpoints: metrics.csv, and the check before a run takes a folder."""

from __future__ import annotations

import csv
from pathlib import Path

from ...errors import UserError
from ...outputs import write_file_atomic
from ..checkpoint import RUN_FILE

METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "val_acc", "lr", "seconds")


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """metrics.csv, one row per epoch of `history`, written whole."""
    def write(handle) -> None:
        writer = csv.writer(handle)
        writer.writerow(METRICS_COLUMNS)
        writer.writerows([round(row[c], 6) if isinstance(row[c], float) else row[c] for c in METRICS_COLUMNS]
                         for row in history)

    write_file_atomic(path, write)


def _check_run_folder(out: Path, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """Refuse an --out that is not a new or empty folder, unless --overwrite names an old run.

    `inputs` maps flags to the files they name (--data, --weights): --overwrite deletes
    the old run folder whole, so none of them may lie inside it.
    """
    if out.exists() and any(out.iterdir()):
        if not (out / RUN_FILE).exists():
            raise UserError(f"{out}: exists, is not empty and is not a run folder; choose a new --out")
        if not overwrite:
            raise UserError(f"{out}: already holds a run; pass --resume {out} to continue it or --overwrite to replace it")
        # `--data run/store --out run --overwrite` trained, then deleted the store it trained on.
        for flag, path in inputs.items():
            if path is not None and out.resolve() in (Path(path).resolve(), *Path(path).resolve().parents):
                raise UserError(f"{out}: --overwrite would delete the old run and with it {flag} {path}, "
                                f"which lies inside it; move that out of {out} first, or choose another --out")
