"""The decision thresholds chosen on the validation split once training ends, one per TTA view count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...data.store import PatchStore
from ...models import create_model
from ...presets import TrainConfig, training_crop_sizes
from ..checkpoint import load_checkpoint
from ..step import model_logits

MOVED_CROP_THRESHOLD_ROWS = 4096  # see _validation_thresholds


def _validation_thresholds(out: Path, store: PatchStore, val_rows: np.ndarray, cfg: TrainConfig,
                           mean, std, device: torch.device, progress: bool = False) -> dict[str, float]:
    """The best checkpoint's decision thresholds, chosen on the validation split: one per TTA view count.

    Averaging views pulls probabilities towards the middle, so the threshold that
    suits one view does not suit eight (on pcam-jpeg's valid split, 1-view
    thresholds of 0.30-0.44 cost 8-view accuracy up to 0.8 points against 8-view
    ones of 0.37-0.50, 2026-11-27). Each TTA's views are the first n of the 72
    (`augment.tta_view_groups`), so one pass serves them all. 40 and 72 only for a
    run trained on a shifted crop, and chosen on at most MOVED_CROP_THRESHOLD_ROWS
    evenly spaced validation patches: 72 views cost 9 times 8 (on a CPU, PCam's whole
    valid split would take minutes). `progress` shows a bar of the patch views scored.
    """
    from ...augment import DIHEDRAL_VIEW_COUNTS, tta_view_counts
    from ...evaluate.metrics import choose_threshold

    best = load_checkpoint(out / "checkpoints" / "best.pt")
    model = create_model(cfg.model, drop_rate=cfg.drop_rate, input_size_px=max(training_crop_sizes(cfg)))
    model.load_state_dict(best["model"])
    model.to(device).eval().to(memory_format=torch.channels_last)
    moved = [n for n in tta_view_counts(cfg.crop_px, cfg.shift_px) if n not in DIHEDRAL_VIEW_COUNTS]
    subset = val_rows
    if len(val_rows) > MOVED_CROP_THRESHOLD_ROWS:
        subset = val_rows[np.linspace(0, len(val_rows) - 1, MOVED_CROP_THRESHOLD_ROWS).round().astype(np.int64)]
    if moved and len(subset) == len(val_rows):
        passes = [(val_rows, max(moved), [*DIHEDRAL_VIEW_COUNTS, *moved])]
    else:
        passes = [(val_rows, 8, list(DIHEDRAL_VIEW_COUNTS))] + ([(subset, max(moved), moved)] if moved else [])
    thresholds = {}
    # A bar: 72 views of 2,000 patches take minutes on a CPU (4.6 minutes for Kaggle's 22,003 on one thread).
    with tqdm(total=sum(len(rows) * views for rows, views, _ in passes), unit="view", desc="thresholds",
              disable=not progress) as bar:
        for rows, views, counts in passes:
            # Each crop's 8 views at a time: batches of an eighth keep validation's memory.
            logits = model_logits(model, store.read_batch(rows), mean, std, cfg.crop_px, device,
                                  max(1, cfg.val_batch_size // 8), tta=views, shift_px=cfg.shift_px, bf16=cfg.bf16,
                                  on_batch=lambda n, views=views: bar.update(n * views))
            view_probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
            labels = store.labels[rows]
            thresholds.update({str(n): float(choose_threshold(labels, view_probs[:, :n].mean(axis=1)))
                               for n in counts})
    return thresholds
