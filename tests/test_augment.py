"""Specification of histodetect.augment: batched dihedral, stain and colour augmentation."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from histodetect.augment import (
    AugmentConfig,
    _turned_window,
    augment_batch,
    check_tta,
    color_jitter,
    dihedral_views,
    gaussian_blur,
    gaussian_noise,
    hed_jitter,
    mixup_batch,
    preprocess_batch,
    random_dihedral,
    tta_crop_offsets,
    tta_view_groups,
)
from histodetect.errors import UserError

# Per-channel statistics of the kind a run folder stores, on the [0, 1] scale.
MEAN = (0.70, 0.54, 0.69)
STD = (0.17, 0.20, 0.15)
IDENTITY_MEAN, IDENTITY_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
LUMA_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])
# Ruifrok & Johnston's H&E-DAB stain vectors (skimage's rgb_from_hed), one row per stain.
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
EVERYTHING_ON = AugmentConfig(
    dihedral=True, hed_sigma=0.2, hed_bias=0.2, brightness=0.2, contrast=0.2,
    saturation=0.2, hue=0.05, crop_px=64, shift_px=8,
)
TURNED_TOO = dataclasses.replace(EVERYTHING_ON, rotate_deg=180.0, scale=0.2)
BLURRED_TOO = dataclasses.replace(EVERYTHING_ON, blur_sigma=1.5, noise_std=0.05)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def real_patches_uint8(pcam_jpeg: Path) -> torch.Tensor:
    """(32, 96, 96, 3) uint8: 16 negative and 16 positive PCam valid patches, read with Pillow."""
    files = [f for label in ("0", "1") for f in sorted((pcam_jpeg / "valid" / label).glob("*.jpg"))[:16]]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))


@pytest.fixture(scope="module")
def real_images(real_patches_uint8: torch.Tensor) -> torch.Tensor:
    """The real patches as (32, 3, 96, 96) float32 in [0, 1]."""
    return real_patches_uint8.permute(0, 3, 1, 2).float() / 255


def random_uint8_images(n: int, size_px: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 noise: with overwhelming odds, no image has a symmetry."""
    return torch.randint(256, (n, 3, size_px, size_px), dtype=torch.uint8, generator=seeded(seed))


def which_view(image: torch.Tensor, views: torch.Tensor) -> list[int]:
    """Indices k with views[k] == image exactly. views: (8, C, H, W)."""
    return [k for k in range(views.shape[0]) if torch.equal(views[k], image)]


def slope(out: torch.Tensor, images: torch.Tensor, fixed_point: torch.Tensor | float) -> torch.Tensor:
    """Per image, the least-squares k in out - fixed_point = k * (images - fixed_point)."""
    moved, base = out - fixed_point, images - fixed_point
    return (moved * base).sum(dim=(1, 2, 3)) / (base * base).sum(dim=(1, 2, 3))


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image between two (N, ...) batches."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# --- dihedral symmetries --------------------------------------------------------


def test_random_dihedral_gives_each_image_one_of_its_eight_symmetries() -> None:
    images = random_uint8_images(64, 7)
    out = random_dihedral(images, seeded())
    views = dihedral_views(images)  # (8, N, C, H, W)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for n in range(images.shape[0]):
        assert len(which_view(out[n], views[:, n])) == 1


def test_random_dihedral_draws_all_eight_symmetries_over_a_batch() -> None:
    images = random_uint8_images(400, 5)
    out = random_dihedral(images, seeded())
    views = dihedral_views(images)
    drawn = [which_view(out[n], views[:, n])[0] for n in range(images.shape[0])]
    counts = np.bincount(drawn, minlength=8)
    assert (counts > 20).all(), f"each symmetry should be drawn about 50 times in 400, got {counts}"


def test_random_dihedral_works_on_channels_last_float_batches() -> None:
    images = random_uint8_images(16, 6).float().contiguous(memory_format=torch.channels_last)
    out = random_dihedral(images, seeded())
    views = dihedral_views(images)
    assert all(len(which_view(out[n], views[:, n])) == 1 for n in range(16))


def test_random_dihedral_rejects_non_square_images() -> None:
    with pytest.raises(ValueError, match="needs square images, found 4x6"):
        random_dihedral(torch.zeros(2, 3, 4, 6))


def test_dihedral_views_of_an_asymmetric_image_are_eight_distinct_images() -> None:
    views = dihedral_views(random_uint8_images(1, 6))
    assert views.shape == (8, 1, 3, 6, 6)
    assert len({tuple(view.flatten().tolist()) for view in views}) == 8


