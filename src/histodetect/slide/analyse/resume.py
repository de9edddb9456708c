"""Resuming: the settings key, a finished result reused or refused, progress.npy, moving the result in."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import UserError
from ...outputs import write_file_atomic
from ...predict import LoadedRun
from ...train import bf16_is_fast
from .config import OPTION_FLAGS, SlideConfig

SUMMARY_FILE = "summary.json"
PROGRESS_FILE = "progress.npy"


def _settings(run: LoadedRun, slide_path: Path, config: SlideConfig, threshold: float) -> dict:
    """Everything the results depend on (not workers / batch size); summary.json keeps it."""
    slide_stat = slide_path.stat()
    weights = run.run_dir / "checkpoints" / "best.pt"
    weights_stat = weights.stat() if weights.exists() else None
    # What computes the scores: an export (ONNX Runtime, TorchScript) or PyTorch in bf16 or float32
    # score alike but not identically, so one's results are not another's. The precision is the one
    # used, as model_logits decides it: run.bf16 alone said bf16 for a CPU without AMX, which scores
    # in float32 (a CUDA bf16 result was reused there, and --fp32 there refused its own scores).
    exported = getattr(run.model, "exported", None)
    engine = ([str(exported.path.resolve()), exported.path.stat().st_mtime_ns] if exported is not None
              else ["torch", run.device.type, bool(run.bf16 and bf16_is_fast(run.device))])
    settings = {
        "slide": [str(slide_path.resolve()), slide_stat.st_size, slide_stat.st_mtime_ns],
        "run": [str(run.run_dir.resolve()), weights_stat and weights_stat.st_mtime_ns],
        "engine": engine,
        "config": {k: v for k, v in asdict(config).items() if k not in ("workers", "batch_size")},
        "threshold": threshold, "temperature": run.temperature, "version": __version__,
    }
    return json.loads(json.dumps(settings))  # as read back from summary.json: tuples as lists


def _settings_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# What a user changed, in their words, for each part of the settings.
_SETTING_WORDS = {"slide": "the slide file", "run": "the run or its weights", "engine": "the engine or precision",
                  "threshold": "the threshold", "temperature": "the temperature (calibrate)",
                  "version": "the histodetect version"}


def _changed(old: dict | None, new: dict) -> str:
    """What differs between the settings of an earlier result and these, as words ('--tta, the threshold')."""
    if not isinstance(old, dict):
        return "an earlier histodetect's, which did not record them"
    words = [OPTION_FLAGS.get(name, name) for name in new["config"]  # --stride sets stride_px
             if (old.get("config") or {}).get(name) != new["config"][name]]
    words += [_SETTING_WORDS.get(part, part) for part in new if part != "config" and old.get(part) != new[part]
              and not (part == "threshold" and {"--threshold", "--tta"} & set(words))]  # it follows them
    return ", ".join(words) or "none that this histodetect names"


def _existing_result(out_dir: Path, settings: dict, overwrite: bool) -> dict | None:
    """The summary of a complete result with these settings; a UserError if out_dir holds anything else."""
    key = _settings_key(settings)
    if not out_dir.exists():
        return None
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file; --out names the folder to write the results into")
    summary_path = out_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary is not None and summary.get("settings_key") == key and not overwrite:
        return summary
    if overwrite and (summary is not None or not any(out_dir.iterdir())):
        return None
    if summary is None:  # never replaced, --overwrite or not: they are someone's files
        raise UserError(f"{out_dir}: already holds files that are not a slide result; choose another --out")
    raise UserError(f"{out_dir}: already holds a slide result from other settings (changed: "
                    f"{_changed(summary.get('settings'), settings)}); pass --overwrite to replace it, or choose another --out")


def _load_progress(path: Path, key: str) -> np.ndarray | None:
    key_path = path.parent / "settings_key"
    if not path.is_file() or not key_path.is_file() or key_path.read_text() != key:
        return None
    return np.load(path)


def _save_progress(path: Path, probs: np.ndarray) -> None:
    # Through memory: np.save straight into a file on a full disk says "1000000 requested and
    # 130544 written", without the ENOSPC that write_file_atomic names.
    buffer = io.BytesIO()
    np.save(buffer, probs)
    write_file_atomic(path, lambda handle: handle.write(buffer.getbuffer()), "wb")


def _keep_scores(partial: Path, progress_path: Path, probs: np.ndarray) -> bool:
    """After the outputs failed to write (a full disk): remove them, which frees the room,
    and save the tile scores for the rerun. Whether they were saved."""
    for path in partial.iterdir():
        if path.name not in (PROGRESS_FILE, "settings_key"):
            path.unlink(missing_ok=True)
    try:
        _save_progress(progress_path, probs)
    except UserError:
        return False
    return True


def _install(partial: Path, out_dir: Path) -> None:
    """Rename the complete partial folder to out_dir, replacing an old result only once the new one is whole."""
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)
