"""What fit() checks before anything is written: the store's training and validation rows,
the model against every crop size, and what a --resume may change."""

from __future__ import annotations

import numpy as np
import torch

from ...data.store import PatchStore
from ...errors import UserError
from ...models import forward_failure
from ...presets import TrainConfig, training_crop_sizes


def _check_model_takes_crops(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """One blank image at every crop size training and prediction will use, before anything is written.

    create_model builds a vision transformer for the largest crop, but some networks still
    take only some sizes (maxvit's windows, dla's and hrnet's upsampling need multiples of
    32, inception's last stage more than 64 px): that must be one line now rather than a
    traceback after run.json.
    """
    largest, *smaller = training_crop_sizes(cfg)
    reason = forward_failure(model, largest)
    if reason is not None:
        raise UserError(f"--model {cfg.model}: cannot take {largest} px crops ({reason}); choose another --crop-px "
                        "(0: the whole 96 px; some networks need a multiple of 32) or another model")
    for px in smaller:
        if (reason := forward_failure(model, px)) is not None:
            raise UserError(f"--model {cfg.model}: cannot take the {px} px crops of --progressive-crop "
                            f"{cfg.progressive_crop} ({reason}); pass --progressive-crop '' or choose another model")


def _class_rows(store: PatchStore, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Training and validation rows; makes a validation split when the store has none."""
    train_rows = store.split_indices(cfg.train_split)
    train_rows = train_rows[store.labels[train_rows] >= 0]
    if len(train_rows) == 0:
        raise UserError(f"{store.path}: split {cfg.train_split!r} has no labelled patches; training needs labels")
    counts = np.bincount(store.labels[train_rows], minlength=2)
    if counts.min() == 0:
        only = int(np.argmax(counts))
        raise UserError(
            f"{store.path}: split {cfg.train_split!r} has only label {only} ({counts[only]} patches); "
            "training needs both classes"
        )
    note = None
    val_rows = np.zeros(0, dtype=np.int64)
    if cfg.val_split in store.split_names:
        val_rows = store.split_indices(cfg.val_split)
        val_rows = val_rows[store.labels[val_rows] >= 0]
    if len(val_rows) == 0:  # no such split, or one without labels
        from ...data.splits import make_validation_split

        missing = "no" if cfg.val_split not in store.split_names else "no labelled"
        moved = make_validation_split(store.labels[train_rows], list(store.slides[train_rows]), 0.1, cfg.seed)
        train_rows, val_rows = train_rows[~moved], train_rows[moved]
        note = (f"{store.path}: {missing} {cfg.val_split!r} split; validating on a stratified 10% of "
                f"{cfg.train_split!r} ({len(val_rows)} patches, seed {cfg.seed})")
    if len(np.unique(store.labels[val_rows])) < 2:
        raise UserError(f"{store.path}: the validation split needs both classes to measure AUC")
    return train_rows, val_rows, note


# What --resume may change: where and how fast it runs, never what it trains (the weights
# then equal an uninterrupted run's, but for --threads on the CPU: another thread count
# sums in another order, so the weights differ in rounding). They apply to this process
# only; the checkpoints keep the run's own config. --device must still name the kind the
# run trained on.
RESUME_SETTINGS = ("device", "threads", "val_batch_size", "profile", "checkpoint_minutes")
