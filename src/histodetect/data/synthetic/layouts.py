"""Writing patches in the layouts histodetect reads: Kaggle folder, PCam HDF5, image folder."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from ..decode import PATCH_SIZE_PX, patch_sha1
from .patches import _SLIDE_COORDINATE_STREAM

_PATCHES_PER_SLIDE = 12  # invented PCam meta: several patches per slide
_H5_CHUNK_PATCHES = 256  # a batch read of a few hundred patches touches one or two chunks


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
