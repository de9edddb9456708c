"""Batched augmentation on the device: dihedral symmetries, rotation and zoom, stain and colour jitter.

Training keeps patches as uint8 until they reach the device and calls
`augment_batch` once per batch; evaluation and prediction call `preprocess_batch`,
which is the same path with every augmentation off. Every function takes tensors
and returns tensors on the input's device; randomness comes from an optional
`torch.Generator`, so a seed reproduces a run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from histodetect.errors import UserError

# Ruifrok & Johnston (2001) H&E-DAB stain vectors in optical density, one row per
# stain, as skimage.color.rgb2hed has them.
_RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
# Inverted once here on the CPU: torch.linalg.inv on a GPU checks for errors with a
# host sync, which would stall every batch.
_HED_FROM_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(_RGB_FROM_HED, dtype=torch.float64)).tolist()))
# Intensities are floored here before the log, as rgb2hed does, so black stays finite.
_RGB_FLOOR = 1e-6
# ITU-R BT.601 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# NTSC RGB -> YIQ; the I and Q rows sum to zero, so greys stay grey under a hue turn.
_YIQ_FROM_RGB = (_LUMA_WEIGHTS, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_RGB_FROM_YIQ = tuple(map(tuple, torch.linalg.inv(torch.tensor(_YIQ_FROM_RGB, dtype=torch.float64)).tolist()))
# Test-time views per patch (`tta_view_groups`): 1, 4 or 8 dihedral views of the centre
# crop; 40 and 72 add the 8 dihedral views of 4 and 8 crops moved by the run's shift_px.
TTA_VIEW_COUNTS = (1, 4, 8, 40, 72)
DIHEDRAL_VIEW_COUNTS = (1, 4, 8)


@dataclass(frozen=True)
class AugmentConfig:
    """What `augment_batch` does to each training batch; every default is off."""

    dihedral: bool = False  # one of the 8 square symmetries per patch
    hed_sigma: float = 0.0  # stain scale alpha ~ U(1 - sigma, 1 + sigma); Tellez 2019 "HED-light" is 0.05
    hed_bias: float = 0.0  # stain shift beta ~ U(-bias, bias) in optical density (see hed_jitter)
    brightness: float = 0.0  # factor ~ U(max(0, 1 - b), 1 + b), as torchvision's ColorJitter
    contrast: float = 0.0  # factor ~ U(max(0, 1 - c), 1 + c)
    saturation: float = 0.0  # factor ~ U(max(0, 1 - s), 1 + s)
    hue: float = 0.0  # turn ~ U(-hue, hue), a fraction of the colour wheel, at most 0.5
    crop_px: int = 0  # side of the centre crop; 0 keeps the whole patch
    # Moves the crop window by up to this many pixels in each axis. PCam labels the
    # centre 32x32 of a 96-pixel patch, so keep crop_px / 2 - shift_px >= 16 to keep
    # the labelled region inside every crop.
    shift_px: int = 0
    # Rotation by any angle ~ U(-rotate_deg, rotate_deg) and zoom ~ U(1 - scale, 1 + scale)
    # about the patch centre, one bilinear resampling of the whole patch per image;
    # pixels the turned window needs from beyond the patch are mirrored back in.
    rotate_deg: float = 0.0
    scale: float = 0.0
    # Focus and scanner noise (Tellez et al. 2019's "morphology" group): a Gaussian
    # blur with sigma ~ U(0, blur_sigma) pixels, then Gaussian noise with a standard
    # deviation ~ U(0, noise_std) on the [0, 1] scale, both drawn per image.
    blur_sigma: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        for name, low, high in (
            ("hed_sigma", 0.0, 1.0),  # above 1 the stain scale can turn negative
            # Finite: an infinite jitter turns every patch into NaN (the loss check then blamed --lr).
            # 10 is already far past anything useful (the presets use 0.05-0.1).
            ("hed_bias", 0.0, 10.0),
            ("brightness", 0.0, 10.0),
            ("contrast", 0.0, 10.0),
            ("saturation", 0.0, 10.0),
            ("hue", 0.0, 0.5),  # half a turn each way already covers the wheel
            ("crop_px", 0, math.inf),
            ("shift_px", 0, math.inf),
            ("rotate_deg", 0.0, 180.0),  # a half turn each way covers every angle
            ("scale", 0.0, 0.5),  # beyond that, tissue at another magnification
            ("blur_sigma", 0.0, 4.0),  # a 4 px blur already wipes out nuclei at PCam's 0.97 um/px
            ("noise_std", 0.0, 0.5),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise UserError(
                    f"augment {name}: expected a value in [{low}, {high}], found {value}; "
                    f"pass a value in that range (0 turns it off)"
                )
        if self.shift_px and not self.crop_px:
            raise UserError(
                f"augment shift_px={self.shift_px}: the shift moves the crop window, but crop_px is 0; "
                f"set crop_px (e.g. 64) or shift_px=0"
            )


def augment_batch(
    patches_uint8: Tensor,
    config: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Turn a uint8 batch into an augmented, normalised float32 batch: the one call training makes.

    patches_uint8: (N, H, W, 3) or (N, 3, H, W) uint8 on any device. mean, std: the
    model's per-channel normalisation on the [0, 1] scale. Steps: rotation and
    zoom about the centre (if on), centre crop to `crop_px` with its position
    jittered by up to `shift_px`, dihedral, HED stain jitter, colour jitter, blur,
    noise, then (x - mean) / std. Returns (N, 3, crop, crop)
    float32 in channels_last memory format on the input's device. The same
    generator seed gives the same batch; random draws are made on the generator's
    device, so a CPU generator gives the same augmentations on a GPU batch.
    """
    images = _as_nchw(patches_uint8)  # (N, 3, H, W) uint8, a view
    _check_mean_std(mean, std)
    window_px = _crop_window_px(config, images.shape)
    if config.rotate_deg or config.scale:
        # Resampled straight into the crop window, in float (0-255), from the whole patch.
        images = _rotate_and_zoom(images.float(), window_px, config.rotate_deg, config.scale, generator)
    else:
        images = _centre_crop(images, window_px)
    out_px = config.crop_px or window_px
    # Crop shift and dihedral only move pixels: their index maps compose into one
    # gather, run on the uint8 pixels before the conversion to float (unless the
    # rotation has already made them float).
    source_index = _spatial_source_index(config, images.shape[0], out_px, window_px, images, generator)
    if source_index is not None:
        images = _gather_pixels(images, source_index, out_px)
    # In place is safe: .float() copies uint8 input, and a float window is grid_sample's
    # (or the gather's) own new tensor, never the caller's.
    images = images.float().div_(255)
    if config.hed_sigma or config.hed_bias:
        images = hed_jitter(images, config.hed_sigma, config.hed_bias, generator)
    if config.brightness or config.contrast or config.saturation or config.hue:
        images = color_jitter(
            images, config.brightness, config.contrast, config.saturation, config.hue, generator
        )
    if config.blur_sigma:
        images = gaussian_blur(images, config.blur_sigma, generator)
    if config.noise_std:
        images = gaussian_noise(images, config.noise_std, generator)
    return _normalise(images, mean, std)


