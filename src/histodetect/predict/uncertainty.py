"""Uncertainty: logits sampled over TTA views and MC-dropout passes (`predict_samples`),
and the per-patch measures taken from them (doubt, entropy, spreads)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

from ..augment import tta_view_groups
from ..errors import UserError, check_int
from ..train import bf16_is_fast
from .inference import (
    DEFAULT_BATCH_SIZE,
    check_batch_size,
    check_patches,
    predict_logits,
)
from .run import LoadedRun, check_run

# The uncertainty `--review-above` compares with and `evaluate` triages by: how
# close the probability is to the decision threshold, where a decision is least
# sure. benchmarks/uncertainty.py ranked one prediction (8 views x 20 MC-dropout
# passes) of a 3-minute `cpu` run on pcam-jpeg valid by each uncertainty: the most
# confident half was 0.927 accurate by doubt, 0.896 by entropy, 0.883 by TTA spread
# and 0.799 by MC-dropout spread (0.782 for all patches). Entropy measures
# closeness to 0.5 instead, and falls further behind when the threshold is far
# from it: on the test model of tests/test_explain.py (threshold 0.655) the most
# confident half was 0.867 accurate by doubt and 0.828 by entropy (0.777 for all).
DEFAULT_UNCERTAINTY = "doubt"
# Far more than MC-dropout needs (20-100 passes are usual): --mc 100000000 still ran after
# 2 minutes on 120 patches, and --mc 2**63 grew a list of passes until the kernel killed it.
MAX_MC_PASSES = 1000


_DROPOUT_TYPES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                  torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _dropout_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that drop units in training mode: dropout layers with p > 0, and modules with a
    `drop_rate` > 0 (timm heads call F.dropout(..., training=self.training) with it)."""
    return [m for m in model.modules()
            if (isinstance(m, _DROPOUT_TYPES) and m.p > 0) or float(getattr(m, "drop_rate", 0) or 0) > 0]


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether MC-dropout can sample anything from `model`."""
    return bool(_dropout_owners(model))


@contextmanager
def mc_dropout(model: torch.nn.Module):
    """Turn on the model's dropout, and nothing else, for MC-dropout (Gal & Ghahramani 2016).

    Only the `training` flag of the dropout owners is set (not `.train()`, which
    would recurse): BatchNorm keeps its running statistics and stochastic depth
    stays off. The flags are restored on exit. It changes the shared model, so
    do not score with the same model in another thread meanwhile.
    """
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    for module in _dropout_owners(model):
        module.training = True
    try:
        yield model
    finally:
        for module, training in saved:
            module.training = training


def _check_mc_passes(run: LoadedRun, mc_passes: int) -> int:
    """`mc_passes` as an int that `run` can make, or a UserError naming --mc."""
    mc_passes = check_int("--mc", mc_passes)
    if mc_passes < 0 or mc_passes == 1:
        raise UserError(f"--mc {mc_passes}: expected 0 (off) or at least 2 MC-dropout passes, e.g. --mc 20")
    if mc_passes > MAX_MC_PASSES:
        raise UserError(f"--mc {mc_passes}: expected at most {MAX_MC_PASSES} MC-dropout passes (20-100 are usual)")
    if mc_passes and not has_dropout(run.model):
        raise UserError(
            f"--mc {mc_passes}: {run.run_dir} ({run.config.get('model', 'exported model')}, "
            f"drop_rate {run.config.get('drop_rate', 0)}) "
            "has no dropout to sample; drop --mc, or train with --drop-rate 0.2 or more"
        )
    return mc_passes


def _backbone_is_random(model: torch.nn.Module, views: torch.Tensor) -> bool:
    """Whether forward_features itself drops units (dropout inside the backbone), tried on two passes."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return True
    sample = views[:4]
    return not torch.equal(model.forward_features(sample), model.forward_features(sample))


