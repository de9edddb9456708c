"""Overlay images a pathologist reads: the patch, the map over it, the labelled centre, the probability.

Each overlay is the patch enlarged `OVERLAY_SCALE` times (nearest neighbour, so
tissue pixels stay crisp), the class activation map blended over it in the
`jet` colours with an opacity that grows with the map (where the model did not
look, the tissue shows as it is), the centre 32x32 square that PCam's label
refers to outlined in white, and the calibrated probability of tumour printed
in the top-left corner. Contact sheets lay many overlays out in a grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from ..data.synthetic import CENTRE_SIZE_PX, CENTRE_START_PX

# 3x: a 96 px patch becomes 288 px, where an 18 px label is legible and still
# covers only the corner of the tissue.
OVERLAY_SCALE = 3
OUTLINE_RGB = (255, 255, 255)  # pure white: the blend of the map and the tissue never reaches it
MAX_CAM_OPACITY = 0.6  # opacity of the map where it is 1; the tissue stays visible under the hottest spot
SHEET_COLUMNS = 6
SHEET_ROWS = 8  # 48 overlays per contact sheet, 1728 x 2480 px at scale 3
_CAPTION_PX = 22


def _font(size_px: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size_px)


def blend_cams(patches_uint8: np.ndarray, cams: np.ndarray, scale: int = OVERLAY_SCALE) -> np.ndarray:
    """Patches (N, 96, 96, 3) uint8 and maps (N, 96, 96) in [0, 1] -> (N, 96*scale, 96*scale, 3) uint8."""
    big_patches = patches_uint8.repeat(scale, axis=1).repeat(scale, axis=2).astype(np.float32)
    big_cams = F.interpolate(torch.from_numpy(np.ascontiguousarray(cams, dtype=np.float32))[:, None],
                             scale_factor=scale, mode="bilinear", align_corners=False)[:, 0].numpy()
    big_cams = np.clip(big_cams, 0.0, 1.0)
    heat_rgb = colormaps["jet"](big_cams)[..., :3].astype(np.float32) * 255  # (N, H, W, 3)
    opacity = MAX_CAM_OPACITY * big_cams[..., None]
    return np.rint((1 - opacity) * big_patches + opacity * heat_rgb).astype(np.uint8)


def outline_centre(overlays: np.ndarray, scale: int = OVERLAY_SCALE) -> np.ndarray:
    """Draw, in place, the centre square's border on overlays (N, 96*scale, 96*scale, 3): one patch pixel
    wide, on the square's own first and last pixels (32 and 63), so the outlined area is exactly the labelled one."""
    first, last = CENTRE_START_PX * scale, (CENTRE_START_PX + CENTRE_SIZE_PX) * scale  # [first, last)
    overlays[:, first : first + scale, first:last] = OUTLINE_RGB
    overlays[:, last - scale : last, first:last] = OUTLINE_RGB
    overlays[:, first:last, first : first + scale] = OUTLINE_RGB
    overlays[:, first:last, last - scale : last] = OUTLINE_RGB
    return overlays


def label_probability(overlay: np.ndarray, prob_tumour: float, scale: int = OVERLAY_SCALE) -> np.ndarray:
    """Print `p(tumour) 0.93` on a dark box in the overlay's top-left corner; returns a new image."""
    image = Image.fromarray(overlay)
    draw = ImageDraw.Draw(image)
    text = f"p(tumour) {prob_tumour:.2f}"
    font = _font(6 * scale)
    _, _, right, bottom = draw.textbbox((scale, scale), text, font=font)
    draw.rectangle((0, 0, right + scale, bottom + scale), fill=(0, 0, 0))
    draw.text((scale, scale), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def render_overlays(patches_uint8: np.ndarray, cams: np.ndarray, probs: np.ndarray,
                    scale: int = OVERLAY_SCALE) -> np.ndarray:
    """The overlays (N, 96*scale, 96*scale, 3) uint8: map blended over the patch, centre outlined, probability printed."""
    overlays = outline_centre(blend_cams(patches_uint8, cams, scale), scale)
    if not len(overlays):
        return overlays
    return np.stack([label_probability(overlay, float(p), scale) for overlay, p in zip(overlays, probs)])


def contact_sheets(overlays: np.ndarray, captions: list[str], columns: int = SHEET_COLUMNS,
                   rows: int = SHEET_ROWS) -> list[Image.Image]:
    """Lay overlays out in grids of `columns` x `rows`, each with its caption (e.g. the patch id) below it."""
    per_sheet = columns * rows
    sheets = []
    for first in range(0, len(overlays), per_sheet):
        tiles = overlays[first : first + per_sheet]
        n_columns = min(columns, len(tiles))
        n_rows = math.ceil(len(tiles) / n_columns)
        tile_h, tile_w = tiles.shape[1:3]
        sheet = Image.new("RGB", (n_columns * tile_w, n_rows * (tile_h + _CAPTION_PX)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        font = _font(_CAPTION_PX - 8)
        for index, (tile, caption) in enumerate(zip(tiles, captions[first : first + per_sheet])):
            x, y = (index % n_columns) * tile_w, (index // n_columns) * (tile_h + _CAPTION_PX)
            sheet.paste(Image.fromarray(tile), (x, y))
            while len(caption) > 1 and draw.textlength(caption, font=font) > tile_w - 8:
                caption = caption[:-2] + "…"  # long ids keep their start, which usually names them
            draw.text((x + 4, y + tile_h + 3), caption, fill=(0, 0, 0), font=font)
        sheets.append(sheet)
    return sheets