def mixup_batch(images: Tensor, labels: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al. 2018): blend each image and its label with the batch's reverse.

    images: (N, C, H, W) float; labels: (N,) float. Returns weight * own +
    (1 - weight) * partner for both, the partner of image i being image N - 1 - i.
    Pairing with the reversed batch, as timm's Mixup does, needs no random draw
    besides the weight: training batches already come in random order.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mixup weight must be in [0, 1], found {weight}")
    return (
        images.mul(weight).add_(images.flip(0), alpha=1.0 - weight),
        labels.mul(weight).add_(labels.flip(0), alpha=1.0 - weight),
    )


def preprocess_batch(
    patches_uint8: Tensor, mean: Sequence[float], std: Sequence[float], crop_px: int = 0
) -> Tensor:
    """Deterministic preprocessing for evaluation and prediction: `augment_batch` with every augmentation off.

    uint8 (N, H, W, 3) or (N, 3, H, W) -> float in [0, 1] -> centre crop (0 = none)
    -> (x - mean) / std. Returns (N, 3, crop, crop) float32, channels_last.
    """
    return augment_batch(patches_uint8, AugmentConfig(crop_px=crop_px), mean, std)


def random_dihedral(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Apply one of the 8 square symmetries, drawn per image, to each image. images: (N, C, H, W), H == W.

    Works on any dtype; the transforms are those of `dihedral_views`.
    """
    n, _, height_px, width_px = images.shape
    if height_px != width_px:
        raise ValueError(f"random_dihedral needs square images, found {height_px}x{width_px}")
    return _gather_pixels(images, _random_dihedral_index(n, height_px, images, generator), height_px)


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
    if n_views not in TTA_VIEW_COUNTS:
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


def hed_jitter(
    images: Tensor, sigma: float, bias: float, generator: torch.Generator | None = None
) -> Tensor:
    """Jitter H&E stain amounts per image (Tellez et al. 2018, 2019). images: (N, 3, H, W) float in [0, 1].

    Pixels go to optical density, -ln(rgb), and are split into haematoxylin, eosin
    and DAB with skimage's rgb2hed stain matrix; each image's stains are scaled by
    alpha ~ U(1 - sigma, 1 + sigma) and shifted by beta ~ U(-bias, bias), drawn per
    image and stain, then mapped back to RGB and clamped to [0, 1].

    beta is in natural-log optical density. skimage's current rgb2hed divides that
    by ln(1e6) ~ 13.8, so bias 0.05 here is 0.0036 of its units; Tellez et al. used
    an older rgb2hed with yet another scale, so their strengths (0.05 for
    "HED-light", 0.2 for "HED-strong") are a starting point, not an equivalence.
    """
    n = images.shape[0]
    alpha = _uniform((n, 3), 1 - sigma, 1 + sigma, images, generator)
    beta = _uniform((n, 3), -bias, bias, images, generator)
    rgb_from_hed = _constant(_RGB_FROM_HED, torch.float64, images.device)
    hed_from_rgb = _constant(_HED_FROM_RGB, torch.float64, images.device)
    # rgb2hed works on row vectors: stains = od @ hed_from_rgb, od = stains @ rgb_from_hed.
    # Scaling the stains and going back is one 3x3 map of the optical density per
    # image. Written as I + (alpha - 1) terms it is exactly I when alpha == 1, so at
    # zero strength only the log/exp round trip remains.
    od_change = hed_from_rgb @ torch.diag_embed(alpha.double() - 1) @ rgb_from_hed  # (N, 3, 3)
    od_matrix = torch.eye(3, dtype=torch.float64, device=images.device) + od_change
    od_offset = beta.double() @ rgb_from_hed  # (N, 3)
    # log(rgb) = -od, so the same map applies to log(rgb) with the offset negated.
    log_rgb = _mix_channels(
        torch.log(images.clamp_min(_RGB_FLOOR)),
        od_matrix.mT.to(images.dtype),  # row-vector map -> column-vector map
        (-od_offset).to(images.dtype),
    )
    return torch.exp(log_rgb).clamp_(max=1.0)  # exp is already > 0


def color_jitter(
    images: Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Jitter brightness, contrast, saturation and hue per image. images: (N, 3, H, W) float in [0, 1].

    Factors are drawn per image as in torchvision's ColorJitter: brightness,
    contrast and saturation ~ U(max(0, 1 - s), 1 + s), hue turn ~ U(-hue, hue) of
    the colour wheel (hue <= 0.5). Applied in that order, clamped to [0, 1] once at
    the end.
    """
    n = images.shape[0]
    brightness_factor = _uniform((n,), max(0.0, 1 - brightness), 1 + brightness, images, generator)
    contrast_factor = _uniform((n,), max(0.0, 1 - contrast), 1 + contrast, images, generator)
    saturation_factor = _uniform((n,), max(0.0, 1 - saturation), 1 + saturation, images, generator)
    hue_turn = _uniform((n,), -hue, hue, images, generator)
    luma = _constant(_LUMA_WEIGHTS, images.dtype, images.device)
    # All four are linear in the pixel (contrast adds a per-image constant), so they
    # compose into one 3x3 matrix and one offset per image: a single pass over the
    # pixels instead of four, at the price of torchvision's clamp between steps.
    # Brightness and contrast scale every channel; saturation blends towards luma.
    eye = torch.eye(3, dtype=images.dtype, device=images.device)
    saturate = (
        saturation_factor[:, None, None] * eye
        + (1 - saturation_factor)[:, None, None] * luma.expand(3, 3)
    )  # (N, 3, 3); rows of luma.expand(3, 3) make every channel the luma
    matrix = (brightness_factor * contrast_factor)[:, None, None] * _hue_rotation(hue_turn) @ saturate
    # Contrast blends towards the image's mean luma (torchvision's definition), taken
    # after brightness; saturation and the hue turn leave grey unchanged.
    mean_luma = images.mean(dim=(2, 3)) @ luma  # (N,)
    offset = ((1 - contrast_factor) * brightness_factor * mean_luma)[:, None].expand(n, 3)
    return _mix_channels(images, matrix, offset).clamp_(0.0, 1.0)


def check_blur_fits(max_sigma: float, size_px: int) -> int:
    """The blur kernel's radius, ceil(3 * max_sigma); UserError unless it fits `size_px` images (mirrored edges)."""
    radius = math.ceil(3 * max_sigma)
    if radius >= size_px:
        raise UserError(
            f"augment blur_sigma={max_sigma}: the {2 * radius + 1}-pixel kernel does not fit "
            f"{size_px}x{size_px} images; use a smaller blur_sigma"
        )
    return radius


def gaussian_blur(images: Tensor, max_sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Blur each image with its own Gaussian, sigma ~ U(0, max_sigma) pixels. images: (N, 3, H, W) float.

    Separable: one horizontal and one vertical pass of a (2r + 1)-tap kernel,
    r = ceil(3 * max_sigma), as grouped convolutions over all N * 3 channels at once;
    edges are mirrored. sigma 0 is the identity (the kernel is a unit impulse).
    """
    n, c, h, w = images.shape
    radius = check_blur_fits(max_sigma, min(h, w))
    sigma = _uniform((n,), 0.0, max_sigma, images, generator).clamp_min(1e-3)  # (N,); 1e-3 px is an impulse
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)  # (N, 2r + 1)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N * 3, 2r + 1)
    flat = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)  # along each row
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)  # along each column
    return flat.reshape(n, c, h, w).clamp_(0.0, 1.0)


def gaussian_noise(images: Tensor, max_std: float, generator: torch.Generator | None = None) -> Tensor:
    """Add per-pixel Gaussian noise, standard deviation ~ U(0, max_std) per image, clamped to [0, 1].

    images: (N, 3, H, W) float in [0, 1]. The noise is drawn on the generator's
    device, so give a generator on the images' device for GPU batches.
    """
    std = _uniform((images.shape[0], 1, 1, 1), 0.0, max_std, images, generator)
    noise = torch.randn(images.shape, generator=generator, device=_draw_device(images, generator))
    return (images + std * noise.to(device=images.device, dtype=images.dtype)).clamp_(0.0, 1.0)


def _hue_rotation(hue_turn: Tensor) -> Tensor:
    """(N, 3, 3) RGB matrices that turn chroma by hue_turn (fractions of a circle) around the grey axis.

    A rotation of the I-Q plane of YIQ rather than an HSV hue shift: it is linear,
    so it fuses with the other colour factors into one matrix, where HSV needs a
    per-pixel branchy conversion both ways; it also keeps luma fixed. For the small
    turns used in training the two look alike. Written as I + (change) so a zero
    turn is exactly the identity.
    """
    yiq_from_rgb = _constant(_YIQ_FROM_RGB, torch.float64, hue_turn.device)
    rgb_from_yiq = _constant(_RGB_FROM_YIQ, torch.float64, hue_turn.device)
    angle = 2 * math.pi * hue_turn.double()
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    # Rotation of (I, Q) minus the identity; the Y row and column stay zero.
    rotation_change = torch.stack(
        [
            torch.stack([zero, zero, zero], dim=-1),
            torch.stack([zero, cos - 1, -sin], dim=-1),
            torch.stack([zero, sin, cos - 1], dim=-1),
        ],
        dim=-2,
    )  # (N, 3, 3)
    change = rgb_from_yiq @ rotation_change @ yiq_from_rgb
    return (torch.eye(3, dtype=torch.float64, device=hue_turn.device) + change).to(hue_turn.dtype)


def _rotate_and_zoom(
    images: Tensor, window_px: int, rotate_deg: float, scale: float, generator: torch.Generator | None
) -> Tensor:
    """Each image turned by ~U(-rotate_deg, rotate_deg) and zoomed by ~U(1 - scale, 1 + scale) about its centre.

    images: (N, C, H, W) float. Returns the centre window_px square of each
    transformed image, (N, C, window_px, window_px): one bilinear grid_sample
    reads it from the whole patch, so a turned window takes real tissue from the
    patch's margin and mirrors only what lies beyond the patch. Zoom > 1 magnifies.
    """
    n = images.shape[0]
    angle = _uniform((n,), -math.radians(rotate_deg), math.radians(rotate_deg), images, generator)
    zoom = _uniform((n,), 1 - scale, 1 + scale, images, generator)
    return _turned_window(images, window_px, angle, zoom)


def _turned_window(images: Tensor, window_px: int, angle: Tensor, zoom: Tensor) -> Tensor:
    """The centre window_px square of each image turned by angle (radians, (N,)) and zoomed by zoom ((N,))."""
    n, _, height_px, width_px = images.shape
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output coordinates in [-1, 1] (the window) to input ones (the
    # patch). In pixels about the centre, input = rotation @ output / zoom; the
    # window / side factors convert between the two normalised scales.
    along_x = window_px / (width_px * zoom)
    along_y = window_px / (height_px * zoom)
    # The window turns about the centre of the whole-pixel centre crop (_centre_crop,
    # the test-time views), half a pixel off the patch's centre when 96 - window is odd.
    to_x = torch.full_like(angle, ((width_px - window_px) // 2 + window_px / 2 - width_px / 2) * 2 / width_px)
    to_y = torch.full_like(angle, ((height_px - window_px) // 2 + window_px / 2 - height_px / 2) * 2 / height_px)
    theta = torch.stack(
        [torch.stack([cos * along_x, -sin * along_x, to_x], dim=-1),
         torch.stack([sin * along_y, cos * along_y, to_y], dim=-1)],
        dim=-2,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, images.shape[1], window_px, window_px], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _mix_channels(images: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """Per-image affine map of the channels: out[n, i] = sum_j matrix[n, i, j] * images[n, j] + offset[n, i]."""
    return torch.einsum("nij,njhw->nihw", matrix, images) + offset[:, :, None, None]


def _dihedral(images: Tensor, k: int) -> Tensor:
    """The k-th square symmetry (0 <= k < 8): rotate by (k % 4) * 90 degrees, then mirror if k >= 4."""
    rotated = torch.rot90(images, k % 4, dims=(-2, -1))
    return rotated.flip(-1) if k >= 4 else rotated


def _random_dihedral_index(
    n: int, size_px: int, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """(n, size_px**2) flat source pixel of each output pixel, for one random symmetry per image.

    A gather with these indices beat the alternatives on 2 busy CPU cores for 256
    patches of 3x96x96 (uint8 / float32): 42 / 38 ms, against 124-137 / 172 ms for
    three torch.where passes (transpose, flip, flip), 282-424 / 46 ms for grouping
    the batch by symmetry and 281-416 / 736 ms for stacking all 8 views and picking
    one (benchmarks/augment_speed.py).
    """
    pixel_index = torch.arange(size_px * size_px, device=like.device).view(1, 1, size_px, size_px)
    index_by_view = torch.stack([_dihedral(pixel_index, k).flatten() for k in range(8)])  # (8, size**2)
    return index_by_view[_randint(8, (n,), like, generator)]


def _shifted_crop_index(
    n: int, crop_px: int, window_px: int, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """(n, crop_px**2) flat index into a window_px square of a crop_px square placed at random per image."""
    offset_yx = _randint(window_px - crop_px + 1, (n, 2, 1), like, generator)  # top-left corner
    steps = torch.arange(crop_px, device=like.device)
    rows = offset_yx[:, 0] + steps  # (n, crop)
    cols = offset_yx[:, 1] + steps
    return (rows[:, :, None] * window_px + cols[:, None, :]).flatten(1)


def _spatial_source_index(
    config: AugmentConfig,
    n: int,
    out_px: int,
    window_px: int,
    like: Tensor,
    generator: torch.Generator | None,
) -> Tensor | None:
    """Flat index into the crop window of each output pixel after shift and dihedral, or None if neither is on."""
    index = None
    if config.shift_px:
        index = _shifted_crop_index(n, out_px, window_px, like, generator)
    if config.dihedral:
        dihedral_index = _random_dihedral_index(n, out_px, like, generator)
        # Output pixel p shows crop pixel dihedral_index[p], which sits at index[...] in the window.
        index = dihedral_index if index is None else index.gather(1, dihedral_index)
    return index


def _gather_pixels(images: Tensor, source_index: Tensor, out_px: int) -> Tensor:
    """Pick pixels per image: images (N, C, H, W), source_index (N, out_px**2) into H*W -> (N, C, out_px, out_px)."""
    n, channels = images.shape[:2]
    flat = images.reshape(n, channels, -1)
    picked = flat.gather(2, source_index[:, None, :].expand(n, channels, -1))
    return picked.view(n, channels, out_px, out_px)


def _centre_crop(images: Tensor, size_px: int) -> Tensor:
    """The centre size_px x size_px of each image (a view). images: (N, C, H, W)."""
    top = (images.shape[-2] - size_px) // 2
    left = (images.shape[-1] - size_px) // 2
    return images[..., top : top + size_px, left : left + size_px]


def _as_nchw(patches_uint8: Tensor) -> Tensor:
    """A (N, 3, H, W) view of a uint8 batch stored as (N, H, W, 3) or (N, 3, H, W)."""
    shape = tuple(patches_uint8.shape)
    if patches_uint8.dtype != torch.uint8 or len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise UserError(
            f"patches_uint8: expected a uint8 RGB batch (N, H, W, 3) or (N, 3, H, W), "
            f"found {patches_uint8.dtype} {shape}; pass the patches as read, before any "
            f"conversion to float"
        )
    return patches_uint8.permute(0, 3, 1, 2) if shape[3] == 3 else patches_uint8


def _crop_window_px(config: AugmentConfig, nchw_shape: torch.Size) -> int:
    """Side of the square centre window the crop (and its shift) may read from."""
    height_px, width_px = nchw_shape[-2:]
    if not config.crop_px:
        turned = [name for name in ("dihedral", "rotate_deg", "scale") if getattr(config, name)]
        if turned and height_px != width_px:
            raise UserError(
                f"patches_uint8: {' and '.join(turned)} augmentation needs square patches, found "
                f"{height_px}x{width_px}; set crop_px to crop a square, or turn {' and '.join(turned)} off"
            )
        return height_px
    window_px = config.crop_px + 2 * config.shift_px
    if window_px > min(height_px, width_px):
        raise UserError(
            f"augment crop_px={config.crop_px}, shift_px={config.shift_px}: the crop reads a "
            f"{window_px}-pixel window, but the patches are {height_px}x{width_px}; "
            f"choose crop_px + 2 * shift_px <= {min(height_px, width_px)}"
        )
    return window_px


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise UserError unless mean and std are 3 numbers each and std is positive."""
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3:
            raise UserError(
                f"{name}: expected 3 values (one per RGB channel), found {len(values)}; "
                f"pass the model's preprocessing {name}, e.g. from its run folder"
            )
    if min(std) <= 0:
        raise UserError(
            f"std: expected 3 positive values, found {tuple(std)}; pass the model's preprocessing "
            f"std (e.g. (0.229, 0.224, 0.225) for ImageNet weights)"
        )


def _normalise(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(images - mean) / std per channel, returned in channels_last memory format. images: (N, 3, H, W)."""
    scale = _constant(tuple(1 / s for s in std), images.dtype, images.device)
    shift = _constant(tuple(-m / s for m, s in zip(mean, std)), images.dtype, images.device)
    # One pass that normalises and writes channels_last, instead of two in-place
    # passes and a layout copy.
    normalised = torch.empty_like(images, memory_format=torch.channels_last)
    return torch.addcmul(shift.view(1, 3, 1, 1), images, scale.view(1, 3, 1, 1), out=normalised)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per values, dtype and device; never modify it in place.

    torch.tensor(..., device="cuda") copies from pageable host memory and then waits
    for the GPU to finish everything queued before it. Made on every augmentation
    step, such constants stalled GPU training: the CPU launched each step onto an
    idle GPU (resnet18's data path ran at 0.74 of pure compute on an H200, BENCHMARKS.md).
    """
    return torch.tensor(values, dtype=dtype, device=device)


def _draw_device(like: Tensor, generator: torch.Generator | None) -> torch.device:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor),
    # so one seed gives the same augmentations on CPU and GPU; the draws are a few
    # numbers per image, so moving them is cheap.
    return generator.device if generator is not None else like.device


def _uniform(
    shape: tuple[int, ...], low: float, high: float, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """U(low, high) samples on like's device and dtype; exactly `low` when low == high."""
    draws = torch.rand(shape, generator=generator, device=_draw_device(like, generator))
    return (low + (high - low) * draws).to(device=like.device, dtype=like.dtype)


def _randint(
    high: int, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Integers in [0, high) on like's device."""
    draws = torch.randint(high, shape, generator=generator, device=_draw_device(like, generator))
    return draws.to(like.device)
