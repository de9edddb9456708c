"""Batched augmentation on the device: dihedral symmetries, rotation and zoom, stain and colour jitter.

Training keeps patches as uint8 until they reach the device and calls
`augment_batch` once per batch; evaluation and prediction call `preprocess_batch`,
which is the same path with every augmentation off. Every function takes tensors
and returns tensors on the input's device; randomness comes from an optional
`torch.Generator`, so a seed reproduces a run.

The package, in the order imports flow:

    tensors.py     cached constants and random draws on the batch's device
    config.py      AugmentConfig: what augment_batch does, checked where it is made
    geometry.py    dihedral symmetries, the shifted crop, rotation and zoom
    colour.py      HED stain jitter; brightness, contrast, saturation and hue
    blur_noise.py  Gaussian blur and noise (focus and scanner)
    batch.py       augment_batch, preprocess_batch, mixup_batch
    views.py       test-time views: dihedral views of the centre and shifted crops
"""

from __future__ import annotations

from .batch import augment_batch, mixup_batch, preprocess_batch
from .blur_noise import check_blur_fits, gaussian_blur, gaussian_noise
from .colour import color_jitter, hed_jitter
from .config import AugmentConfig
from .geometry import _dihedral as _dihedral
from .geometry import _turned_window as _turned_window
from .geometry import random_dihedral
from .tensors import _constant as _constant
from .views import (
    DIHEDRAL_VIEW_COUNTS,
    TTA_VIEW_COUNTS,
    check_tta,
    dihedral_views,
    tta_crop_offsets,
    tta_view_counts,
    tta_view_groups,
)

# The private names above (`name as name`) are re-exported for the tests and
# benchmarks that reach into them.
__all__ = [
    "DIHEDRAL_VIEW_COUNTS", "TTA_VIEW_COUNTS", "AugmentConfig", "augment_batch", "check_blur_fits", "check_tta",
    "color_jitter", "dihedral_views", "gaussian_blur", "gaussian_noise", "hed_jitter", "mixup_batch",
    "preprocess_batch", "random_dihedral", "tta_crop_offsets", "tta_view_counts", "tta_view_groups",
]
