"""Where each output pixel comes from: dihedral symmetries, the shifted crop, rotation and zoom.

Crop shift and dihedral only move pixels, so they are flat index maps that compose
into one gather; rotation and zoom resample the whole patch once with grid_sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .config import AugmentConfig
from .tensors import _randint, _uniform


def random_dihedral(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Apply one of the 8 square symmetries, drawn per image, to each image. images: (N, C, H, W), H == W.

    Works on any dtype; the transforms are those of `dihedral_views`.
    """
    n, _, height_px, width_px = images.shape
    if height_px != width_px:
        raise ValueError(f"random_dihedral needs square images, found {height_px}x{width_px}")
    return _gather_pixels(images, _random_dihedral_index(n, height_px, images, generator), height_px)


def _rotate_and_zoom(
    images: Tensor, window_px: int, rotate_deg: float, scale: float, generator: torch.Generator | None
) -> Tensor:
    """Each image turned by ~U(-rotate_deg, rotate_deg) and zoomed by ~U(1 - scale, 1 + scale) about its centre.

    images: (N, C, H, W) float. Returns the centre window_px square of each
    transformed image, (N, C, window_px, window_px): one bilinear grid_sample
    reads it from the whole patch, so a turned window takes real tissue from the
    patch's margin and mirrors only what lies beyond the patch. Zoom > 1 magnifies.
    """
    n = images.shape[0]
    angle = _uniform((n,), -math.radians(rotate_deg), math.radians(rotate_deg), images, generator)
    zoom = _uniform((n,), 1 - scale, 1 + scale, images, generator)
    return _turned_window(images, window_px, angle, zoom)


def _turned_window(images: Tensor, window_px: int, angle: Tensor, zoom: Tensor) -> Tensor:
    """The centre window_px square of each image turned by angle (radians, (N,)) and zoomed by zoom ((N,))."""
    n, _, height_px, width_px = images.shape
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output coordinates in [-1, 1] (the window) to input ones (the
    # patch). In pixels about the centre, input = rotation @ output / zoom; the
    # window / side factors convert between the two normalised scales.
    along_x = window_px / (width_px * zoom)
    along_y = window_px / (height_px * zoom)
    # The window turns about the centre of the whole-pixel centre crop (_centre_crop,
    # the test-time views), half a pixel off the patch's centre when 96 - window is odd.
    to_x = torch.full_like(angle, ((width_px - window_px) // 2 + window_px / 2 - width_px / 2) * 2 / width_px)
    to_y = torch.full_like(angle, ((height_px - window_px) // 2 + window_px / 2 - height_px / 2) * 2 / height_px)
    theta = torch.stack(
        [torch.stack([cos * along_x, -sin * along_x, to_x], dim=-1),
         torch.stack([sin * along_y, cos * along_y, to_y], dim=-1)],
        dim=-2,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, images.shape[1], window_px, window_px], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _dihedral(images: Tensor, k: int) -> Tensor:
    """The k-th square symmetry (0 <= k < 8): rotate by (k % 4) * 90 degrees, then mirror if k >= 4."""
    rotated = torch.rot90(images, k % 4, dims=(-2, -1))
    return rotated.flip(-1) if k >= 4 else rotated


def _random_dihedral_index(
    n: int, size_px: int, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """(n, size_px**2) flat source pixel of each output pixel, for one random symmetry per image.

    A gather with these indices beat the alternatives on 2 busy CPU cores for 256
    patches of 3x96x96 (uint8 / float32): 42 / 38 ms, against 124-137 / 172 ms for
    three torch.where passes (transpose, flip, flip), 282-424 / 46 ms for grouping
    the batch by symmetry and 281-416 / 736 ms for stacking all 8 views and picking
    one (benchmarks/augment_speed.py).
    """
    pixel_index = torch.arange(size_px * size_px, device=like.device).view(1, 1, size_px, size_px)
    index_by_view = torch.stack([_dihedral(pixel_index, k).flatten() for k in range(8)])  # (8, size**2)
    return index_by_view[_randint(8, (n,), like, generator)]


def _shifted_crop_index(
    n: int, crop_px: int, window_px: int, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """(n, crop_px**2) flat index into a window_px square of a crop_px square placed at random per image."""
    offset_yx = _randint(window_px - crop_px + 1, (n, 2, 1), like, generator)  # top-left corner
    steps = torch.arange(crop_px, device=like.device)
    rows = offset_yx[:, 0] + steps  # (n, crop)
    cols = offset_yx[:, 1] + steps
    return (rows[:, :, None] * window_px + cols[:, None, :]).flatten(1)


def _spatial_source_index(
    config: AugmentConfig,
    n: int,
    out_px: int,
    window_px: int,
    like: Tensor,
    generator: torch.Generator | None,
) -> Tensor | None:
    """Flat index into the crop window of each output pixel after shift and dihedral, or None if neither is on."""
    index = None
    if config.shift_px:
        index = _shifted_crop_index(n, out_px, window_px, like, generator)
    if config.dihedral:
        dihedral_index = _random_dihedral_index(n, out_px, like, generator)
        # Output pixel p shows crop pixel dihedral_index[p], which sits at index[...] in the window.
        index = dihedral_index if index is None else index.gather(1, dihedral_index)
    return index


def _gather_pixels(images: Tensor, source_index: Tensor, out_px: int) -> Tensor:
    """Pick pixels per image: images (N, C, H, W), source_index (N, out_px**2) into H*W -> (N, C, out_px, out_px)."""
    n, channels = images.shape[:2]
    flat = images.reshape(n, channels, -1)
    picked = flat.gather(2, source_index[:, None, :].expand(n, channels, -1))
    return picked.view(n, channels, out_px, out_px)


def _centre_crop(images: Tensor, size_px: int) -> Tensor:
    """The centre size_px x size_px of each image (a view). images: (N, C, H, W)."""
    top = (images.shape[-2] - size_px) // 2
    left = (images.shape[-1] - size_px) // 2
    return images[..., top : top + size_px, left : left + size_px]


def _crop_window_px(config: AugmentConfig, nchw_shape: torch.Size) -> int:
    """Side of the square centre window the crop (and its shift) may read from."""
    height_px, width_px = nchw_shape[-2:]
    if not config.crop_px:
        turned = [name for name in ("dihedral", "rotate_deg", "scale") if getattr(config, name)]
        if turned and height_px != width_px:
            raise UserError(
                f"patches_uint8: {' and '.join(turned)} augmentation needs square patches, found "
                f"{height_px}x{width_px}; set crop_px to crop a square, or turn {' and '.join(turned)} off"
            )
        return height_px
    window_px = config.crop_px + 2 * config.shift_px
    if window_px > min(height_px, width_px):
        raise UserError(
            f"augment crop_px={config.crop_px}, shift_px={config.shift_px}: the crop reads a "
            f"{window_px}-pixel window, but the patches are {height_px}x{width_px}; "
            f"choose crop_px + 2 * shift_px <= {min(height_px, width_px)}"
        )
    return window_px