def test_dihedral_views_form_a_closed_group() -> None:
    image = random_uint8_images(1, 6)
    views = dihedral_views(image)[:, 0]  # (8, C, H, W)
    views_of_views = dihedral_views(views)  # (8, 8, C, H, W): every pair composed
    for composed in views_of_views.flatten(0, 1):
        assert len(which_view(composed, views)) == 1


def test_dihedral_views_four_are_the_rotations_and_one_is_the_input() -> None:
    images = random_uint8_images(3, 6)
    rotations = dihedral_views(images, 4)
    for k in range(4):
        assert torch.equal(rotations[k], torch.rot90(images, k, dims=(-2, -1)))
    assert torch.equal(dihedral_views(images, 1), images[None])


def test_dihedral_views_name_the_allowed_view_counts() -> None:
    with pytest.raises(UserError, match=r"n_views: expected one of \(1, 4, 8\) dihedral views, found 3; use 1"):
        dihedral_views(torch.zeros(1, 3, 4, 4), 3)


# --- test-time views: dihedral, and moved crops -------------------------------------


def test_tta_crops_are_the_centre_then_its_moves_by_the_shift_along_the_axes_then_the_diagonals() -> None:
    assert tta_crop_offsets(1, 4) == tta_crop_offsets(8, 4) == [(0, 0)]
    assert tta_crop_offsets(40, 4) == [(0, 0), (-4, 0), (4, 0), (0, -4), (0, 4)]
    assert sorted(tta_crop_offsets(72, 4)) == [(dy, dx) for dy in (-4, 0, 4) for dx in (-4, 0, 4)]
    assert tta_crop_offsets(72, 4)[:5] == tta_crop_offsets(40, 4)
    with pytest.raises(UserError, match=r"--tta 16: expected one of 1, 4, 8, 40, 72"):
        tta_crop_offsets(16, 4)


@pytest.mark.parametrize("n_views", [1, 4, 8, 40, 72])
def test_tta_views_are_the_dihedral_views_of_each_moved_crop_and_smaller_ttas_are_their_prefix(
    real_patches_uint8: torch.Tensor, n_views: int
) -> None:
    patches = real_patches_uint8[:6]
    views = torch.cat(list(tta_view_groups(patches, n_views, MEAN, STD, crop_px=80, shift_px=6)))
    assert views.shape == (n_views, 6, 3, 80, 80)
    centre = preprocess_batch(patches, MEAN, STD, crop_px=80)
    # The centre crop's views are bit for bit those TTA 8 always used.
    assert torch.equal(views[: min(n_views, 8)], dihedral_views(centre, min(n_views, 8)))
    for k, (down, right) in enumerate(tta_crop_offsets(n_views, 6)[1:], start=1):
        moved = patches[:, 8 + down : 88 + down, 8 + right : 88 + right]  # the crop, moved, from the uint8 patch
        expected = dihedral_views(preprocess_batch(moved, MEAN, STD), 8)
        assert torch.allclose(views[8 * k : 8 * (k + 1)], expected, atol=1e-6), (down, right)
    if n_views == 72:
        smaller = torch.cat(list(tta_view_groups(patches, 40, MEAN, STD, crop_px=80, shift_px=6)))
        assert torch.equal(views[:40], smaller)


def test_moved_crop_views_need_a_run_trained_on_a_shifted_crop_and_crops_that_fit() -> None:
    check_tta(8, crop_px=0, shift_px=0, source="runs/whole")  # dihedral views need nothing
    check_tta(72, crop_px=88, shift_px=4, source="runs/default")
    with pytest.raises(UserError, match=r"^--tta '8': expected an int, found str$"):
        check_tta("8", crop_px=88, shift_px=4, source="runs/default")  # read as "--tta 8: expected one of ..., 8"
    with pytest.raises(UserError, match=r"^--tta True: expected an int, found bool$"):
        check_tta(True, crop_px=88, shift_px=4, source="runs/default")  # was 1 view
    with pytest.raises(UserError, match=r"--tta 40: runs/whole was trained without a shifted crop "
                                        r"\(crop_px 0, shift_px 0\).*use --tta 8"):
        check_tta(40, crop_px=0, shift_px=0, source="runs/whole")
    with pytest.raises(UserError, match=r"--tta 72: crops of 88 px moved by 8 px do not fit in 96x96 px patches"):
        list(tta_view_groups(torch.zeros(2, 96, 96, 3, dtype=torch.uint8), 72, MEAN, STD, crop_px=88, shift_px=8))


# --- HED stain jitter -------------------------------------------------------------


