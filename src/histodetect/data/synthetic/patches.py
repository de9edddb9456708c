"""make_synthetic_patches: labelled patches drawn chunk by chunk from one random stream."""

from __future__ import annotations

import numpy as np

from ...errors import UserError, check_int, check_number
from ..decode import PATCH_SIZE_PX
from .stain import _stain
from .tissue import _draw_normal_nuclei, _draw_stroma_eosin, _draw_tissue
from .tumour import _draw_tumour

_CHUNK_PATCHES = 256  # bounds the float32 working set to a few tens of MB
# Random streams of one seed besides the labelled patches' own (default_rng(seed)).
_UNLABELLED_STREAM = 1
_SLIDE_COORDINATE_STREAM = 2


def make_synthetic_patches(
    n: int, *, seed: int = 0, positive_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` H&E-like patches: (patches_uint8 (n, 96, 96, 3), labels (n,) uint8 0/1).

    Exactly round(n * positive_fraction) patches are positive, in random order.
    The same seed gives the same patches.
    """
    n, seed = check_int("n", n), check_int("--seed", seed)
    positive_fraction = check_number("positive_fraction", positive_fraction)
    if n < 0:
        raise UserError(f"n={n}: expected a non-negative number of patches; pass n >= 0.")
    if seed < 0:
        raise UserError(f"--seed {seed}: expected a non-negative integer; pass e.g. --seed 0.")
    if not 0.0 <= positive_fraction <= 1.0:
        raise UserError(
            f"positive_fraction={positive_fraction}: expected a fraction in [0, 1]; "
            "pass e.g. 0.5 for balanced classes."
        )
    return _draw_labelled_patches(np.random.default_rng(seed), n, positive_fraction)


# Cost is memory traffic: a chunk is ~50 passes over (256, 96, 96) float32 planes,
# so fields are built where possible from small factors (separable ramps and bumps,
# low-rank noise), and big planes are updated in place. Measured: 10,000 patches in
# 6-7 s of CPU time on one core of this project's shared 2-core dev machine while it
# was busy (time.process_time around make_synthetic_patches(10_000)).


def _draw_labelled_patches(
    rng: np.random.Generator, n: int, positive_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """make_synthetic_patches from a given random stream."""
    labels = np.zeros(n, dtype=np.uint8)
    labels[: round(n * positive_fraction)] = 1
    labels = rng.permutation(labels)
    patches_uint8 = np.empty((n, PATCH_SIZE_PX, PATCH_SIZE_PX, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK_PATCHES):
        chunk_labels = labels[start : start + _CHUNK_PATCHES]
        patches_uint8[start : start + len(chunk_labels)] = _draw_patches(rng, chunk_labels)
    return patches_uint8, labels


def _draw_patches(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Draw one chunk of patches for `labels` (B,); returns (B, 96, 96, 3) uint8."""
    n_patches = len(labels)
    eosin = _draw_stroma_eosin(rng, n_patches)
    haematoxylin = _draw_normal_nuclei(rng, n_patches)
    tissue = _draw_tissue(rng, n_patches)
    positive = np.flatnonzero(labels == 1)
    if len(positive):
        tumour_haematoxylin, cluster_haze = _draw_tumour(rng, len(positive))
        # The cluster fills the gaps under it, has faintly purple cytoplasm with
        # less eosin than stroma, and its nuclei lie on top of everything.
        tissue[positive] += cluster_haze * (1.0 - tissue[positive])
        eosin[positive] *= 1.0 - 0.35 * cluster_haze
    haematoxylin *= tissue
    eosin *= tissue
    if len(positive):
        haematoxylin[positive] += tumour_haematoxylin + 0.3 * cluster_haze
    # Overlapping nuclei saturate, as stain does, instead of turning black.
    np.minimum(haematoxylin, 2.2, out=haematoxylin)
    return _stain(rng, haematoxylin, eosin)
