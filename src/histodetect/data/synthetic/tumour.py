"""The label's evidence: tumour clusters drawn inside PCam's centre 32x32."""

from __future__ import annotations

import numpy as np

from ..decode import PATCH_SIZE_PX
from .stamps import _nucleus_stamps, _scatter_stamps, _stamp_reach_px

CENTRE_START_PX = 32  # PCam labels the centre 32x32: pixels 32..63 on both axes
CENTRE_SIZE_PX = 32


def _draw_tumour(rng: np.random.Generator, n_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """Tumour clusters for `n_patches` positives: (haematoxylin, haze), each (n, 96, 96).

    Large, dark, irregular nuclei bunched around a point near the patch centre, each
    clipped to lie wholly inside the centre 32x32, so that the label's evidence is
    where PCam's definition puts it; haze is the cluster's cytoplasm, also inside.
    """
    size = PATCH_SIZE_PX
    centre_px = CENTRE_START_PX + CENTRE_SIZE_PX / 2 - 0.5
    cluster_y_px = centre_px + rng.normal(0, 3, n_patches)
    cluster_x_px = centre_px + rng.normal(0, 3, n_patches)
    nuclei_per_patch = rng.integers(5, 12, size=n_patches)
    owner = np.repeat(np.arange(n_patches), nuclei_per_patch)
    k = len(owner)
    stamps = _nucleus_stamps(
        rng, 64, window_px=9, radius_px=(3.6, 5.4), elongation=(0.05, 0.3), lobes=(0.08, 0.22)
    )
    stamp_of_nucleus = rng.integers(0, len(stamps), k)
    reach_px = _stamp_reach_px(stamps)[stamp_of_nucleus]
    low_px = CENTRE_START_PX + reach_px
    high_px = CENTRE_START_PX + CENTRE_SIZE_PX - 1 - reach_px
    haematoxylin = _scatter_stamps(
        stamps,
        n_patches,
        patch_of_nucleus=owner,
        stamp_of_nucleus=stamp_of_nucleus,
        row_px=np.clip(np.rint(cluster_y_px[owner] + rng.normal(0, 6, k)), low_px, high_px),
        col_px=np.clip(np.rint(cluster_x_px[owner] + rng.normal(0, 6, k)), low_px, high_px),
        density=rng.uniform(1.4, 2.0, k).astype(np.float32),
    )
    # A Gaussian bump times a window that falls to 0 at the centre square's edges;
    # both separable, so the (n, 96, 96) haze is one outer product.
    pixels = np.arange(size, dtype=np.float32)
    first, last = CENTRE_START_PX, CENTRE_START_PX + CENTRE_SIZE_PX - 1
    window = np.clip(np.minimum(pixels - first, last - pixels) / 4.0, 0.0, 1.0)

    def bump(cluster_px: np.ndarray) -> np.ndarray:
        offset = pixels[None, :] - cluster_px[:, None].astype(np.float32)
        return np.exp(-0.5 * (offset / 7.0) ** 2) * window  # (n, 96)

    haze = bump(cluster_y_px)[:, :, None] * bump(cluster_x_px)[:, None, :]
    return haematoxylin, haze
