"""Stain densities to RGB by Beer-Lambert absorption, with per-patch stain jitter."""

from __future__ import annotations

import numpy as np

from .noise import _per_patch

# Optical density per unit of stain, in R, G, B order: haematoxylin from Ruifrok &
# Johnston 2001 ("Quantification of histochemical staining by color deconvolution");
# eosin from Macenko et al. 2009's reference, whose extra blue absorption gives the
# pink of scanned slides rather than Ruifrok's magenta.
_HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_EOSIN_OD = np.array([0.216, 0.801, 0.558], dtype=np.float32)


def _stain(rng: np.random.Generator, haematoxylin: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """Stain densities (n, 96, 96) -> RGB (n, 96, 96, 3) uint8: white * exp(-optical density).

    Stain vectors, stain amounts and the scanner's white all vary per patch. One
    channel at a time keeps the float32 working set to two planes.
    """
    n_patches = len(haematoxylin)
    h_od = _jitter_stain(rng, _HAEMATOXYLIN_OD, n_patches) * _per_patch(rng, n_patches, 0.6, 1.5)[..., None]
    e_od = _jitter_stain(rng, _EOSIN_OD, n_patches) * _per_patch(rng, n_patches, 0.5, 1.5)[..., None]
    white = np.minimum(
        rng.uniform(215, 249, size=(n_patches, 1, 1, 1)) + rng.uniform(-6, 6, size=(n_patches, 1, 1, 3)),
        255,
    ).astype(np.float32)
    patches_uint8 = np.empty((*haematoxylin.shape, 3), dtype=np.uint8)
    channel = np.empty_like(haematoxylin)
    eosin_part = np.empty_like(eosin)
    for c in range(3):
        np.multiply(haematoxylin, -h_od[..., c], out=channel)
        np.multiply(eosin, e_od[..., c], out=eosin_part)
        channel -= eosin_part
        np.exp(channel, out=channel)
        channel *= white[..., c]
        # Densities are >= 0, so values lie in [0, 255]; the cast truncates.
        patches_uint8[..., c] = channel
    return patches_uint8


def _jitter_stain(rng: np.random.Generator, od: np.ndarray, n_patches: int) -> np.ndarray:
    """Per-patch unit stain vectors near `od` (3,); returns (n_patches, 1, 1, 3) float32."""
    vectors = np.abs(od + rng.normal(0, 0.06, size=(n_patches, 1, 1, 3)))
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors.astype(np.float32)
