"""What both classes share: stroma (eosin), normal nuclei (haematoxylin), white gaps.

Nothing here depends on the label, so none of it tells the classes apart.
"""

from __future__ import annotations

import numpy as np

from ..decode import PATCH_SIZE_PX
from .noise import _per_patch, _smooth_noise
from .stamps import _nucleus_stamps, _scatter_stamps


def _draw_stroma_eosin(rng: np.random.Generator, n_patches: int) -> np.ndarray:
    """Eosin density (n, 96, 96) of stroma: blotchy and fine texture, wavy fibres, grain."""
    size = PATCH_SIZE_PX
    pixels = np.arange(size, dtype=np.float32)
    eosin_base = _per_patch(rng, n_patches, 0.3, 1.0)
    eosin = _smooth_noise(rng, 0.22 * eosin_base, cells=6)
    eosin += _smooth_noise(rng, 0.10 * eosin_base, cells=20)
    eosin += eosin_base
    # Fibres: a sine along a random direction, its phase warped by smooth noise,
    # cubed to thin the crests, stronger in some regions than in others.
    fibre_angle = _per_patch(rng, n_patches, 0.0, np.pi)
    wavenumber = 2 * np.pi / _per_patch(rng, n_patches, 4.0, 9.0)  # radians per pixel
    fibre = _smooth_noise(rng, np.full((n_patches, 1, 1), 5.0, dtype=np.float32), cells=4)
    fibre += wavenumber * np.cos(fibre_angle) * pixels[None, None, :]  # (n, 1, 96)
    fibre += wavenumber * np.sin(fibre_angle) * pixels[None, :, None]  # (n, 96, 1)
    np.sin(fibre, out=fibre)
    fibre_strength = _per_patch(rng, n_patches, 0.0, 0.3)
    strength = _smooth_noise(rng, 0.4 * fibre_strength, cells=3)
    strength += 0.6 * fibre_strength
    # x*x*x, not x**3: pow on negative float32 took 0.18 s instead of 0.005 s per chunk.
    cubed = fibre * fibre
    cubed *= fibre
    cubed *= strength
    cubed += 1.0
    eosin *= cubed
    # Per-pixel grain, like the granular look of scanned stroma.
    grain = rng.random((n_patches, size, size), dtype=np.float32)
    grain *= 0.3
    grain += 0.85
    eosin *= grain
    return np.maximum(eosin, 0.0, out=eosin)


def _draw_normal_nuclei(rng: np.random.Generator, n_patches: int) -> np.ndarray:
    """Haematoxylin density (n, 96, 96) of everything but tumour, the same in both classes.

    Small round nuclei (lymphocytes, stromal cells) spread evenly, in some patches a
    dense lymphocyte aggregate anywhere, the centre included (so darkness alone is
    not the label), and diffuse haematoxylin between them (cytoplasm, out-of-focus
    nuclei): lymph node tissue is purple more than pink, and how much so varies.
    """
    size = PATCH_SIZE_PX
    scattered_per_patch = rng.poisson(rng.uniform(10, 110, size=n_patches))
    aggregate_per_patch = rng.integers(15, 45, size=n_patches) * (rng.random(n_patches) < 0.3)
    patch_of_scattered = np.repeat(np.arange(n_patches), scattered_per_patch)
    patch_of_aggregate = np.repeat(np.arange(n_patches), aggregate_per_patch)
    aggregate_row_px, aggregate_col_px = rng.uniform(0, size, size=(2, n_patches))
    n_scattered, n_aggregate = len(patch_of_scattered), len(patch_of_aggregate)
    k = n_scattered + n_aggregate
    stamps = _nucleus_stamps(rng, 128, window_px=4, radius_px=(1.8, 3.0), elongation=(0.0, 0.2))
    haematoxylin = _scatter_stamps(
        stamps,
        n_patches,
        patch_of_nucleus=np.concatenate([patch_of_scattered, patch_of_aggregate]),
        stamp_of_nucleus=rng.integers(0, len(stamps), k),
        row_px=np.concatenate(
            [
                rng.integers(-3, size + 3, n_scattered),
                np.rint(aggregate_row_px[patch_of_aggregate] + rng.normal(0, 7, n_aggregate)),
            ]
        ),
        col_px=np.concatenate(
            [
                rng.integers(-3, size + 3, n_scattered),
                np.rint(aggregate_col_px[patch_of_aggregate] + rng.normal(0, 7, n_aggregate)),
            ]
        ),
        density=rng.uniform(0.7, 1.2, k).astype(np.float32),
    )
    diffuse_base = _per_patch(rng, n_patches, 0.0, 0.35)
    haematoxylin += _smooth_noise(rng, 0.4 * diffuse_base, cells=8)
    haematoxylin += diffuse_base
    return np.maximum(haematoxylin, 0.0, out=haematoxylin)


def _draw_tissue(rng: np.random.Generator, n_patches: int) -> np.ndarray:
    """Fraction of tissue (n, 96, 96) in [0, 1]; 0 in white gaps (fat, vessels, tears).

    Gaps are where smooth noise exceeds a per-patch threshold, covering from almost
    nothing to about a third of a patch: tissue = 1 - sigmoid(4 (noise - threshold)),
    written as 1 / (1 + exp(.)) so that exp can only overflow to inf, never to nan.
    """
    tissue = _smooth_noise(rng, np.full((n_patches, 1, 1), 4.0, dtype=np.float32), cells=5)
    tissue -= 4.0 * _per_patch(rng, n_patches, 0.4, 2.6)
    np.exp(tissue, out=tissue)
    tissue += 1.0
    return np.reciprocal(tissue, out=tissue)
