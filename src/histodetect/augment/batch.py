"""The batch entry points: `augment_batch` for training, `preprocess_batch` for evaluation, `mixup_batch`.

They check the uint8 batch and the normalisation statistics where they come in,
run the steps of the other modules in order, and normalise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .blur_noise import gaussian_blur, gaussian_noise
from .colour import color_jitter, hed_jitter
from .config import AugmentConfig
from .geometry import (
    _centre_crop,
    _crop_window_px,
    _gather_pixels,
    _rotate_and_zoom,
    _spatial_source_index,
)
from .tensors import _constant


def augment_batch(
    patches_uint8: Tensor,
    config: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Turn a uint8 batch into an augmented, normalised float32 batch: the one call training makes.

    patches_uint8: (N, H, W, 3) or (N, 3, H, W) uint8 on any device. mean, std: the
    model's per-channel normalisation on the [0, 1] scale. Steps: rotation and
    zoom about the centre (if on), centre crop to `crop_px` with its position
    jittered by up to `shift_px`, dihedral, HED stain jitter, colour jitter, blur,
    noise, then (x - mean) / std. Returns (N, 3, crop, crop)
    float32 in channels_last memory format on the input's device. The same
    generator seed gives the same batch; random draws are made on the generator's
    device, so a CPU generator gives the same augmentations on a GPU batch.
    """
    images = _as_nchw(patches_uint8)  # (N, 3, H, W) uint8, a view
    _check_mean_std(mean, std)
    window_px = _crop_window_px(config, images.shape)
    if config.rotate_deg or config.scale:
        # Resampled straight into the crop window, in float (0-255), from the whole patch.
        images = _rotate_and_zoom(images.float(), window_px, config.rotate_deg, config.scale, generator)
    else:
        images = _centre_crop(images, window_px)
    out_px = config.crop_px or window_px
    # Crop shift and dihedral only move pixels: their index maps compose into one
    # gather, run on the uint8 pixels before the conversion to float (unless the
    # rotation has already made them float).
    source_index = _spatial_source_index(config, images.shape[0], out_px, window_px, images, generator)
    if source_index is not None:
        images = _gather_pixels(images, source_index, out_px)
    # In place is safe: .float() copies uint8 input, and a float window is grid_sample's
    # (or the gather's) own new tensor, never the caller's.
    images = images.float().div_(255)
    if config.hed_sigma or config.hed_bias:
        images = hed_jitter(images, config.hed_sigma, config.hed_bias, generator)
    if config.brightness or config.contrast or config.saturation or config.hue:
        images = color_jitter(
            images, config.brightness, config.contrast, config.saturation, config.hue, generator
        )
    if config.blur_sigma:
        images = gaussian_blur(images, config.blur_sigma, generator)
    if config.noise_std:
        images = gaussian_noise(images, config.noise_std, generator)
    return _normalise(images, mean, std)


def mixup_batch(images: Tensor, labels: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al. 2018): blend each image and its label with the batch's reverse.

    images: (N, C, H, W) float; labels: (N,) float. Returns weight * own +
    (1 - weight) * partner for both, the partner of image i being image N - 1 - i.
    Pairing with the reversed batch, as timm's Mixup does, needs no random draw
    besides the weight: training batches already come in random order.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mixup weight must be in [0, 1], found {weight}")
    return (
        images.mul(weight).add_(images.flip(0), alpha=1.0 - weight),
        labels.mul(weight).add_(labels.flip(0), alpha=1.0 - weight),
    )


def preprocess_batch(
    patches_uint8: Tensor, mean: Sequence[float], std: Sequence[float], crop_px: int = 0
) -> Tensor:
    """Deterministic preprocessing for evaluation and prediction: `augment_batch` with every augmentation off.

    uint8 (N, H, W, 3) or (N, 3, H, W) -> float in [0, 1] -> centre crop (0 = none)
    -> (x - mean) / std. Returns (N, 3, crop, crop) float32, channels_last.
    """
    return augment_batch(patches_uint8, AugmentConfig(crop_px=crop_px), mean, std)


def _as_nchw(patches_uint8: Tensor) -> Tensor:
    """A (N, 3, H, W) view of a uint8 batch stored as (N, H, W, 3) or (N, 3, H, W)."""
    shape = tuple(patches_uint8.shape)
    if patches_uint8.dtype != torch.uint8 or len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise UserError(
            f"patches_uint8: expected a uint8 RGB batch (N, H, W, 3) or (N, 3, H, W), "
            f"found {patches_uint8.dtype} {shape}; pass the patches as read, before any "
            f"conversion to float"
        )
    return patches_uint8.permute(0, 3, 1, 2) if shape[3] == 3 else patches_uint8


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise UserError unless mean and std are 3 numbers each and std is positive."""
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise UserError(
                f"{name}: expected 3 values (one per RGB channel), found {len(values)}; "
                f"pass the model's preprocessing {name}, e.g. from its run folder"
            )
    if min(std) <= 0:
        raise UserError(
            f"std: expected 3 positive values, found {tuple(std)}; pass the model's preprocessing "
            f"std (e.g. (0.229, 0.224, 0.225) for ImageNet weights)"
        )


def _normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(images - mean) / std per channel, returned in channels_last memory format. images: (N, 3, H, W)."""
    scale = _constant(tuple(1 / s for s in std), images.dtype, images.device)
    shift = _constant(tuple(-m / s for m, s in zip(mean, std)), images.dtype, images.device)
    # One pass that normalises and writes channels_last, instead of two in-place
    # passes and a layout copy.
    normalised = torch.empty_like(images, memory_format=torch.channels_last)
    return torch.addcmul(shift.view(1, 3, 1, 1), images, scale.view(1, 3, 1, 1), out=normalised)