@torch.inference_mode()
def _mc_logits(run: LoadedRun, patches_uint8: np.ndarray, tta: int, mc_passes: int,
               batch_size: int, on_batch: Callable[[int], None] | None) -> np.ndarray:
    """Logits (N, mc_passes, tta) with dropout on; each view of each patch gets its own masks."""
    device = run.device
    columns, backbone_random = [], None
    for begin in range(0, len(patches_uint8), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(patches_uint8[begin : begin + batch_size])).to(device)
        parts = []
        for views in tta_view_groups(batch, tta, run.mean, run.std, run.crop_px, run.shift_px):  # (V, B, 3, H, W)
            flat = views.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16 and bf16_is_fast(device)):
                if backbone_random is None:
                    backbone_random = _backbone_is_random(run.model, flat)
                if backbone_random:
                    logits = torch.stack([run.model(flat) for _ in range(mc_passes)])
                else:
                    # timm heads drop units only after pooling: the backbone runs once and
                    # the cheap head once per pass. 20 passes of a cpu-preset model took 4.0 s
                    # per 1,000 patches against 36 s for 20 full passes and 1.7 s for one plain
                    # pass (benchmarks/uncertainty.py, shared 2-core CPU).
                    features = run.model.forward_features(flat)
                    logits = torch.stack([run.model.forward_head(features) for _ in range(mc_passes)])
            parts.append(logits.float().reshape(mc_passes, len(views), -1))  # (P, V, B)
        columns.append(torch.cat(parts, dim=1).permute(2, 0, 1).cpu().numpy())  # (B, P, tta)
        if on_batch is not None:
            on_batch(len(batch))
    return np.concatenate(columns) if columns else np.empty((0, mc_passes, tta), np.float32)


def predict_samples(run: LoadedRun, patches_uint8: np.ndarray, *, tta: int = 1, mc_passes: int = 0,
                    batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                    on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Logits (N, P, V) before temperature scaling: P MC-dropout passes (1 without MC) of V test-time views.

    With `mc_passes`, the dropout masks come from `seed`: the same call gives the same logits.
    `on_batch` is called with each batch's number of patches once it is scored (a progress bar).
    """
    run = check_run(run)
    run.check_tta(tta)
    mc_passes = _check_mc_passes(run, mc_passes)
    # Only the type: predict_to_csv and evaluate_run check the user's seed, then give chunk k seed + k,
    # which passes 2**32 for a valid --seed near the top (torch takes it; refused, it failed after chunk 0).
    batch_size, seed = check_batch_size(batch_size), check_int("--seed", seed)
    if not mc_passes:
        return predict_logits(run, patches_uint8, tta=tta, batch_size=batch_size, on_batch=on_batch)[:, None, :]
    patches_uint8 = check_patches(patches_uint8)
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), mc_dropout(run.model):
        torch.manual_seed(seed)
        return _mc_logits(run, patches_uint8, tta, mc_passes, batch_size, on_batch)


def entropy_bits(probs: np.ndarray) -> np.ndarray:
    """Binary predictive entropy in bits of tumour probabilities: 0 when certain, 1 at 0.5."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def uncertainty_measures(sample_probs: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Per-patch uncertainties (N,) of probabilities (N, P, V) over P passes and V views; higher = more doubt.

    `doubt` is plain confidence turned around: 1 on the decision threshold, falling
    linearly to 0 at probability 0 below it and at 1 above it (prob / threshold, or
    (1 - prob) / (1 - threshold)), so a confident call on either side has no doubt
    whatever the threshold. `entropy` is the predictive entropy in bits, `tta_sd` the
    spread over views (P-averaged; when V > 1), `mc_sd` the spread over passes
    (V-averaged; when P > 1).
    """
    prob = sample_probs.mean(axis=(1, 2))
    # One scale for both sides (|prob - t| / max(t, 1 - t)) left a sure negative at
    # doubt (1 - 2t) / (1 - t), 0.51 for t = 0.33: --review-above 0.5 reviewed every negative.
    doubt = np.where(prob < threshold, prob / max(threshold, 1e-12), (1 - prob) / max(1 - threshold, 1e-12))
    measures = {"doubt": doubt, "entropy": entropy_bits(prob)}
    if sample_probs.shape[2] > 1:
        measures["tta_sd"] = sample_probs.mean(axis=1).std(axis=1)
    if sample_probs.shape[1] > 1:
        measures["mc_sd"] = sample_probs.mean(axis=2).std(axis=1)
    return measures
