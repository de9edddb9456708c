"""Test-time views: dihedral views of the centre crop and of crops moved by the training shift.

`tta_view_groups` preprocesses a uint8 batch (`preprocess_batch`) and yields its
views one crop at a time; the other functions name the view counts a run can use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import UserError, check_int
from .batch import preprocess_batch
from .geometry import _dihedral

# Test-time views per patch (`tta_view_groups`): 1, 4 or 8 dihedral views of the centre
# crop; 40 and 72 add the 8 dihedral views of 4 and 8 crops moved by the run's shift_px.
TTA_VIEW_COUNTS = (1, 4, 8, 40, 72)
DIHEDRAL_VIEW_COUNTS = (1, 4, 8)


def dihedral_views(images: Tensor, n_views: int = 8) -> Tensor:
    """Stack symmetric views of a batch for test-time augmentation. images: (N, C, H, W), H == W.

    Returns (n_views, N, C, H, W): view k is a counterclockwise rotation by
    (k % 4) * 90 degrees, mirrored left-right when k >= 4. n_views 1 is the input
    alone, 4 the four rotations, 8 the whole group. Average the model's predictions
    over the first axis: `model(views.flatten(0, 1)).view(n_views, N, -1).mean(0)`.
    """
    if n_views not in DIHEDRAL_VIEW_COUNTS:
        raise UserError(
            f"n_views: expected one of {DIHEDRAL_VIEW_COUNTS} dihedral views, found {n_views}; "
            f"use 1 (none), 4 (rotations) or 8 (rotations and mirrors)"
        )
    return torch.stack([_dihedral(images, k) for k in range(n_views)])


def tta_crop_offsets(n_views: int, shift_px: int) -> list[tuple[int, int]]:
    """(down, right) offsets from the centre of the crops that `n_views` test-time views read.

    1, 4 and 8 views read the centre crop; 40 add the crops moved by `shift_px` up,
    down, left and right; 72 add the four diagonal moves too: the corners and edge
    midpoints of the square a training crop's centre wanders over (`shift_px`).
    """
    # A str "8" read as --tta 8 in the message, and True was 1 view.
    if check_int("--tta", n_views) not in TTA_VIEW_COUNTS:
        raise UserError(f"--tta {n_views}: expected one of {', '.join(map(str, TTA_VIEW_COUNTS))}")
    s = shift_px
    offsets = [(0, 0)]
    if n_views >= 40:
        offsets += [(-s, 0), (s, 0), (0, -s), (0, s)]
    if n_views >= 72:
        offsets += [(-s, -s), (-s, s), (s, -s), (s, s)]
    return offsets


def tta_view_counts(crop_px: int, shift_px: int) -> tuple[int, ...]:
    """The test-time view counts a model trained on this crop can use: 40 and 72 need a shifted crop."""
    return TTA_VIEW_COUNTS if crop_px and shift_px else DIHEDRAL_VIEW_COUNTS


def check_tta(n_views: int, crop_px: int, shift_px: int, source: str) -> None:
    """Raise UserError unless `n_views` test-time views can be made for a model trained on this crop.

    40 and 72 views move the crop by the training shift, so they need one (`source`
    names the run or export in the message).
    """
    tta_crop_offsets(n_views, shift_px)  # names an unknown count
    if n_views not in tta_view_counts(crop_px, shift_px):
        raise UserError(
            f"--tta {n_views}: {source} was trained without a shifted crop (crop_px {crop_px}, "
            f"shift_px {shift_px}), and 40 or 72 views read crops moved by that shift; use --tta 8"
        )


def tta_view_groups(
    patches_uint8: Tensor, n_views: int, mean: Sequence[float], std: Sequence[float],
    crop_px: int = 0, shift_px: int = 0,
) -> Iterator[Tensor]:
    """The `n_views` test-time views of a uint8 batch, preprocessed, one crop at a time.

    Yields (V, N, 3, crop, crop) float32 stacks: first `dihedral_views` of the centre
    crop (V = min(n_views, 8); the values `preprocess_batch` gives), then for
    40 and 72 views the 8 dihedral views of each moved crop (`tta_crop_offsets`).
    Concatenated they are the views in order, and each view count's views are the
    first n of 72's, so one 72-view pass holds every smaller TTA. One crop at a time
    keeps memory at 8 views' worth of the batch.
    """
    offsets = tta_crop_offsets(n_views, shift_px)
    if len(offsets) == 1:
        yield dihedral_views(preprocess_batch(patches_uint8, mean, std, crop_px=crop_px), n_views)
        return
    check_tta(n_views, crop_px, shift_px, "the model")
    # Normalised once, whole; every crop is a slice of it (normalising is per pixel).
    whole = preprocess_batch(patches_uint8, mean, std)
    top, left = (whole.shape[-2] - crop_px) // 2, (whole.shape[-1] - crop_px) // 2
    if min(top, left) < shift_px:
        raise UserError(
            f"--tta {n_views}: crops of {crop_px} px moved by {shift_px} px do not fit in "
            f"{whole.shape[-2]}x{whole.shape[-1]} px patches; use --tta 8"
        )
    for down, right in offsets:
        window = whole[..., top + down : top + down + crop_px, left + right : left + right + crop_px]
        yield dihedral_views(window, 8)
