"""What one training step and one validation pass are made of: the loss, the optimizer,
SAM's second pass, the learning-rate schedule, and the model's logits over test-time views."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.store import PatchStore
from ..errors import UserError
from ..presets import TrainConfig
from .device import bf16_is_fast


def lr_factor(progress: float, warmup_fraction: float, schedule: str) -> float:
    """Learning-rate multiplier at `progress` in [0, 1] of the run (steps or time, whichever is further)."""
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":
        peak = max(warmup_fraction, 0.25)  # one-cycle spends its first part rising (Smith & Topin 2017)
        if progress < peak:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * progress / peak)) / 2
        return (1 + math.cos(math.pi * min(1.0, (progress - peak) / (1 - peak)))) / 2
    if progress < warmup_fraction:
        return progress / warmup_fraction
    rest = (progress - warmup_fraction) / max(1e-9, 1 - warmup_fraction)
    return (1 + math.cos(math.pi * min(1.0, rest))) / 2


@torch.inference_mode()
def model_logits(model, patches_uint8, mean, std, crop_px: int, device: torch.device,
                   batch_size: int, *, tta: int = 1, shift_px: int = 0, bf16: bool = True,
                   on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Logits (N, tta) of uint8 patches (N, 96, 96, 3): one column per test-time view, batched.

    The views are `augment.tta_view_groups`'s: dihedral views of the centre crop, and
    for 40 or 72 of crops moved by `shift_px` (the training crop's shift). With `bf16`,
    the model runs under bf16 autocast where that is fast (`bf16_is_fast`: CUDA, and
    CPUs with AMX / AVX512-BF16), as training does; elsewhere in float32. `on_batch` is
    called with each batch's number of patches once it is scored (a progress bar).
    """
    from ..augment import tta_view_groups

    fast_bf16 = bf16 and bf16_is_fast(device)
    columns = []
    for begin in range(0, len(patches_uint8), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(patches_uint8[begin : begin + batch_size])).to(device)
        parts = []
        for views in tta_view_groups(batch, tta, mean, std, crop_px, shift_px):  # (V, B, 3, H, W)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_bf16):
                logits = model(views.flatten(0, 1).contiguous(memory_format=torch.channels_last)).float()
            parts.append(logits.reshape(len(views), -1))
        columns.append(torch.cat(parts).T.cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    return np.concatenate(columns) if columns else np.empty((0, tta), np.float32)


def validate(model, store: PatchStore, rows: np.ndarray, cfg: TrainConfig, mean, std, device) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    model.eval()
    logits = model_logits(model, store.read_batch(rows), mean, std, cfg.crop_px, device,
                            cfg.val_batch_size, bf16=cfg.bf16)[:, 0]
    labels = store.labels[rows].astype(np.float32)
    if not np.isfinite(logits).all():  # the last update made the weights NaN or inf: the caller stops
        return {"val_loss": math.nan, "val_auc": math.nan, "val_acc": math.nan}
    probs = 1 / (1 + np.exp(-logits))
    loss = F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels))
    return {
        "val_loss": float(loss),
        "val_auc": float(roc_auc_score(labels, probs)),
        "val_acc": float(((probs >= 0.5) == (labels == 1)).mean()),
    }


def sam_second_pass(train_model, model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                    cfg: TrainConfig, bf16: bool) -> None:
    """Replace the gradients in `model` by SAM's: those at w + rho * g / ||g|| (Foret et al. 2021).

    Called after the first backward pass; the weights are put back before returning,
    so the optimizer then steps from w. BatchNorm running statistics are frozen for the
    second pass, so each batch updates them once, as without SAM.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        moves = torch._foreach_mul(grads, cfg.sam_rho / (norm + 1e-12))
        torch._foreach_add_(params, moves)
    # In training mode a BatchNorm that does not track statistics normalises by the
    # batch's, as the first pass did, and leaves its running buffers alone.
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for module in norms:
        module.track_running_stats = False
    try:
        for p in params:
            p.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = train_model(x).float().reshape(-1)
        training_loss(logits, labels, cfg.label_smoothing).backward()
    finally:
        for module in norms:
            module.track_running_stats = True
        with torch.no_grad():
            torch._foreach_sub_(params, moves)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (the seed's) or AdamW, fused: one kernel for all parameters instead of one per tensor."""
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if cfg.optimizer not in optimizers:
        raise UserError(f"--optimizer {cfg.optimizer!r}: expected adam or adamw")
    # No weight decay on biases and BatchNorm parameters (1-D tensors): decaying them
    # only fights the normalisation (as timm's param_groups_weight_decay does).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return optimizers[cfg.optimizer](groups, lr=cfg.lr, fused=True)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Binary cross-entropy of one sigmoid output, computed from the logit (the same loss as the
    seed's sigmoid + BCE, without its overflow); labels are smoothed towards 0.5."""
    targets = labels * (1 - label_smoothing) + 0.5 * label_smoothing
    return F.binary_cross_entropy_with_logits(logits, targets)
