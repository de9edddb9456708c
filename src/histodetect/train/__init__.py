"""fit(config) -> run folder.

A run folder holds:

    run.json          the full config, preprocessing (mean, std, patch and crop size),
                      the store's fingerprint, package versions, seed, device
    metrics.csv       one row per epoch: train loss, validation loss / AUC / accuracy
    checkpoints/      last.pt (resume from it) and best.pt (highest validation AUC),
                      each written to a temporary file and renamed

Data path: patches stay uint8 until they are on the device; on the GPU the whole
training shard lives there when it fits under `resident_fraction` of free memory,
otherwise batches are gathered from the memory-mapped store by a background thread
into pinned memory and copied on a side stream. The CPU gathers each batch from
the memory-mapped store (in RAM through the page cache), holding no copy of it.
Augmentation and normalisation run on whole batches on the device (the augment package).

The package, in the order a step meets it:

    device.py      which device, bf16 where it is fast, torchrun's process group
    batches.py     DeviceBatches: the training shard as uint8 batches on the device
    step.py        the loss, the optimizer, SAM, the learning-rate schedule, validation
    checkpoint.py  atomic checkpoints, run.json, package versions
    loop/          fit(): the training loop, top to bottom; metrics.csv; the thresholds
"""

from ..presets import PRESETS, TrainConfig, preset_config
from .batches import DeviceBatches
from .checkpoint import CHECKPOINT_FORMAT, RUN_FILE, feed_digest, load_checkpoint, read_run, save_atomic, write_text_atomic
from .device import Dist, bf16_is_fast, init_distributed, resolve_device
from .loop import METRICS_COLUMNS, METRICS_FILE, FitResult, fit
from .step import build_optimizer, lr_factor, model_logits, sam_second_pass, training_loss, validate

__all__ = [
    "CHECKPOINT_FORMAT", "METRICS_COLUMNS", "METRICS_FILE", "PRESETS", "RUN_FILE", "DeviceBatches", "Dist", "FitResult",
    "TrainConfig", "bf16_is_fast", "build_optimizer", "feed_digest", "fit", "init_distributed", "load_checkpoint", "lr_factor",
    "model_logits", "preset_config", "read_run", "resolve_device", "sam_second_pass", "save_atomic", "training_loss",
    "validate", "write_text_atomic",
]