def test_hed_jitter_at_zero_strength_is_the_identity(real_images: torch.Tensor) -> None:
    out = hed_jitter(real_images, sigma=0.0, bias=0.0, generator=seeded())
    assert (out - real_images).abs().max() < 1e-5


def test_hed_jitter_changes_colours_but_keeps_range_and_structure(real_images: torch.Tensor) -> None:
    out = hed_jitter(real_images, sigma=0.2, bias=0.2, generator=seeded())
    assert out.shape == real_images.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert ((out - real_images).abs().amax(dim=(1, 2, 3)) > 0.02).all(), "every image should change"
    # Only colours move: each channel of each image still lines up pixel for pixel with its input.
    for channel in range(3):
        assert (correlation(out[:, channel], real_images[:, channel]) > 0.9).all()


def test_hed_jitter_scales_a_haematoxylin_only_image_along_the_haematoxylin_vector() -> None:
    # An image stained with haematoxylin alone, in varying amounts (optical density
    # od = amount * H vector, rgb = exp(-od)).
    amount = torch.linspace(0.05, 1.0, 64, dtype=torch.float64).view(1, 1, 8, 8)
    od = amount * RGB_FROM_HED[0].view(1, 3, 1, 1)
    images = torch.exp(-od).expand(64, 3, 8, 8).float()
    out = hed_jitter(images, sigma=0.3, bias=0.0, generator=seeded())
    ratio = -torch.log(out.double()) / od  # (N, 3, 8, 8): alpha_H for every pixel and channel
    alpha = ratio.flatten(1).median(1).values
    assert torch.allclose(ratio, alpha.view(-1, 1, 1, 1).expand_as(ratio), rtol=1e-3)
    assert ((0.7 <= alpha) & (alpha <= 1.3)).all() and alpha.std() > 0.05
    # U(0.7, 1.3) thins the stain as often as it thickens it: 64 draws fall on both sides of 1.
    assert alpha.min() < 0.9 and alpha.max() > 1.1 and abs(alpha.mean() - 1) < 0.08


def test_hed_jitter_bias_shifts_each_stain_by_at_most_bias_in_optical_density() -> None:
    stains = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    images = torch.exp(-(stains @ RGB_FROM_HED)).view(1, 3, 1, 1).expand(64, 3, 4, 4).float()
    out = hed_jitter(images, sigma=0.0, bias=0.05, generator=seeded())
    od_out = -torch.log(out.double()).permute(0, 2, 3, 1)  # (N, H, W, 3), rows as in rgb2hed
    shift = od_out @ torch.linalg.inv(RGB_FROM_HED) - stains  # beta per image, stain and pixel
    assert shift.abs().max() <= 0.05 + 1e-4
    assert shift.abs().max() > 0.03, "64 draws from U(-0.05, 0.05) should reach past 0.03"
    assert torch.allclose(shift, shift[:, :1, :1, :].expand_as(shift), atol=1e-4), "one shift per image"


# --- colour jitter ------------------------------------------------------------------


def test_color_jitter_at_zero_strength_is_exactly_the_identity(real_images: torch.Tensor) -> None:
    out = color_jitter(real_images, 0.0, 0.0, 0.0, 0.0, seeded())
    assert torch.equal(out, real_images)


def test_brightness_jitter_scales_each_image_by_one_factor() -> None:
    images = torch.rand(32, 3, 8, 8, generator=seeded()) * 0.5 + 0.1  # no clipping at 1.5x
    out = color_jitter(images, 0.5, 0.0, 0.0, 0.0, seeded(1))
    factor = (out / images).flatten(1)
    assert torch.allclose(factor, factor[:, :1].expand_as(factor), rtol=1e-5)
    assert ((0.5 <= factor) & (factor <= 1.5)).all() and factor[:, 0].std() > 0.1


def test_contrast_jitter_keeps_each_images_mean_luma() -> None:
    images = torch.rand(32, 3, 8, 8, generator=seeded()) * 0.4 + 0.3
    out = color_jitter(images, 0.0, 0.5, 0.0, 0.0, seeded(1))
    mean_luma = lambda x: x.mean(dim=(2, 3)) @ LUMA_WEIGHTS  # noqa: E731
    assert torch.allclose(mean_luma(out), mean_luma(images), atol=1e-5)
    assert (out.std(dim=(1, 2, 3)) / images.std(dim=(1, 2, 3))).std() > 0.1, "contrast should vary per image"


