"""Synthetic H&E-like patches for the demo and for fast tests.

These are NOT tissue. They are procedurally drawn pictures that imitate the look
of PatchCamelyon patches (pink eosin stroma with fibres, white gaps, small round
purple nuclei) and, more importantly, its task: a patch is positive when larger,
darker, irregular "tumour" nuclei sit inside the centre 32x32 pixels, and nothing
outside that square tells the classes apart. They are learnable as PCam is: a
4-layer CNN trained for 60 s on one CPU thread (3,000 patches) reached 0.92-0.93
validation accuracy, with 73-78% of its class activation on positives inside the
centre ninth of the patch. Never use them to make a claim about real histopathology.

Colours follow Beer-Lambert absorption, as real stains do: each pixel holds a
haematoxylin and an eosin density, and RGB = background * exp(-optical density),
with per-patch jitter of the stain vectors and intensities so that colour alone
does not give the label away.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import uuid
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from histodetect.data.decode import PATCH_SIZE_PX, patch_sha1
from histodetect.data.formats import FORMATS
from histodetect.data.pcam_h5 import SPLITS as PCAM_SPLITS
from histodetect.errors import UserError

DEFAULT_SPLITS = {
    "pcam_h5": {"train": 0.8, "valid": 0.1, "test": 0.1},
    "folder": {"train": 0.8, "valid": 0.2},
}
CENTRE_START_PX = 32  # PCam labels the centre 32x32: pixels 32..63 on both axes
CENTRE_SIZE_PX = 32

# Optical density per unit of stain, in R, G, B order: haematoxylin from Ruifrok &
# Johnston 2001 ("Quantification of histochemical staining by color deconvolution");
# eosin from Macenko et al. 2009's reference, whose extra blue absorption gives the
# pink of scanned slides rather than Ruifrok's magenta.
_HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_EOSIN_OD = np.array([0.216, 0.801, 0.558], dtype=np.float32)

_CHUNK_PATCHES = 256  # bounds the float32 working set to a few tens of MB
_PATCHES_PER_SLIDE = 12  # invented PCam meta: several patches per slide
_H5_CHUNK_PATCHES = 256  # a batch read of a few hundred patches touches one or two chunks
# Random streams of one seed besides the labelled patches' own (default_rng(seed)).
_UNLABELLED_STREAM = 1
_SLIDE_COORDINATE_STREAM = 2
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def make_synthetic_patches(
    n: int, *, seed: int = 0, positive_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` H&E-like patches: (patches_uint8 (n, 96, 96, 3), labels (n,) uint8 0/1).

    Exactly round(n * positive_fraction) patches are positive, in random order.
    The same seed gives the same patches.
    """
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


