"""Export a run to ONNX or TorchScript, with everything needed to use it beside the weights.

The exported graph takes what the PyTorch model takes, normalised float32 images
(N, 3, crop, crop) with a dynamic batch size N, and returns two outputs:
`logit` (N, 1), before calibration, and `prob_tumour` (N, 1) = sigmoid(logit /
temperature). The preprocessing that turns uint8 patches into those images (mean,
std, crop_px), the decision thresholds (one view's, and each TTA view count's) and
the calibration temperature travel with the model: in the ONNX file's
metadata_props, or as the extra file `histodetect.json` inside the TorchScript
archive (a JSON object of the same strings). Each value is JSON (see `ExportMetadata`).

Every export is checked before it is put in place: the exported model's
probabilities on a few dozen real patches must equal PyTorch's to within 1e-4.
`load_exported_run` makes an exported file look like a `LoadedRun`, so that
`predict` runs through ONNX Runtime unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .augment import preprocess_batch
from .data.decode import PATCH_SIZE_PX
from .data.store import is_store, open_store
from .errors import UserError
from .outputs import check_output_file
from .predict import (
    LoadedRun,
    check_threads,
    file_sha256,
    iter_inputs,
    load_run,
    predict_patches,
    run_folder,
    run_thresholds,
)
from .train import RUN_FILE, read_run

EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_FORMAT_VERSION = "histodetect-export-1"
TORCHSCRIPT_EXTRA_FILE = "histodetect.json"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logit", "prob_tumour")
# The contract the issue sets: fp32 probabilities within this of PyTorch's.
MAX_PROB_DIFF = 1e-4
CHECK_PATCH_COUNT = 64
# Opset 17 is the newest the TorchScript-based exporter writes without warnings and
# every onnxruntime >= 1.14 runs.
ONNX_OPSET = 17
# Real patches to check against when the run's store is gone: the shared data folder
# beside the repository (src/histodetect/export.py -> ../../../shared/data).
SHARED_PCAM_JPEG = Path(__file__).resolve().parents[3] / "shared" / "data" / "pcam-jpeg"


@dataclass(frozen=True)
class ExportMetadata:
    """What a consumer of the exported file needs besides the graph."""

    format: str  # EXPORT_FORMAT_VERSION
    mean: list[float]  # per RGB channel, of x / 255
    std: list[float]
    crop_px: int  # centre crop fed to the model; 0 = the whole patch
    patch_size_px: int
    input: str  # how to build the input from uint8 patches, in words
    threshold: float  # label 1 when prob_tumour >= threshold (chosen on validation, for this one view)
    temperature: float  # prob_tumour = sigmoid(logit / temperature)
    model: str
    preset: str | None
    data_fingerprint: str | None
    run: dict  # the run folder's run.json
    # Which weights and which histodetect made the file (best and last exports had the same
    # metadata); None in exports written before they were recorded, which are still read.
    checkpoint: str | None = None  # "best" or "last"
    weights_sha256: str | None = None  # of checkpoints/{checkpoint}.pt
    histodetect: str | None = None
    # For the mean prob_tumour of 1, 4, 8, 40 or 72 views (README, test-time augmentation),
    # calibrated as prob_tumour is: run.json's own "thresholds" are not, once calibrated.
    # None in exports made before it was written; read as run_thresholds(run).
    thresholds: dict[str, float] | None = None

    def to_strings(self) -> dict[str, str]:
        """Each field as a JSON string, as ONNX metadata_props holds them."""
        return {key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_strings(cls, props: dict[str, str], path: Path) -> ExportMetadata:
        missing = [name for name, spec in cls.__dataclass_fields__.items()
                   if name not in props and spec.default is MISSING]
        if missing or json.loads(props.get("format", "null")) != EXPORT_FORMAT_VERSION:
            raise UserError(
                f"{path}: not a histodetect export (metadata lacks {', '.join(missing) or 'the format tag'}); "
                "export it with 'histodetect export RUN'"
            )
        return cls(**{name: json.loads(props[name]) for name in cls.__dataclass_fields__ if name in props})


@dataclass
class ExportReport:
    path: Path
    format: str
    n_checked: int  # real patches the check ran on
    checked_on: str  # where they came from
    max_abs_prob_diff: float  # against PyTorch, fp32
    seconds: float
    metadata: ExportMetadata  # what travels with the graph


class CalibratedModel(nn.Module):
    """model -> (logit (N, 1), calibrated probability (N, 1)); what is exported."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.model(image)  # (N, 1)
        # 1 / (1 + exp(-z)), not torch.sigmoid: ONNX Runtime 1.32's CPU Sigmoid approximates
        # (0 for z <= -18, twice the true value at z = -17, not monotonic there), which
        # flipped 5 of 200 decisions of a 1-epoch seed-mobilenetv2 run whose threshold was
        # 2e-9; this form is within 1.5e-7 of the true value (relative) in ONNX Runtime too.
        return logit, torch.reciprocal(1 + torch.exp(-logit / self.temperature))


