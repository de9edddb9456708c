"""What `augment_batch` does to a training batch: `AugmentConfig`, plain data checked where it is made."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError


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
                # Named as the flag of the same TrainConfig field: `train --hue 0.7` said "augment hue".
                raise UserError(
                    f"--{name.replace('_', '-')} {value}: expected a value in [{low}, {high}]; "
                    f"pass a value in that range (0 turns it off)"
                )
        if self.shift_px and not self.crop_px:
            raise UserError(
                f"--shift-px {self.shift_px}: the shift moves the crop window, but --crop-px is 0; "
                f"set --crop-px (e.g. 64) or --shift-px 0"
            )
