"""Explain and know when to doubt: class activation maps, overlays, temperature scaling.

`explain_patches` is the one call behind `histodetect explain` and the web
service's overlays: CAMs of the tumour logit, the calibrated probability and
overlay images. `calibrate_run` fits and stores temperature scaling. The
per-patch uncertainty (TTA and MC-dropout spread, predictive entropy) lives in
`histodetect.predict`, whose CSV columns need it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.decode import PATCH_SIZE_PX
from ..outputs import check_output_folder, naming_write_errors, unique_name
from ..predict import LoadedRun, check_patches, check_run, input_paths, open_inputs, predict_patches, sample_probabilities
from ..train import bf16_is_fast
from .calibration import (
    calibrate_run,
    calibrated_threshold,
    fit_temperature,
    nll_at_temperature,
)
from .cams import (
    CAM_METHODS,
    DEFAULT_CAM_LAYERS,
    cam_from_activations,
    centre_fraction,
    check_cam_method,
    class_activation_maps,
    default_cam_layer,
    feature_map_layers,
    resolve_cam_layer,
    upsample_to_patch,
)
from .overlays import (
    OVERLAY_SCALE,
    SHEET_COLUMNS,
    SHEET_ROWS,
    contact_sheets,
    render_overlays,
)

__all__ = [
    "CAM_METHODS", "DEFAULT_CAM_LAYERS", "OVERLAY_SCALE", "CamResult", "ExplainReport", "calibrate_run",
    "calibrated_threshold", "cam_from_activations", "centre_fraction", "check_cam_method", "class_activation_maps",
    "contact_sheets", "default_cam_layer", "explain_patches", "feature_map_layers", "fit_temperature",
    "nll_at_temperature", "render_overlays", "resolve_cam_layer", "upsample_to_patch", "write_explanations",
]

EXPLANATIONS_CSV = "explanations.csv"
EXPLAIN_JSON = "explain.json"
# Patches explained and written at a time: 5 full contact sheets, ~60 MB of overlays at scale 3.
_CHUNK_PATCHES = 5 * SHEET_COLUMNS * SHEET_ROWS


@dataclass
class CamResult:
    """Class activation maps of a batch of patches, with what a viewer needs to show them."""

    cams: np.ndarray  # (N, 96, 96) float32 in [0, 1], over the whole patch (0 outside a centre crop)
    # (N,) float64 calibrated probability of tumour, as predict gives it: float32 could round a patch
    # on the decision threshold to the other side of it
    probs: np.ndarray
    overlays: np.ndarray  # (N, 96 * OVERLAY_SCALE, 96 * OVERLAY_SCALE, 3) uint8
    layer: str  # the layer the maps were taken at

    def __repr__(self) -> str:  # the dataclass's printed thousands of numbers in a notebook
        def shape(array: np.ndarray) -> str:
            return f"{array.dtype} {tuple(array.shape)}"

        return (f"CamResult(cams={shape(self.cams)}, probs={shape(self.probs)}, overlays={shape(self.overlays)}, "
                f"layer={self.layer!r})")


def explain_patches(run: LoadedRun, patches_uint8: np.ndarray, *, method: str = "gradcam",
                    layer: str | None = None) -> CamResult:
    """CAMs of the tumour logit for uint8 patches (N, 96, 96, 3), their probabilities and overlay images.

    `method` is one of CAM_METHODS; `layer` a module name of the model (default:
    DEFAULT_CAM_LAYERS for its family). A wrong layer is a UserError listing the
    valid ones.
    """
    run = check_run(run)
    patches_uint8 = check_patches(patches_uint8)
    cams, logits, layer_name = class_activation_maps(
        run.model, patches_uint8, mean=run.mean, std=run.std, crop_px=run.crop_px, device=run.device,
        method=method, layer=layer)
    if run.bf16 and bf16_is_fast(run.device):
        # The maps are float32; the probability shown is the one predict gives (bf16 autocast).
        probs = predict_patches(run, patches_uint8)
    else:
        probs = sample_probabilities(logits, run.temperature)
    return CamResult(cams=cams, probs=probs, overlays=render_overlays(patches_uint8, cams, probs), layer=layer_name)


@dataclass
class ExplainReport:
    out: Path
    n_patches: int
    method: str
    layer: str
    sheets: list[Path] = field(default_factory=list)


def _file_stem(patch_id: str, taken: set[str]) -> str:
    """A file name for a patch id (ids may hold folders or odd characters), unique within the output."""
    return unique_name(re.sub(r"[^A-Za-z0-9._-]+", "_", patch_id).strip("._") or "patch", taken)


def check_explain_out(out: Path, run_dir: Path) -> None:
    """`out` must be new, empty or an earlier explain output, and makeable; never the run or the working folder."""
    check_output_folder(out, "--out", lambda folder: (folder / EXPLANATIONS_CSV).is_file(), keep=[run_dir])


def write_explanations(run: LoadedRun, inputs: Path | str | list[Path | str], out: Path | str, *, method: str = "gradcam",
                       layer: str | None = None, split: str | None = None, resize: bool = False,
                       progress: bool = True) -> ExplainReport:
    """Write one overlay PNG per patch of `inputs`, contact sheets when there are several, and explanations.csv.

    explanations.csv has `id,prob,pred,cam_centre_fraction,overlay` (the share of
    the map inside the centre 32x32, and the overlay's file name); explain.json
    names the run, method and layer. Everything is written to a temporary folder
    that replaces `out` when complete; an `out` that holds anything but an
    earlier explain output is refused. `inputs` is one path or a list of them.
    """
    run = check_run(run)
    inputs = input_paths(inputs)
    out = Path(out)
    check_explain_out(out, run.run_dir)
    # A wrong method or layer is reported before anything is decoded or written.
    check_cam_method(method)
    layer = resolve_cam_layer(run.model, layer, run.crop_px or PATCH_SIZE_PX)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    with naming_write_errors(out):
        try:
            rows, taken, sheets, layer_name = [], set(), [], None
            total, chunks = open_inputs(inputs, split=split, resize=resize, chunk_size=_CHUNK_PATCHES)
            with tqdm(total=total, unit="patch", desc="explain", disable=not progress) as bar:
                for chunk in chunks:
                    result = explain_patches(run, chunk.patches, method=method, layer=layer)
                    layer_name = result.layer
                    fractions = centre_fraction(result.cams)
                    for patch_id, overlay, prob, fraction in zip(chunk.ids, result.overlays, result.probs, fractions):
                        name = _file_stem(str(patch_id), taken) + ".png"
                        Image.fromarray(overlay).save(partial / name)
                        rows.append((patch_id, f"{prob:.6f}", int(prob >= run.threshold), f"{fraction:.4f}", name))
                    # Chunks hold whole sheets, so the sheets of one chunk never need the next one's overlays.
                    for sheet in contact_sheets(result.overlays, [str(i) for i in chunk.ids]) if total > 1 else []:
                        sheets.append(out / f"contact_sheet-{len(sheets) + 1:02d}.png")
                        sheet.save(partial / sheets[-1].name)
                    bar.update(len(chunk.ids))
            with (partial / EXPLANATIONS_CSV).open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(("id", "prob", "pred", "cam_centre_fraction", "overlay"))
                writer.writerows(rows)
            # The inputs as absolute paths: as typed ('few') they named whatever the working folder held.
            (partial / EXPLAIN_JSON).write_text(json.dumps({
                **run.computed_by(), "method": method, "layer": layer_name, "n": len(rows),
                "temperature": run.temperature, "threshold": run.threshold, "overlay_scale": OVERLAY_SCALE,
                "inputs": [str(path.resolve()) for path in inputs], "split": split,
            }, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return ExplainReport(out=out, n_patches=len(rows), method=method, layer=layer_name or "", sheets=sheets)