def write_synthetic(
    out: Path,
    n: int,
    *,
    format: str = "folder",
    seed: int = 0,
    splits: dict[str, float] | None = None,
    unlabelled: int = 0,
) -> Path:
    """Write `n` labelled synthetic patches to `out` in one of the layouts in `FORMATS`.

    "kaggle": out/train/<sha1>.tif, out/train_labels.csv (id,label) and, when
    unlabelled > 0, out/test/<sha1>.tif. "pcam_h5": out/camelyonpatch_level_2_split_
    {split}_{x,y}.h5 and _meta.csv per split. "folder": out/{split}/{label}/synthNNNNNNN.png.
    Splits map names to fractions (defaults in DEFAULT_SPLITS) and are stratified by
    label. The labelled patches are make_synthetic_patches(n, seed=seed); unlabelled
    ones come from another stream of the same seed. Files go to a temporary sibling
    folder renamed to `out` once complete. Returns `out`.
    """
    out = Path(out)
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: unknown layout; expected one of {', '.join(FORMATS)}.")
    if n < 1:
        raise UserError(f"--n {n}: expected at least 1 patch; pass e.g. --n 1000.")
    if unlabelled < 0:
        raise UserError(f"--unlabelled {unlabelled}: expected a count >= 0; pass 0 for none.")
    if format != "kaggle" and unlabelled > 0:
        raise UserError(
            f"--unlabelled {unlabelled}: only the kaggle layout has unlabelled patches "
            f"(out/test/), found --format {format}; pass --format kaggle or --unlabelled 0."
        )
    if format == "kaggle":
        if splits is not None:
            raise UserError(
                f"splits={splits}: the kaggle layout has no splits (all labelled patches "
                "go to out/train/); drop splits or pass --format folder or pcam_h5."
            )
    else:
        splits = DEFAULT_SPLITS[format] if splits is None else splits
        _check_splits(splits, n, format)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out}: already exists and is not an empty folder; expected a new or empty "
            "folder. Pass another --out or remove it."
        )

    patches_uint8, labels = make_synthetic_patches(n, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same file system, so the final rename is atomic: a reader
    # never sees a half-written data set under `out`.
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        if format == "kaggle":
            unlabelled_uint8, _ = _draw_labelled_patches(
                np.random.default_rng([seed, _UNLABELLED_STREAM]), unlabelled, 0.5
            )
            _write_kaggle(partial, patches_uint8, labels, unlabelled_uint8)
        elif format == "pcam_h5":
            _write_pcam_h5(partial, patches_uint8, labels, _split_indices(labels, splits), seed)
        else:
            _write_folder(partial, patches_uint8, labels, _split_indices(labels, splits))
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


# --- drawing ---------------------------------------------------------------------
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


def _per_patch(rng: np.random.Generator, n_patches: int, low: float, high: float) -> np.ndarray:
    """One uniform draw per patch, (n_patches, 1, 1) float32, to broadcast over pixels."""
    return rng.uniform(low, high, size=(n_patches, 1, 1)).astype(np.float32)


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


def _smooth_noise(rng: np.random.Generator, amplitude: np.ndarray, cells: int) -> np.ndarray:
    """Smooth random fields (n, 96, 96), each pixel ~ N(0, amplitude[i]^2); amplitude (n, 1, 1).

    `cells` is the number of independent values across a side: 3 gives broad blotches,
    20 fine mottling. A grid of random Gaussian bumps, so the field has no seams; it is
    basis @ coefficients @ basis.T, one pass over the output.
    """
    size = PATCH_SIZE_PX
    spacing_px = size / (cells - 1)
    centres_px = np.linspace(-spacing_px, size - 1 + spacing_px, cells + 2)
    offset = (np.arange(size)[:, None] - centres_px[None, :]) / (0.8 * spacing_px)
    basis = np.exp(-0.5 * offset**2)
    # Drop the far tails: as float32 they are denormals, which made the products
    # below 3-7x slower (0.13 s instead of 0.02 s per chunk at cells=20).
    basis[basis < 1e-6] = 0.0
    basis /= np.sqrt((basis**2).sum(axis=1, keepdims=True))  # unit variance per pixel
    basis = basis.astype(np.float32)  # (96, cells + 2)
    coefficients = rng.standard_normal((len(amplitude), cells + 2, cells + 2), dtype=np.float32)
    coefficients *= amplitude
    return (basis @ coefficients) @ basis.T


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


def _jitter_stain(rng: np.random.Generator, od: np.ndarray, n_patches: int) -> np.ndarray:
    """Per-patch unit stain vectors near `od` (3,); returns (n_patches, 1, 1, 3) float32."""
    vectors = np.abs(od + rng.normal(0, 0.06, size=(n_patches, 1, 1, 3)))
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors.astype(np.float32)


# --- layouts ---------------------------------------------------------------------


def _check_splits(splits: dict[str, float], n: int, format: str) -> None:
    """Raise a UserError unless `splits` are usable names with fractions that give every split patches."""
    names = PCAM_SPLITS if format == "pcam_h5" else None
    for name in splits:
        if names is not None and name not in names:
            raise UserError(
                f"splits: {name!r} is not a PCam split; the pcam_h5 layout names its files "
                f"after {', '.join(names)}; use those names."
            )
        if not _SPLIT_NAME.match(name):
            raise UserError(
                f"splits: split name {name!r} is not a plain folder name; use letters, "
                "digits, '_' or '-' (e.g. 'train')."
            )
    fractions = np.array(list(splits.values()), dtype=np.float64)
    if not splits or np.any(fractions <= 0) or abs(fractions.sum() - 1.0) > 1e-6:
        raise UserError(
            f"splits={splits}: expected positive fractions that sum to 1 (found sum "
            f"{fractions.sum():.3g}); pass e.g. {DEFAULT_SPLITS[format]}."
        )
    for name, size in zip(splits, np.diff(_split_bounds(fractions, n))):
        if size == 0:
            raise UserError(
                f"--n {n}: split {name!r} (fraction {splits[name]}) would get no patches; pass a larger --n."
            )


def _split_bounds(fractions: np.ndarray, n: int) -> np.ndarray:
    """Where each split starts and ends in a sequence of n patches: (len(fractions) + 1,)."""
    return np.rint(np.concatenate([[0.0], np.cumsum(fractions)]) * n).astype(int)


def _split_indices(labels: np.ndarray, splits: dict[str, float]) -> dict[str, np.ndarray]:
    """Patch indices per split, in ascending order, each split with both labels in proportion."""
    # Interleave the labels by rank within their class, then cut the sequence by
    # the fractions: every split gets its share of each class.
    rank_in_class = np.empty(len(labels), dtype=np.float64)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        rank_in_class[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.argsort(rank_in_class, kind="stable")
    bounds = _split_bounds(np.array(list(splits.values())), len(labels))
    return {name: np.sort(order[start:stop]) for name, start, stop in zip(splits, bounds[:-1], bounds[1:])}


def _write_kaggle(
    root: Path, patches_uint8: np.ndarray, labels: np.ndarray, unlabelled_uint8: np.ndarray
) -> None:
    """Kaggle competition layout: ids are the SHA-1 of each patch's RGB bytes."""
    (root / "train").mkdir()
    with open(root / "train_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        for patch, label in zip(patches_uint8, labels):
            patch_id = patch_sha1(patch)
            Image.fromarray(patch).save(root / "train" / f"{patch_id}.tif", compression=None)
            writer.writerow([patch_id, int(label)])
    if len(unlabelled_uint8):
        (root / "test").mkdir()
        for patch in unlabelled_uint8:
            Image.fromarray(patch).save(root / "test" / f"{patch_sha1(patch)}.tif", compression=None)


def _write_pcam_h5(
    root: Path,
    patches_uint8: np.ndarray,
    labels: np.ndarray,
    split_indices: dict[str, np.ndarray],
    seed: int,
) -> None:
    """PCam layout: x/y HDF5 files and a meta CSV per split."""
    rng = np.random.default_rng([seed, _SLIDE_COORDINATE_STREAM])
    next_slide_number = {"normal": 1, "tumor": 1, "test": 1}
    for split, indices in split_indices.items():
        stem = root / f"camelyonpatch_level_2_split_{split}"
        n_split = len(indices)
        chunk = min(_H5_CHUNK_PATCHES, n_split)
        with h5py.File(f"{stem}_x.h5", "w") as f:
            f.create_dataset(
                "x",
                data=patches_uint8[indices],
                chunks=(chunk, PATCH_SIZE_PX, PATCH_SIZE_PX, 3),
                compression="gzip",
            )
        with h5py.File(f"{stem}_y.h5", "w") as f:
            f.create_dataset(
                "y",
                data=labels[indices].reshape(n_split, 1, 1, 1),
                chunks=(chunk, 1, 1, 1),
                compression="gzip",
            )
        slides = _invent_slides(split, labels[indices], next_slide_number)
        with open(f"{stem}_meta.csv", "w", newline="") as f:
            writer = csv.writer(f)
            # PCam's meta files are pandas exports: an unnamed index column first.
            writer.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
            slide_origin_px = {
                slide: rng.integers(20_000, 180_000, size=2) for slide in dict.fromkeys(slides)
            }
            for row, (label, slide) in enumerate(zip(labels[indices], slides)):
                coord_y, coord_x = slide_origin_px[slide] + rng.integers(-4_000, 4_000, size=2)
                # Synthetic negatives carry no tumour anywhere, so both flags equal the label.
                tumour = str(bool(label))
                writer.writerow([row, int(coord_y), int(coord_x), tumour, tumour, slide])


def _invent_slides(split: str, labels: np.ndarray, next_slide_number: dict[str, int]) -> list[str]:
    """Camelyon16-style slide names for one split's patches, several patches per slide.

    Positives come from tumour slides (which also hold a few negatives), the other
    negatives from normal slides. Numbers continue across splits via `next_slide_number`,
    so no slide is shared between splits, as in PCam. PCam's test split comes from
    Camelyon16's test slides, named without a kind.
    """
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    n_tumour_slides = math.ceil(len(positives) / _PATCHES_PER_SLIDE)
    on_tumour_slides = negatives[: 2 * n_tumour_slides]
    on_normal_slides = negatives[2 * n_tumour_slides :]
    n_normal_slides = math.ceil(len(on_normal_slides) / _PATCHES_PER_SLIDE)
    # Slides 0..n_tumour_slides-1 are tumour slides, the rest normal ones.
    slide_of_patch = np.empty(len(labels), dtype=np.int64)
    slide_of_patch[positives] = np.arange(len(positives)) // _PATCHES_PER_SLIDE
    slide_of_patch[on_tumour_slides] = np.arange(len(on_tumour_slides)) // 2
    slide_of_patch[on_normal_slides] = (
        n_tumour_slides + np.arange(len(on_normal_slides)) // _PATCHES_PER_SLIDE
    )

    if split == "test":
        # Camelyon16's test slides share one numbering whatever their kind.
        names = [f"camelyon16_test_{next_slide_number['test'] + s:03d}" for s in slide_of_patch]
        next_slide_number["test"] += n_tumour_slides + n_normal_slides
        return names
    names = [
        f"camelyon16_train_tumor_{next_slide_number['tumor'] + s:03d}"
        if s < n_tumour_slides
        else f"camelyon16_train_normal_{next_slide_number['normal'] + s - n_tumour_slides:03d}"
        for s in slide_of_patch
    ]
    next_slide_number["tumor"] += n_tumour_slides
    next_slide_number["normal"] += n_normal_slides
    return names


def _write_folder(
    root: Path, patches_uint8: np.ndarray, labels: np.ndarray, split_indices: dict[str, np.ndarray]
) -> None:
    """Image-folder layout: split/label/synthNNNNNNN.png, lossless."""
    for split, indices in split_indices.items():
        for label in (0, 1):
            (root / split / str(label)).mkdir(parents=True)
        for index in indices:
            path = root / split / str(labels[index]) / f"synth{index:07d}.png"
            Image.fromarray(patches_uint8[index]).save(path)
