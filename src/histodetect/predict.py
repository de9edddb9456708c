"""load_run(), predict_patches(): a trained run applied to patches from any input.

Inputs are a store, an image folder (any reader format), image files or a PCam
h5 file; output is a CSV `id,prob,pred` (or Kaggle's `id,label`), written to a
temporary file and renamed.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .augment import TTA_VIEW_COUNTS
from .data.decode import IMAGE_SUFFIXES
from .data.formats import open_source
from .data.folder import list_image_files
from .data.record import UNLABELLED
from .data.store import is_store, open_store
from .errors import UserError
from .models import create_model
from .train import Dist, load_checkpoint, read_run, resolve_device
from .train import model_logits

# Measured in benchmarks/predict_speed.py on the 2-core CPU: inference_mode +
# channels_last + batches of 256 beat timm's eager fp32 model called on batches of
# 64 (see BENCHMARKS.md).
DEFAULT_BATCH_SIZE = 256


@dataclass
class LoadedRun:
    """A trained model ready to score patches, with the preprocessing its weights expect."""

    run_dir: Path
    model: torch.nn.Module
    device: torch.device
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_px: int
    threshold: float  # decision threshold chosen on validation (0.5 until one was chosen)
    temperature: float  # logits are divided by it (1.0 = uncalibrated)
    config: dict
    run: dict


def load_run(run_dir: Path, *, checkpoint: str = "best", device: str = "auto", threads: int = 0) -> LoadedRun:
    """Load a run folder's `best` (or `last`) weights for inference."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    state = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    config = state["config"]
    model = create_model(config["model"], drop_rate=config["drop_rate"])
    key = "model" if checkpoint == "best" or state.get("ema") is None else "ema"
    weights = state[key]
    if key == "ema":  # timm's EMA wraps the model as `module`
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    model.load_state_dict(weights)
    if threads:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device, Dist())
    model.to(torch_device).eval().to(memory_format=torch.channels_last)
    pre = state["preprocessing"]
    calibration = run.get("calibration") or {}
    return LoadedRun(
        run_dir=run_dir, model=model, device=torch_device, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
        crop_px=int(pre["crop_px"]), threshold=float(run.get("threshold", 0.5)),
        temperature=float(calibration.get("temperature", 1.0)), config=config, run=run,
    )


def predict_logits(run: LoadedRun, patches_uint8: np.ndarray, *, tta: int = 1,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Logits (N, tta): one column per dihedral view (TTA), before temperature scaling."""
    if tta not in TTA_VIEW_COUNTS:
        raise UserError(f"--tta {tta}: expected one of {', '.join(map(str, TTA_VIEW_COUNTS))}")
    return model_logits(run.model, patches_uint8, run.mean, run.std, run.crop_px, run.device, batch_size, tta=tta)


def probabilities(run: LoadedRun, logits: np.ndarray) -> np.ndarray:
    """Per-view logits (N, V) -> calibrated probability (N,): mean of the views' probabilities."""
    return (1 / (1 + np.exp(-logits / run.temperature))).mean(axis=1)


def predict_patches(run: LoadedRun, patches_uint8: np.ndarray, *, tta: int = 1,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Probability of tumour (N,) for uint8 patches (N, 96, 96, 3)."""
    return probabilities(run, predict_logits(run, patches_uint8, tta=tta, batch_size=batch_size))


@dataclass
class InputChunk:
    ids: list[str]
    patches: np.ndarray  # (N, 96, 96, 3) uint8
    labels: np.ndarray  # (N,) int8, UNLABELLED where unknown


def count_inputs(inputs: list[Path], split: str | None = None) -> int:
    return sum(n for n, _ in (_open_input(path, split) for path in _group_inputs(inputs)))


def _group_inputs(inputs: list[Path]) -> list[Path | list[Path]]:
    """Image files given one by one are read as one group; folders, stores and h5 files alone."""
    groups: list[Path | list[Path]] = []
    files: list[Path] = []
    for path in map(Path, inputs):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        elif path.is_file() and path.suffix.lower() not in (".h5", ".hdf5"):
            raise UserError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}), h5 file, store or folder")
        else:
            groups.append(path)
    return groups + ([files] if files else [])


def _open_input(item: Path | list[Path], split: str | None):
    """(number of patches, a function yielding InputChunks)."""
    if isinstance(item, list):
        source = list_image_files(item)
    elif is_store(item):
        store = open_store(item)
        rows = store.split_indices(split) if split else np.arange(len(store))

        def chunks(chunk_size: int) -> Iterator[InputChunk]:
            for begin in range(0, len(rows), chunk_size):
                part = rows[begin : begin + chunk_size]
                yield InputChunk(list(store.ids[part]), store.read_batch(part), store.labels[part])

        return len(rows), chunks
    else:
        source = open_source(item)
    keep = np.array([split is None or s == split for s in source.splits])
    if split and not keep.any():
        raise UserError(f"{item}: no patches in split {split!r} (found {', '.join(sorted(set(source.splits)))})")

    def chunks(chunk_size: int) -> Iterator[InputChunk]:
        offset = 0
        for batch in source.iter_batches(chunk_size):
            mask = keep[offset : offset + len(batch.ids)]
            offset += len(batch.ids)
            if mask.any():
                yield InputChunk([i for i, k in zip(batch.ids, mask) if k], batch.patches[mask], batch.labels[mask])

    return int(keep.sum()), chunks


def iter_inputs(inputs: list[Path], *, split: str | None = None, chunk_size: int = 1024) -> Iterator[InputChunk]:
    """Decode the inputs chunk by chunk, in order."""
    for item in _group_inputs(inputs):
        _, chunks = _open_input(item, split)
        yield from chunks(chunk_size)


def write_csv_atomic(path: Path, header: tuple[str, ...], rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def predict_to_csv(run: LoadedRun, inputs: list[Path], out: Path, *, tta: int = 1, split: str | None = None,
                   kaggle_submission: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: bool = True) -> tuple[Path, int]:
    """Score every patch of `inputs` and write `id,prob,pred` (or Kaggle's `id,label`) to `out`.

    A Kaggle submission scores only unlabelled patches (a Kaggle folder's test/).
    """
    rows: list[tuple] = []
    total = count_inputs(inputs, split)
    with tqdm(total=total, unit="patch", desc="predict", disable=not progress) as bar:
        for chunk in iter_inputs(inputs, split=split):
            ids, patches = chunk.ids, chunk.patches
            if kaggle_submission:
                unlabelled = chunk.labels == UNLABELLED
                ids, patches = [i for i, u in zip(ids, unlabelled) if u], patches[unlabelled]
            probs = predict_patches(run, patches, tta=tta, batch_size=batch_size)
            if kaggle_submission:
                rows += [(i, f"{p:.6f}") for i, p in zip(ids, probs)]
            else:
                rows += [(i, f"{p:.6f}", int(p >= run.threshold)) for i, p in zip(ids, probs)]
            bar.update(len(chunk.ids))
    if kaggle_submission and not rows:
        raise UserError(f"{', '.join(map(str, inputs))}: no unlabelled patches for a Kaggle submission; pass the test/ folder")
    header = ("id", "label") if kaggle_submission else ("id", "prob", "pred")
    return write_csv_atomic(out, header, rows), len(rows)
