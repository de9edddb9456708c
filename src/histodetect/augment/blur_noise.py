"""Focus and scanner noise (Tellez et al. 2019's "morphology" group): Gaussian blur and Gaussian noise per image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .tensors import _draw_device, _uniform


def check_blur_fits(max_sigma: float, size_px: int) -> int:
    """The blur kernel's radius, ceil(3 * max_sigma); UserError unless it fits `size_px` images (mirrored edges)."""
    radius = math.ceil(3 * max_sigma)
    if radius >= size_px:
        raise UserError(
            f"--blur-sigma {max_sigma}: the {2 * radius + 1}-pixel kernel does not fit "
            f"{size_px}x{size_px} images; use a smaller --blur-sigma"
        )
    return radius


def gaussian_blur(images: Tensor, max_sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Blur each image with its own Gaussian, sigma ~ U(0, max_sigma) pixels. images: (N, 3, H, W) float.

    Separable: one horizontal and one vertical pass of a (2r + 1)-tap kernel,
    r = ceil(3 * max_sigma), as grouped convolutions over all N * 3 channels at once;
    edges are mirrored. sigma 0 is the identity (the kernel is a unit impulse).
    """
    n, c, h, w = images.shape
    radius = check_blur_fits(max_sigma, min(h, w))
    sigma = _uniform((n,), 0.0, max_sigma, images, generator).clamp_min(1e-3)  # (N,); 1e-3 px is an impulse
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)  # (N, 2r + 1)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N * 3, 2r + 1)
    flat = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)  # along each row
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)  # along each column
    return flat.reshape(n, c, h, w).clamp_(0.0, 1.0)


def gaussian_noise(images: Tensor, max_std: float, generator: torch.Generator | None = None) -> Tensor:
    """Add per-pixel Gaussian noise, standard deviation ~ U(0, max_std) per image, clamped to [0, 1].

    images: (N, 3, H, W) float in [0, 1]. The noise is drawn on the generator's
    device, so give a generator on the images' device for GPU batches.
    """
    std = _uniform((images.shape[0], 1, 1, 1), 0.0, max_std, images, generator)
    noise = torch.randn(images.shape, generator=generator, device=_draw_device(images, generator))
    return (images + std * noise.to(device=images.device, dtype=images.dtype)).clamp_(0.0, 1.0)
