"""Nuclei as stamps: a bank of nucleus images, copied into patches with one bincount."""

from __future__ import annotations

import numpy as np

from ..decode import PATCH_SIZE_PX


def _nucleus_stamps(
    rng: np.random.Generator,
    n_stamps: int,
    *,
    window_px: int,
    radius_px: tuple[float, float],
    elongation: tuple[float, float],
    lobes: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """A bank of nucleus images (n_stamps, 2 window_px + 1, 2 window_px + 1), values in [0, 1].

    The outline is r(a) = radius * (1 + elongation cos 2(a - a2) + lobes cos 3(a - a3)):
    elongation makes ovals, lobes the irregular outlines of tumour nuclei. Each stamp has
    a random sub-pixel offset and a grainy chromatin texture. Nuclei are copies of stamps,
    so the trigonometry runs once per stamp, not once per nucleus.
    """

    def draw(low_high: tuple[float, float]) -> np.ndarray:
        return rng.uniform(*low_high, size=(n_stamps, 1, 1)).astype(np.float32)

    offsets = np.arange(-window_px, window_px + 1, dtype=np.float32)
    dy = offsets[None, :, None] - draw((-0.5, 0.5))
    dx = offsets[None, None, :] - draw((-0.5, 0.5))
    angle = np.arctan2(dy, dx)
    outline_px = draw(radius_px) * (
        1.0
        + draw(elongation) * np.cos(2 * (angle - draw((0, np.pi))))
        + draw(lobes) * np.cos(3 * (angle - draw((0, np.pi))))
    )
    inside = np.clip(outline_px - np.hypot(dy, dx) + 0.5, 0.0, 1.0)  # 1-pixel soft edge
    chromatin = 0.7 + 0.3 * rng.random(inside.shape, dtype=np.float32)
    return inside * chromatin


def _stamp_reach_px(stamps: np.ndarray) -> np.ndarray:
    """Per stamp, how far (in pixels, Chebyshev) its non-zero pixels reach from its centre."""
    half = stamps.shape[1] // 2
    offsets = np.abs(np.arange(-half, half + 1))
    chebyshev = np.maximum(offsets[:, None], offsets[None, :])
    return np.where(stamps > 0, chebyshev, 0).max(axis=(1, 2))


def _scatter_stamps(
    stamps: np.ndarray,
    n_patches: int,
    *,
    patch_of_nucleus: np.ndarray,
    stamp_of_nucleus: np.ndarray,
    row_px: np.ndarray,
    col_px: np.ndarray,
    density: np.ndarray,
) -> np.ndarray:
    """Sum K stamped nuclei into (n_patches, 96, 96) haematoxylin density.

    Nucleus i is stamps[stamp_of_nucleus[i]] * density[i] centred at (row_px[i], col_px[i])
    of patch patch_of_nucleus[i]; parts falling off the patch are dropped. One bincount
    adds all windows, so the cost is K * stamp area, not K * 96 * 96.
    """
    size = PATCH_SIZE_PX
    half = stamps.shape[1] // 2
    offsets = np.arange(-half, half + 1)
    rows = row_px.astype(np.int64)[:, None] + offsets  # (K, w)
    cols = col_px.astype(np.int64)[:, None] + offsets
    row_start = patch_of_nucleus[:, None] * size * size + np.clip(rows, 0, size - 1) * size
    flat_index = row_start[:, :, None] + np.clip(cols, 0, size - 1)[:, None, :]  # (K, w, w)
    row_weight = density[:, None] * ((rows >= 0) & (rows < size))
    col_weight = ((cols >= 0) & (cols < size)).astype(np.float32)
    weights = stamps[stamp_of_nucleus]
    weights *= row_weight[:, :, None] * col_weight[:, None, :]
    summed = np.bincount(flat_index.ravel(), weights=weights.ravel(), minlength=n_patches * size * size)
    return summed.reshape(n_patches, size, size).astype(np.float32)