class CheckedInput(nn.Module):
    """The TorchScript archive's entry point: refuses an input the model was not made for.

    A CNN scores any size, so an uncropped 96 px patch gave probabilities 0.11 away from
    the cropped one's without a word; ONNX Runtime refuses it by the graph's input shape.
    """

    def __init__(self, model: nn.Module, side_px: int):
        super().__init__()
        self.model = model
        self.side_px = side_px

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side = self.side_px
        # Side by side, not shape[1:] != [3, side, side]: eagerly that compares a torch.Size with a
        # list, never equal, so that the module unscripted refused every input.
        if image.dim() != 4 or image.shape[1] != 3 or image.shape[2] != side or image.shape[3] != side:
            raise ValueError("image: expected (N, 3, {}, {}), channels first, the side histodetect.json's crop_px "
                             "gives; found {}".format(side, side, list(image.shape)))
        if image.dtype != torch.float32:  # TorchScript prints a dtype as a number: not worth showing
            raise ValueError("image: expected float32 values, (x / 255 - mean) / std (see histodetect.json); "
                             "found another dtype")
        return self.model(image)


class ExportedModel:
    """An exported file, loaded: ONNX through ONNX Runtime, TorchScript through torch.jit."""

    def __init__(self, path: Path, threads: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file; export one with 'histodetect export RUN --out {self.path}'")
        self.format = "onnx" if self.path.suffix == ".onnx" else "torchscript"
        if self.format == "onnx":
            import onnxruntime as ort
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            try:
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except (InvalidProtobuf, InvalidGraph, Fail) as exc:
                raise UserError(f"{self.path}: not a readable ONNX model ({type(exc).__name__}); export it again") from None
            props = self._session.get_modelmeta().custom_metadata_map
        else:
            extra = {TORCHSCRIPT_EXTRA_FILE: ""}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation: see _write_torchscript
                    self._module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra).eval()
            except RuntimeError as exc:
                raise UserError(f"{self.path}: not a TorchScript archive ({str(exc).splitlines()[0]}); "
                                "export it with 'histodetect export RUN --format torchscript'") from None
            props = json.loads(extra[TORCHSCRIPT_EXTRA_FILE] or "{}")
        self.metadata = ExportMetadata.from_strings(props, self.path)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 images (N, 3, H, W) -> (logit (N, 1), prob_tumour (N, 1))."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.format == "onnx":
            logit, prob = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
            return logit, prob
        with torch.inference_mode():
            logit, prob = self._module(torch.from_numpy(images))
        return logit.numpy(), prob.numpy()

    def images(self, patches_uint8: np.ndarray) -> np.ndarray:
        """uint8 patches (N, 96, 96, 3) -> the model's input (N, 3, crop, crop), from the file's metadata."""
        meta = self.metadata
        x = preprocess_batch(torch.from_numpy(np.ascontiguousarray(patches_uint8)), meta.mean, meta.std,
                             crop_px=meta.crop_px)
        return x.contiguous().numpy()

    def probabilities(self, patches_uint8: np.ndarray) -> np.ndarray:
        """Calibrated probability of tumour (N,) for uint8 patches (N, 96, 96, 3)."""
        return self(self.images(patches_uint8))[1][:, 0]


class ExportedLogits(nn.Module):
    """An `ExportedModel` as the nn.Module `predict` calls: normalised images -> logits (N, 1)."""

    def __init__(self, exported: ExportedModel):
        super().__init__()
        self.exported = exported

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logit, _ = self.exported(images.detach().cpu().numpy())
        return torch.from_numpy(logit).to(images.device)


