"""Colour augmentation: H&E stain jitter in optical density, and brightness, contrast, saturation and hue.

Both are one per-image 3x3 map of the channels plus an offset (`_mix_channels`): the
stain jitter on log intensities, the colour jitter on intensities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .tensors import _constant, _uniform

# Ruifrok & Johnston (2001) H&E-DAB stain vectors in optical density, one row per
# stain, as skimage.color.rgb2hed has them.
_RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
# Inverted once here on the CPU: torch.linalg.inv on a GPU checks for errors with a
# host sync, which would stall every batch.
_HED_FROM_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB_FROM_HED, dtype=torch.float64)).tolist()))
# Intensities are floored here before the log, as rgb2hed does, so black stays finite.
_RGB_FLOOR = 1e-6
# ITU-R BT.601 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# NTSC RGB -> YIQ; the I and Q rows sum to zero, so greys stay grey under a hue turn.
_YIQ_FROM_RGB = (_LUMA_WEIGHTS, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_RGB_FROM_YIQ = tuple(map(tuple, torch.linalg.inv(torch.tensor(_YIQ_FROM_RGB, dtype=torch.float64)).tolist()))


def hed_jitter(
    images: Tensor, sigma: float, bias: float, generator: torch.Generator | None = None
) -> Tensor:
    """Jitter H&E stain amounts per image (Tellez et al. 2018, 2019). images: (N, 3, H, W) float in [0, 1].

    Pixels go to optical density, -ln(rgb), and are split into haematoxylin, eosin
    and DAB with skimage's rgb2hed stain matrix; each image's stains are scaled by
    alpha ~ U(1 - sigma, 1 + sigma) and shifted by beta ~ U(-bias, bias), drawn per
    image and stain, then mapped back to RGB and clamped to [0, 1].

    beta is in natural-log optical density. skimage's current rgb2hed divides that
    by ln(1e6) ~ 13.8, so bias 0.05 here is 0.0036 of its units; Tellez et al. used
    an older rgb2hed with yet another scale, so their strengths (0.05 for
    "HED-light", 0.2 for "HED-strong") are a starting point, not an equivalence.
    """
    n = images.shape[0]
    alpha = _uniform((n, 3), 1 - sigma, 1 + sigma, images, generator)
    beta = _uniform((n, 3), -bias, bias, images, generator)
    rgb_from_hed = _constant(_RGB_FROM_HED, torch.float64, images.device)
    hed_from_rgb = _constant(_HED_FROM_RGB, torch.float64, images.device)
    # rgb2hed works on row vectors: stains = od @ hed_from_rgb, od = stains @ rgb_from_hed.
    # Scaling the stains and going back is one 3x3 map of the optical density per
    # image. Written as I + (alpha - 1) terms it is exactly I when alpha == 1, so at
    # zero strength only the log/exp round trip remains.
    od_change = hed_from_rgb @ torch.diag_embed(alpha.double() - 1) @ rgb_from_hed  # (N, 3, 3)
    od_matrix = torch.eye(3, dtype=torch.float64, device=images.device) + od_change
    od_offset = beta.double() @ rgb_from_hed  # (N, 3)
    # log(rgb) = -od, so the same map applies to log(rgb) with the offset negated.
    log_rgb = _mix_channels(
        torch.log(images.clamp_min(_RGB_FLOOR)),
        od_matrix.mT.to(images.dtype),  # row-vector map -> column-vector map
        (-od_offset).to(images.dtype),
    )
    return torch.exp(log_rgb).clamp_(max=1.0)  # exp is already > 0


def color_jitter(
    images: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Jitter brightness, contrast, saturation and hue per image. images: (N, 3, H, W) float in [0, 1].

    Factors are drawn per image as in torchvision's ColorJitter: brightness,
    contrast and saturation ~ U(max(0, 1 - s), 1 + s), hue turn ~ U(-hue, hue) of
    the colour wheel (hue <= 0.5). Applied in that order, clamped to [0, 1] once at
    the end.
    """
    n = images.shape[0]
    brightness_factor = _uniform((n,), max(0.0, 1 - brightness), 1 + brightness, images, generator)
    contrast_factor = _uniform((n,), max(0.0, 1 - contrast), 1 + contrast, images, generator)
    saturation_factor = _uniform((n,), max(0.0, 1 - saturation), 1 + saturation, images, generator)
    hue_turn = _uniform((n,), -hue, hue, images, generator)
    luma = _constant(_LUMA_WEIGHTS, images.dtype, images.device)
    # All four are linear in the pixel (contrast adds a per-image constant), so they
    # compose into one 3x3 matrix and one offset per image: a single pass over the
    # pixels instead of four, at the price of torchvision's clamp between steps.
    # Brightness and contrast scale every channel; saturation blends towards luma.
    eye = torch.eye(3, dtype=images.dtype, device=images.device)
    saturate = (
        saturation_factor[:, None, None] * eye
        + (1 - saturation_factor)[:, None, None] * luma.expand(3, 3)
    )  # (N, 3, 3); rows of luma.expand(3, 3) make every channel the luma
    matrix = (brightness_factor * contrast_factor)[:, None, None] * _hue_rotation(hue_turn) @ saturate
    # Contrast blends towards the image's mean luma (torchvision's definition), taken
    # after brightness; saturation and the hue turn leave grey unchanged.
    mean_luma = images.mean(dim=(2, 3)) @ luma  # (N,)
    offset = ((1 - contrast_factor) * brightness_factor * mean_luma)[:, None].expand(n, 3)
    return _mix_channels(images, matrix, offset).clamp_(0.0, 1.0)


def _hue_rotation(hue_turn: Tensor) -> Tensor:
    """(N, 3, 3) RGB matrices that turn chroma by hue_turn (fractions of a circle) around the grey axis.

    A rotation of the I-Q plane of YIQ rather than an HSV hue shift: it is linear,
    so it fuses with the other colour factors into one matrix, where HSV needs a
    per-pixel branchy conversion both ways; it also keeps luma fixed. For the small
    turns used in training the two look alike. Written as I + (change) so a zero
    turn is exactly the identity.
    """
    yiq_from_rgb = _constant(_YIQ_FROM_RGB, torch.float64, hue_turn.device)
    rgb_from_yiq = _constant(_RGB_FROM_YIQ, torch.float64, hue_turn.device)
    angle = 2 * math.pi * hue_turn.double()
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    # Rotation of (I, Q) minus the identity; the Y row and column stay zero.
    rotation_change = torch.stack(
        [
            torch.stack([zero, zero, zero], dim=-1),
            torch.stack([zero, cos - 1, -sin], dim=-1),
            torch.stack([zero, sin, cos - 1], dim=-1),
        ],
        dim=-2,
    )  # (N, 3, 3)
    change = rgb_from_yiq @ rotation_change @ yiq_from_rgb
    return (torch.eye(3, dtype=torch.float64, device=hue_turn.device) + change).to(hue_turn.dtype)


def _mix_channels(images: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """Per-image affine map of the channels: out[n, i] = sum_j matrix[n, i, j] * images[n, j] + offset[n, i]."""
    return torch.einsum("nij,njhw->nihw", matrix, images) + offset[:, :, None, None]