def test_saturation_and_hue_jitter_leave_grey_pixels_grey() -> None:
    grey = torch.rand(16, 1, 8, 8, generator=seeded()).expand(16, 3, 8, 8)
    out = color_jitter(grey, 0.0, 0.0, 1.0, 0.5, seeded(1))
    assert (out - grey).abs().max() < 1e-5


def test_hue_jitter_turns_colours_but_keeps_luma() -> None:
    # Pale colours around mid-grey, so that no turn of the hue leaves [0, 1].
    images = 0.5 + 0.1 * (torch.rand(16, 3, 8, 8, generator=seeded()) - 0.5)
    out = color_jitter(images, 0.0, 0.0, 0.0, 0.5, seeded(1))
    luma = lambda x: torch.einsum("nchw,c->nhw", x, LUMA_WEIGHTS)  # noqa: E731
    assert torch.allclose(luma(out), luma(images), atol=1e-5)
    assert ((out - images).abs().amax(dim=(1, 2, 3)) > 1e-3).sum() >= 14


def test_color_jitter_matches_torchvision_brightness_then_contrast_then_saturation() -> None:
    images = torch.rand(8, 3, 8, 8, generator=seeded()) * 0.3 + 0.35  # no step leaves [0, 1]
    out = color_jitter(images, 0.3, 0.3, 0.3, 0.0, seeded(1))
    # Each factor alone, from the same draws: the least-squares slope of output
    # against input around the point that factor leaves fixed.
    mean_luma = (images.mean(dim=(2, 3)) @ LUMA_WEIGHTS).view(-1, 1, 1, 1)
    luma = torch.einsum("nchw,c->nhw", images, LUMA_WEIGHTS)[:, None]
    brightness = slope(color_jitter(images, 0.3, 0.0, 0.0, 0.0, seeded(1)), images, 0.0)
    contrast = slope(color_jitter(images, 0.0, 0.3, 0.0, 0.0, seeded(1)), images, mean_luma)
    saturation = slope(color_jitter(images, 0.0, 0.0, 0.3, 0.0, seeded(1)), images, luma)
    expected = torch.stack([
        TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)
        for image, b, c, s in zip(images, brightness.tolist(), contrast.tolist(), saturation.tolist())
    ])
    assert torch.allclose(out, expected, atol=1e-4)


def test_color_jitter_keeps_real_patches_in_range(real_images: torch.Tensor) -> None:
    out = color_jitter(real_images, 0.5, 0.5, 0.5, 0.5, seeded())
    assert out.shape == real_images.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1


# --- augment_batch and preprocess_batch -----------------------------------------------


@pytest.mark.parametrize("crop_px", [0, 64, 72])
def test_augment_batch_with_everything_off_equals_preprocess_batch(
    real_patches_uint8: torch.Tensor, crop_px: int
) -> None:
    augmented = augment_batch(real_patches_uint8, AugmentConfig(crop_px=crop_px), MEAN, STD, seeded())
    assert torch.equal(augmented, preprocess_batch(real_patches_uint8, MEAN, STD, crop_px=crop_px))


@pytest.mark.parametrize("window_px", [75, 76, 87, 88])
def test_a_turn_of_almost_nothing_reads_the_same_centre_crop_as_prediction(
    real_patches_uint8: torch.Tensor, window_px: int
) -> None:
    # An odd 96 - window puts the whole-pixel centre crop half a pixel off the patch's
    # centre; a turned window must turn about the crop's centre, not the patch's.
    config = AugmentConfig(crop_px=window_px, rotate_deg=1e-9)
    turned = augment_batch(real_patches_uint8, config, IDENTITY_MEAN, IDENTITY_STD, seeded())
    plain = preprocess_batch(real_patches_uint8, IDENTITY_MEAN, IDENTITY_STD, crop_px=window_px)
    assert (turned - plain).abs().max() < 1e-4