def exported_path(path: Path) -> Path:
    """An exported file, or the run folder's default ONNX export (RUN/model.onnx)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"model{EXPORT_SUFFIXES['onnx']}"
        if not path.is_file():
            raise UserError(f"{path.parent}: no {path.name} in this run folder; "
                            f"run 'histodetect export {path.parent}' first, or pass the exported file")
    return path


def load_exported_run(path: Path, *, threads: int = 0) -> LoadedRun:
    """An exported file (or a run folder holding model.onnx) as a LoadedRun whose model runs the export.

    `predict_patches`, `predict_to_csv` and the rest of predict work on it unchanged;
    they run on the CPU.
    """
    exported = ExportedModel(exported_path(path), threads=check_threads(threads))
    meta = exported.metadata
    _check_export_is_current(exported.path, meta)
    return LoadedRun(
        run_dir=exported.path.parent.absolute(), model=ExportedLogits(exported), device=torch.device("cpu"),
        mean=tuple(meta.mean), std=tuple(meta.std), crop_px=meta.crop_px,
        thresholds={**_view_thresholds(meta), 1: meta.threshold},
        temperature=meta.temperature, config=meta.run.get("config", {}), run=meta.run, bf16=False,
        checkpoint=meta.checkpoint or "best", weights_sha256=file_sha256(exported.path),
    )


def _check_export_is_current(path: Path, meta: ExportMetadata) -> None:
    """Refuse an export its run folder has moved on from: calibrated or retrained after the export.

    The export carries its own temperature and thresholds; predicting with stale ones
    would silently disagree with `predict RUN`.
    """
    run_file = path.parent / RUN_FILE
    if not run_file.is_file():
        return  # an export on its own, away from its run: it is all there is
    try:
        current = read_run(path.parent)
    except UserError:
        return
    temperature_now = float((current.get("calibration") or {}).get("temperature", 1.0))
    changed = []
    if abs(temperature_now - meta.temperature) > 1e-9:
        changed.append(f"temperature {meta.temperature:.4g} in the export, {temperature_now:.4g} in {RUN_FILE}")
    if run_thresholds(current) != run_thresholds(meta.run):
        changed.append(f"its decision thresholds differ from {RUN_FILE}'s")
    if changed:
        raise UserError(f"{path}: older than its run ({'; '.join(changed)}: calibrated or retrained since); "
                        f"export it again with 'histodetect export {path.parent}'")


def _view_thresholds(meta: ExportMetadata) -> dict[int, float]:
    """The export's decision threshold by TTA view count (older exports: its run record's)."""
    if meta.thresholds is None:
        return run_thresholds(meta.run)
    return {int(views): float(t) for views, t in meta.thresholds.items()}


def _metadata(run: LoadedRun) -> ExportMetadata:
    computed_by = run.computed_by()
    return ExportMetadata(
        format=EXPORT_FORMAT_VERSION, mean=list(run.mean), std=list(run.std), crop_px=run.crop_px,
        patch_size_px=PATCH_SIZE_PX,
        input="uint8 RGB (N, 96, 96, 3) -> centre crop of crop_px (0 = none) -> float (x / 255 - mean) / std "
              "-> (N, 3, H, W) float32",
        threshold=run.threshold, temperature=run.temperature, model=run.config["model"],
        preset=run.run.get("preset"), data_fingerprint=run.run.get("data", {}).get("fingerprint"), run=run.run,
        checkpoint=run.checkpoint, weights_sha256=computed_by["weights_sha256"], histodetect=computed_by["histodetect"],
        thresholds={str(views): t for views, t in sorted(run.thresholds.items())},
    )


def check_patches(run: LoadedRun, check_data: Path | None = None,
                  n: int = CHECK_PATCH_COUNT) -> tuple[np.ndarray, str]:
    """(`n` real uint8 patches, where they came from) to compare the export with PyTorch on.

    From `check_data` (a store, image folder or h5 file) when given; else spread over
    the run's store; else the shared PCam sample beside the repository.
    """
    if check_data is None:
        store_path = Path(run.run.get("data", {}).get("path", ""))
        if store_path.name and is_store(store_path):
            store = open_store(store_path)
            rows = np.linspace(0, len(store) - 1, min(n, len(store))).astype(np.int64)
            return store.read_batch(np.unique(rows)), f"the run's store {store_path}"
        if not SHARED_PCAM_JPEG.is_dir():
            raise UserError(
                f"{run.run_dir}: its store {store_path} is gone and no shared data was found at {SHARED_PCAM_JPEG}; "
                "pass --check-data with a folder of real patches to check the export on"
            )
        check_data = SHARED_PCAM_JPEG / "valid"
    chunk = next(iter_inputs([Path(check_data)], chunk_size=n), None)
    if chunk is None or len(chunk.patches) == 0:
        raise UserError(f"--check-data {check_data}: holds no patches; pass a folder or store of real patches")
    return chunk.patches, str(check_data)


def _write_onnx(model: nn.Module, example: torch.Tensor, meta: ExportMetadata, path: Path) -> None:
    import onnx

    with warnings.catch_warnings():
        # torch >= 2.9 prefers its torch.export-based exporter, which needs the extra
        # onnxscript package; the TorchScript-based one writes the same graph for
        # these plain CNNs and still ships with torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        # A vision transformer's size checks become constants of the trace: the input's size is
        # fixed (the graph's input shape) and export_run checks the file on real patches.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
            opset_version=ONNX_OPSET, dynamo=False,
        )
    graph = onnx.load(str(path))
    for key, value in meta.to_strings().items():
        graph.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    graph.doc_string = (f"histodetect {meta.model}: {meta.input}; outputs logit and prob_tumour = "
                        f"sigmoid(logit / temperature), (N, 1) each; label 1 where prob_tumour >= threshold")
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _write_torchscript(model: nn.Module, example: torch.Tensor, meta: ExportMetadata, path: Path) -> None:
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream but is what `--format torchscript` means;
        # the archive loads in C++ (libtorch) and in any torch since 1.x.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # as in _write_onnx; CheckedInput fixes the size
        # check_trace=False: export_run checks the saved file on real patches instead.
        traced = torch.jit.trace(model, example, check_trace=False)
        # Scripted, not traced: a trace would keep the input check's branch as a constant.
        checked = torch.jit.script(CheckedInput(traced, example.shape[-1]))
        torch.jit.save(checked, str(path), _extra_files={TORCHSCRIPT_EXTRA_FILE: json.dumps(meta.to_strings())})


def export_run(run_dir: Path | str, *, format: str = "onnx", out: Path | None = None, check_data: Path | None = None,
               checkpoint: str = "best") -> ExportReport:
    """Export a run's weights to ONNX or TorchScript and check them against PyTorch.

    `out` defaults to RUN/model.onnx (or RUN/model.pt). The file is written beside
    `out` under a temporary name and renamed only when its probabilities on real
    patches equal PyTorch's to within MAX_PROB_DIFF.
    """
    start = time.perf_counter()
    if format not in EXPORT_FORMATS:
        raise UserError(f"--format {format!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    run_dir = run_folder(run_dir)
    suffix = EXPORT_SUFFIXES[format]
    out = Path(out) if out is not None else run_dir / f"model{suffix}"
    # A TorchScript .pt must not land on the run's checkpoints (best.pt holds the weights).
    # Checked before the suffix: `--out .` (a folder without a name) was a traceback there.
    check_output_file(out, example=f"model{suffix}", protect=[run_dir / "checkpoints"])
    if out.suffix != suffix:
        raise UserError(f"--out {out}: {format} exports are {suffix} files; name it e.g. {out.with_suffix(suffix).name}")
    run = load_run(run_dir, checkpoint=checkpoint, device="cpu", fp32=True)  # the exports run in float32
    patches, checked_on = check_patches(run, check_data)
    meta = _metadata(run)
    model = CalibratedModel(copy.deepcopy(run.model).to(memory_format=torch.contiguous_format), run.temperature).eval()
    side_px = run.crop_px or PATCH_SIZE_PX
    example = torch.randn(2, 3, side_px, side_px)  # batch 2; the check runs another batch size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{suffix}")
    try:
        try:
            (_write_onnx if format == "onnx" else _write_torchscript)(model, example, meta, tmp)
        except OSError as exc:
            raise UserError(f"{out}: cannot write it ({exc.strerror or exc})") from None
        except torch.onnx.errors.OnnxExporterError as exc:  # its message goes on with the whole graph
            raise UserError(f"{run_dir}: torch cannot export {meta.model} to ONNX ({str(exc).splitlines()[0]}); "
                            "export it with --format torchscript") from None
        try:
            exported = ExportedModel(tmp)
        except UserError:
            if format != "onnx":
                raise
            # e.g. eva02's rotary attention: torch writes a graph whose shapes ONNX Runtime rejects
            raise UserError(f"{run_dir}: ONNX Runtime cannot load the graph torch exports for {meta.model}; "
                            "export it with --format torchscript") from None
        diff = float(np.abs(exported.probabilities(patches) - predict_patches(run, patches)).max())
        if not diff < MAX_PROB_DIFF:
            # Not a user mistake: the exporter changed the function.
            raise RuntimeError(f"{format} export of {run_dir} differs from PyTorch by {diff:.2e} in probability "
                               f"(limit {MAX_PROB_DIFF:.0e}) on {len(patches)} patches from {checked_on}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, format, len(patches), checked_on, diff, time.perf_counter() - start, meta)
