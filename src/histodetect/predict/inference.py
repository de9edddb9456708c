"""A LoadedRun applied to uint8 patches: logits per test-time view, then calibrated
probabilities (the mean over views, and over MC-dropout passes where there are any)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..data.decode import PATCH_SHAPE, PATCH_SIZE_PX
from ..errors import UserError, check_int
from ..train import model_logits
from .run import LoadedRun, check_run

# Measured in benchmarks/predict_speed.py on the 2-core CPU (BENCHMARKS.md): bf16
# autocast on its AMX units, inference_mode, channels_last and batches of 256 score
# patches 2-3x faster than timm's eager fp32 model called on batches of 64; float32
# alone (--fp32) gained only 0.9-1.3x there.
DEFAULT_BATCH_SIZE = 256


def check_patches(patches_uint8) -> np.ndarray:
    """Patches as the models take them: a uint8 array (N, 96, 96, 3); (N, 3, 96, 96) is turned channels-last.

    Any array-like (a list of patches, a CPU torch tensor) is accepted; anything else
    is a UserError saying what was found and how to get there (a notebook's usual
    slips: floats in 0-1, one patch without its batch axis, another patch size).
    """
    try:
        patches = np.asarray(patches_uint8)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged lists, CUDA tensors
        raise UserError(f"patches_uint8: expected uint8 RGB patches (N, 96, 96, 3), found "
                        f"{type(patches_uint8).__name__} ({str(exc).splitlines()[0]}); pass a numpy array") from None
    found = f"{patches.dtype} {patches.shape}"  # as given, before a channels-first batch is turned
    if patches.ndim == 4 and patches.shape[1:] == (3, PATCH_SIZE_PX, PATCH_SIZE_PX):
        patches = patches.transpose(0, 2, 3, 1)
    if patches.dtype == np.uint8 and patches.ndim == 4 and patches.shape[1:] == PATCH_SHAPE:
        return patches
    if patches.size == 0 and patches.ndim != 4:  # np.asarray([]) is float64 (0,)
        fix = "no patches: an empty batch is np.empty((0, 96, 96, 3), np.uint8)"
    elif patches.dtype.kind == "f":
        fix = "pass the patches as decoded, uint8 0-255 (floats in 0-1: (x * 255).round().astype(np.uint8))"
    elif patches.dtype.kind in "iu" and patches.dtype != np.uint8:
        fix = "pass them as uint8 (values 0-255: x.astype(np.uint8))"
    elif patches.dtype != np.uint8:
        fix = "pass the pixels as a uint8 array"
    elif patches.shape in (PATCH_SHAPE, (3, PATCH_SIZE_PX, PATCH_SIZE_PX)):
        fix = "one patch needs its batch axis: patches[None]"
    elif patches.ndim == 4 and patches.shape[-1] == 3:
        fix = "resize the patches to 96x96 first (decode_patch_file(path, resize=True); CLI: --resize)"
    else:
        fix = "RGB patches, channels last"
    raise UserError(f"patches_uint8: expected uint8 RGB patches (N, 96, 96, 3), found {found}; {fix}")


def check_batch_size(batch_size: int) -> int:
    """`batch_size` as an int, or a UserError naming --batch-size."""
    batch_size = check_int("--batch-size", batch_size)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: expected a number of patches, 1 or more")
    return batch_size


def predict_logits(run: LoadedRun, patches_uint8: np.ndarray, *, tta: int = 1,
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Logits (N, tta): one column per test-time view (`augment.tta_view_groups`), before temperature scaling.

    `on_batch` is called with each batch's number of patches once it is scored (a progress bar).
    """
    run = check_run(run)
    run.check_tta(tta)
    batch_size = check_batch_size(batch_size)
    patches_uint8 = check_patches(patches_uint8)
    return model_logits(run.model, patches_uint8, run.mean, run.std, run.crop_px, run.device, batch_size, tta=tta,
                        shift_px=run.shift_px, bf16=run.bf16, on_batch=on_batch)


def probabilities(run: LoadedRun, logits: np.ndarray) -> np.ndarray:
    """Logits (N, V) or (N, P, V) -> calibrated probability (N,): the mean over views (and passes)."""
    return mean_over_samples(sample_probabilities(logits, run.temperature))


def mean_over_samples(sample_probs: np.ndarray) -> np.ndarray:
    """(N, V) or (N, P, V) -> (N,): the mean over views (and passes); N may be 0."""
    return sample_probs.mean(axis=tuple(range(1, sample_probs.ndim)))


def sample_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Sigmoid of logits / temperature, elementwise, in float64 (any shape)."""
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64) / temperature))


def predict_patches(run: LoadedRun, patches_uint8: np.ndarray, *, tta: int = 1,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Probability of tumour (N,) for uint8 patches (N, 96, 96, 3)."""
    return probabilities(run, predict_logits(run, patches_uint8, tta=tta, batch_size=batch_size))