def test_preprocess_batch_is_the_normalised_centre_crop(real_patches_uint8: torch.Tensor) -> None:
    out = preprocess_batch(real_patches_uint8, MEAN, STD, crop_px=64)
    centre = real_patches_uint8[:, 16:80, 16:80].permute(0, 3, 1, 2).float() / 255
    expected = (centre - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert out.shape == (32, 3, 64, 64)
    assert torch.allclose(out, expected, atol=1e-5)


def test_augment_batch_reads_channels_first_and_channels_last_patches_alike(
    real_patches_uint8: torch.Tensor,
) -> None:
    nchw = real_patches_uint8.permute(0, 3, 1, 2).contiguous()
    assert torch.equal(
        augment_batch(real_patches_uint8, EVERYTHING_ON, MEAN, STD, seeded()),
        augment_batch(nchw, EVERYTHING_ON, MEAN, STD, seeded()),
    )


@pytest.mark.parametrize(
    ("config", "size_px"),
    [(AugmentConfig(), 96), (AugmentConfig(dihedral=True), 96), (EVERYTHING_ON, 64),
     (AugmentConfig(crop_px=72, shift_px=12, dihedral=True), 72), (BLURRED_TOO, 64)],
)
def test_augment_batch_returns_float32_channels_last_on_the_input_device(
    real_patches_uint8: torch.Tensor, config: AugmentConfig, size_px: int
) -> None:
    out = augment_batch(real_patches_uint8, config, MEAN, STD, seeded())
    assert out.shape == (32, 3, size_px, size_px)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.device == real_patches_uint8.device
    assert torch.isfinite(out).all()


def test_augment_batch_is_reproducible_for_a_seed(real_patches_uint8: torch.Tensor) -> None:
    first = augment_batch(real_patches_uint8, EVERYTHING_ON, MEAN, STD, seeded(7))
    again = augment_batch(real_patches_uint8, EVERYTHING_ON, MEAN, STD, seeded(7))
    other = augment_batch(real_patches_uint8, EVERYTHING_ON, MEAN, STD, seeded(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("config", [EVERYTHING_ON, BLURRED_TOO], ids=["colour", "blurred"])
def test_augment_batch_jitters_real_patches_within_the_unit_range(
    real_patches_uint8: torch.Tensor, config: AugmentConfig
) -> None:
    plain = preprocess_batch(real_patches_uint8, IDENTITY_MEAN, IDENTITY_STD, crop_px=64)
    out = augment_batch(real_patches_uint8, config, IDENTITY_MEAN, IDENTITY_STD, seeded())
    assert 0 <= out.min() and out.max() <= 1
    assert ((out - plain).abs().amax(dim=(1, 2, 3)) > 0.02).all(), "every patch should change"


def test_crop_shift_and_dihedral_show_a_symmetry_of_a_window_near_the_centre() -> None:
    patches_uint8 = random_uint8_images(48, 20).permute(0, 2, 3, 1)  # (N, 20, 20, 3)
    config = AugmentConfig(crop_px=8, shift_px=3, dihedral=True)
    out = augment_batch(patches_uint8, config, IDENTITY_MEAN, IDENTITY_STD, seeded())
    pixels = (out * 255).round().to(torch.uint8)  # back to the exact input values
    images = patches_uint8.permute(0, 3, 1, 2)
    centre_px = (20 - 8) // 2
    offsets_seen = set()
    for n in range(images.shape[0]):
        matches = [
            (top, left)
            for top in range(20 - 8 + 1)
            for left in range(20 - 8 + 1)
            if which_view(pixels[n], dihedral_views(images[n : n + 1, :, top : top + 8, left : left + 8])[:, 0])
        ]
        assert len(matches) == 1
        top, left = matches[0]
        assert abs(top - centre_px) <= 3 and abs(left - centre_px) <= 3
        offsets_seen.add(matches[0])
    assert len(offsets_seen) > 10, "the window should move between patches"


def test_crop_shift_reaches_every_offset_up_to_the_shift_in_both_directions() -> None:
    # Each pixel holds its own row (red) and column (green), so an output's first pixel
    # names where the crop starts: 0 to 2 * shift_px in a window of crop_px + 2 * shift_px.
    crop_px, shift_px = 8, 3
    window_px = crop_px + 2 * shift_px
    steps = torch.arange(window_px, dtype=torch.uint8)
    patch = torch.stack([steps[:, None].expand(window_px, window_px), steps[None, :].expand(window_px, window_px),
                         torch.zeros(window_px, window_px, dtype=torch.uint8)], dim=-1)
    config = AugmentConfig(crop_px=crop_px, shift_px=shift_px)
    out = augment_batch(patch.expand(400, -1, -1, -1), config, IDENTITY_MEAN, IDENTITY_STD, seeded())
    corner = (out[:, :2, 0, 0] * 255).round().long()  # (N, 2): top, left
    assert set(corner[:, 0].tolist()) == set(corner[:, 1].tolist()) == set(range(2 * shift_px + 1))


def test_rotation_and_zoom_draw_angles_and_zooms_across_their_whole_range() -> None:
    # A ramp along the columns turned by angle and zoomed by zoom changes, across the
    # output, by cos(angle) / zoom per column and -sin(angle) / zoom per row (bilinear
    # sampling is exact on a linear image), which gives back each drawn angle and zoom.
    n, rotate_deg, scale = 200, 30.0, 0.2
    ramp = (torch.arange(96, dtype=torch.uint8) * 2).expand(96, 96)
    patches_uint8 = torch.stack([ramp, ramp, ramp], dim=-1).expand(n, -1, -1, -1)
    config = AugmentConfig(crop_px=32, rotate_deg=rotate_deg, scale=scale)
    out = augment_batch(patches_uint8, config, IDENTITY_MEAN, IDENTITY_STD, seeded())[:, 0].double() * 255 / 2
    per_column = (out[:, :, -1] - out[:, :, 0]).mean(1) / 31
    per_row = (out[:, -1, :] - out[:, 0, :]).mean(1) / 31
    angle_deg = torch.rad2deg(torch.atan2(-per_row, per_column))
    zoom = 1 / torch.hypot(per_column, per_row)
    assert angle_deg.abs().max() <= rotate_deg + 0.1 and ((1 - scale - 1e-3 <= zoom) & (zoom <= 1 + scale + 1e-3)).all()
    assert angle_deg.min() < -0.8 * rotate_deg and angle_deg.max() > 0.8 * rotate_deg, "turns both ways"
    assert zoom.min() < 1 - 0.8 * scale and zoom.max() > 1 + 0.8 * scale, "shrinks and magnifies"


def test_turned_window_with_no_turn_or_zoom_is_the_centre_crop_and_a_quarter_turn_is_counterclockwise(
    real_images: torch.Tensor,
) -> None:
    n = real_images.shape[0]
    plain = _turned_window(real_images, 64, torch.zeros(n), torch.ones(n))
    quarter = _turned_window(real_images, 64, torch.full((n,), math.pi / 2), torch.ones(n))
    centre = real_images[..., 16:80, 16:80]
    assert torch.allclose(plain, centre, atol=1e-5)
    assert torch.allclose(quarter, dihedral_views(centre, 4)[1], atol=1e-5)


def test_turned_window_turns_and_zooms_a_ramp_exactly() -> None:
    # Bilinear sampling reproduces a linear image exactly, so the result is known in
    # closed form: the value at offset (u, v) from the centre is that of the input at
    # rotation(angle) @ (u, v) / zoom.
    side_px, window_px = 64, 16
    offsets = torch.arange(side_px) + 0.5 - side_px / 2  # pixel centres about the patch centre
    ramp = offsets.expand(side_px, side_px)  # value = column offset
    angle = torch.tensor([0.3, -1.2, 2.5, math.pi])
    zoom = torch.tensor([1.0, 0.8, 1.25, 1.1])
    out = _turned_window(ramp.expand(4, 1, side_px, side_px), window_px, angle, zoom)
    u = (torch.arange(window_px) + 0.5 - window_px / 2).expand(window_px, window_px)  # column offset
    v = u.T  # row offset
    expected = (torch.cos(angle)[:, None, None] * u - torch.sin(angle)[:, None, None] * v) / zoom[:, None, None]
    assert torch.allclose(out[:, 0], expected, atol=1e-4)


def test_rotation_and_zoom_keep_a_plain_patch_plain_and_real_patches_in_range(
    real_patches_uint8: torch.Tensor,
) -> None:
    plain = torch.full((8, 96, 96, 3), 200, dtype=torch.uint8)
    config = AugmentConfig(crop_px=88, shift_px=4, rotate_deg=180.0, scale=0.3)
    out = augment_batch(plain, config, IDENTITY_MEAN, IDENTITY_STD, seeded())
    assert torch.allclose(out, torch.full_like(out, 200 / 255), atol=1e-5), "mirroring fills the corners with tissue"
    real = augment_batch(real_patches_uint8, TURNED_TOO, IDENTITY_MEAN, IDENTITY_STD, seeded())
    assert real.shape == (real_patches_uint8.shape[0], 3, 64, 64) and 0 <= real.min() and real.max() <= 1
    assert torch.equal(real, augment_batch(real_patches_uint8, TURNED_TOO, IDENTITY_MEAN, IDENTITY_STD, seeded()))
    unturned = augment_batch(real_patches_uint8, EVERYTHING_ON, IDENTITY_MEAN, IDENTITY_STD, seeded())
    assert not torch.allclose(real, unturned)


def test_gaussian_blur_blurs_each_image_with_its_own_drawn_sigma_as_torchvision_does(
    real_images: torch.Tensor,
) -> None:
    max_sigma = 1.5
    out = gaussian_blur(real_images, max_sigma, seeded(4))
    sigmas = max_sigma * torch.rand(real_images.shape[0], generator=seeded(4))  # the draws it makes
    assert sigmas.min() < 0.5 and sigmas.max() > 1.0, "the seed should draw weak and strong blurs"
    for image, sigma, blurred in zip(real_images, sigmas.tolist(), out):
        expected = TF.gaussian_blur(image, kernel_size=[11, 11], sigma=[sigma, sigma])  # 2 * ceil(3 * 1.5) + 1
        assert torch.allclose(blurred, expected, atol=1e-5), sigma


def test_gaussian_blur_at_zero_sigma_is_the_identity_and_keeps_a_plain_patch_plain(
    real_images: torch.Tensor,
) -> None:
    tiny = gaussian_blur(real_images, 1e-4, seeded())
    assert torch.allclose(tiny, real_images, atol=1e-6)
    plain = torch.full((4, 3, 40, 40), 0.6)
    assert torch.allclose(gaussian_blur(plain, 2.0, seeded()), plain, atol=1e-6)


def test_gaussian_blur_only_softens_real_patches(real_images: torch.Tensor) -> None:
    def edge_energy(images: torch.Tensor) -> torch.Tensor:  # mean absolute difference of neighbours, per image
        return (images[..., 1:] - images[..., :-1]).abs().mean(dim=(1, 2, 3))

    out = gaussian_blur(real_images, 2.0, seeded())
    assert (edge_energy(out) <= edge_energy(real_images) + 1e-6).all()
    assert (edge_energy(out) < 0.8 * edge_energy(real_images)).float().mean() > 0.5
    assert torch.allclose(out.mean(dim=(2, 3)), real_images.mean(dim=(2, 3)), atol=0.01), "blur keeps the colour"


def test_gaussian_noise_adds_zero_mean_noise_of_each_images_drawn_strength() -> None:
    grey = torch.full((16, 3, 64, 64), 0.5)
    out = gaussian_noise(grey, 0.1, seeded(2))
    stds = 0.1 * torch.rand(16, generator=seeded(2))  # the per-image draws it makes, first
    residual = out - grey
    assert torch.allclose(residual.std(dim=(1, 2, 3)), stds, rtol=0.05, atol=1e-3)
    assert residual.mean().abs() < 2e-3
    assert torch.equal(out, gaussian_noise(grey, 0.1, seeded(2)))
    dark = gaussian_noise(torch.zeros(4, 3, 32, 32), 0.2, seeded())
    assert dark.min() == 0 and dark.max() <= 1 and dark.max() > 0, "clamped to the unit range"


def test_mixup_blends_each_patch_and_label_with_the_reversed_batch(real_images: torch.Tensor) -> None:
    labels = torch.arange(real_images.shape[0], dtype=torch.float32) % 2
    labels[:3] = 1.0  # not symmetric under reversal
    images_before, labels_before = real_images.clone(), labels.clone()
    mixed, soft = mixup_batch(real_images, labels, 0.3)
    assert torch.equal(real_images, images_before) and torch.equal(labels, labels_before), "the inputs are untouched"
    assert torch.allclose(mixed, 0.3 * real_images + 0.7 * real_images.flip(0))
    assert torch.allclose(soft, 0.3 * labels + 0.7 * labels.flip(0))
    kept, same = mixup_batch(real_images, labels, 1.0)
    assert torch.equal(kept, real_images) and torch.equal(same, labels)
    assert mixed.min() >= 0 and mixed.max() <= 1, "a blend of images in [0, 1] stays in range"
    with pytest.raises(ValueError, match="mixup weight must be in"):
        mixup_batch(real_images, labels, 1.5)


# --- user mistakes ----------------------------------------------------------------------


def test_augment_config_names_the_flag_out_of_range() -> None:
    with pytest.raises(UserError, match=r"--hue 0.7: expected a value in \[0.0, 0.5\]; pass"):
        AugmentConfig(hue=0.7)
    with pytest.raises(UserError, match=r"--hed-sigma -0.1: expected a value in \[0.0, 1.0\]"):
        AugmentConfig(hed_sigma=-0.1)
    with pytest.raises(UserError, match=r"--rotate-deg 270: expected a value in \[0.0, 180.0\]"):
        AugmentConfig(rotate_deg=270)
    with pytest.raises(UserError, match=r"--scale 0.6: expected a value in \[0.0, 0.5\]"):
        AugmentConfig(scale=0.6)
    with pytest.raises(UserError, match=r"--blur-sigma 5: expected a value in \[0.0, 4.0\]"):
        AugmentConfig(blur_sigma=5)
    with pytest.raises(UserError, match=r"--noise-std -0.1: expected a value in \[0.0, 0.5\]"):
        AugmentConfig(noise_std=-0.1)


def test_augment_batch_names_a_blur_too_wide_for_the_crop(real_patches_uint8: torch.Tensor) -> None:
    config = AugmentConfig(crop_px=8, blur_sigma=3.0)
    with pytest.raises(UserError, match="--blur-sigma 3.0: the 19-pixel kernel does not fit 8x8 images; use a smaller --blur-sigma"):
        augment_batch(real_patches_uint8, config, MEAN, STD, seeded())


def test_augment_config_needs_a_crop_for_a_shift() -> None:
    with pytest.raises(UserError, match="--shift-px 8: the shift moves the crop window, but --crop-px is 0; set --crop-px"):
        AugmentConfig(shift_px=8)


def test_augment_batch_names_a_crop_that_does_not_fit_the_patches() -> None:
    config = AugmentConfig(crop_px=88, shift_px=8)
    with pytest.raises(
        UserError,
        match=r"augment crop_px=88, shift_px=8: the crop reads a 104-pixel window, but the patches are 96x96; "
        r"choose crop_px \+ 2 \* shift_px <= 96",
    ):
        augment_batch(torch.zeros(2, 96, 96, 3, dtype=torch.uint8), config, MEAN, STD)


def test_augment_batch_rejects_float_patches() -> None:
    with pytest.raises(
        UserError,
        match=r"patches_uint8: expected a uint8 RGB batch \(N, H, W, 3\) or \(N, 3, H, W\), "
        r"found torch.float32 \(2, 96, 96, 3\); pass the patches as read",
    ):
        preprocess_batch(torch.zeros(2, 96, 96, 3), MEAN, STD)


def test_augment_batch_needs_square_patches_for_dihedral_and_turns() -> None:
    with pytest.raises(UserError, match="dihedral augmentation needs square patches, found 64x96; set crop_px"):
        augment_batch(torch.zeros(2, 64, 96, 3, dtype=torch.uint8), AugmentConfig(dihedral=True), MEAN, STD)
    with pytest.raises(UserError, match="rotate_deg augmentation needs square patches, found 64x96; set crop_px"):
        augment_batch(torch.zeros(2, 64, 96, 3, dtype=torch.uint8), AugmentConfig(rotate_deg=10), MEAN, STD)


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [
        ((0.5, 0.5), STD, r"mean: expected 3 values \(one per RGB channel\), found 2; pass the model's"),
        (MEAN, (0.2, 0.0, 0.2), r"std: expected 3 positive values, found \(0.2, 0.0, 0.2\); pass"),
    ],
)
def test_preprocess_batch_names_bad_normalisation_statistics(mean, std, message: str) -> None:
    with pytest.raises(UserError, match=message):
        preprocess_batch(torch.zeros(2, 96, 96, 3, dtype=torch.uint8), mean, std)


def test_augment_makes_its_constant_tensors_once(real_patches_uint8: torch.Tensor) -> None:
    # torch.tensor(..., device="cuda") waits for the GPU to drain; made per batch it stalls training.
    from histodetect.augment import _constant

    augment_batch(real_patches_uint8, EVERYTHING_ON, MEAN, STD, seeded(0))
    made = _constant.cache_info().misses
    second = augment_batch(real_patches_uint8, EVERYTHING_ON, MEAN, STD, seeded(0))
    assert _constant.cache_info().misses == made
    assert torch.equal(second, augment_batch(real_patches_uint8, EVERYTHING_ON, MEAN, STD, seeded(0)))


# --- GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_batch_on_the_gpu_matches_the_cpu_for_a_cpu_generator(real_patches_uint8: torch.Tensor) -> None:
    on_cpu = augment_batch(real_patches_uint8, EVERYTHING_ON, MEAN, STD, seeded(3))
    on_gpu = augment_batch(real_patches_uint8.cuda(), EVERYTHING_ON, MEAN, STD, seeded(3))
    assert on_gpu.device.type == "cuda" and on_gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", [EVERYTHING_ON, TURNED_TOO, BLURRED_TOO], ids=["dihedral", "turned", "blurred"])
def test_augment_batch_never_waits_for_the_gpu(real_patches_uint8: torch.Tensor, config: AugmentConfig) -> None:
    on_gpu = real_patches_uint8.cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    augment_batch(on_gpu, config, MEAN, STD, generator)  # first call: constants are made
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            augment_batch(on_gpu, config, MEAN, STD, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
