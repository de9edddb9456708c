"""load_run(): a run folder's weights as a LoadedRun, with the preprocessing, decision
thresholds and calibration temperature its run.json holds, each checked as it is read."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..augment import check_tta, tta_view_counts
from ..data.decode import PATCH_SIZE_PX
from ..errors import UserError, check_int
from ..models import create_model
from ..presets import MAX_THREADS
from ..train import (
    RUN_FILE,
    Dist,
    bf16_is_fast,
    feed_digest,
    load_checkpoint,
    read_run,
    resolve_device,
)


@dataclass
class LoadedRun:
    """A trained model ready to score patches, with the preprocessing its weights expect."""

    run_dir: Path
    model: torch.nn.Module
    device: torch.device
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_px: int
    temperature: float  # logits are divided by it (1.0 = uncalibrated)
    config: dict
    run: dict
    # bf16 autocast where it is fast (`train.bf16_is_fast`: CUDA, CPUs with AMX or
    # AVX512-BF16), as in training; probabilities move by up to ~1e-2. False: float32.
    bf16: bool = True
    # Decision thresholds chosen on validation, by TTA view count (`run_thresholds`);
    # always holds 1. Runs trained before 4 and 8 had their own use the 1-view one.
    thresholds: dict[int, float] = field(default_factory=lambda: {1: 0.5})
    checkpoint: str = "best"  # the run's checkpoints/{checkpoint}.pt holds the weights
    # Of the weights file as it was loaded (load_run, load_exported_run); None: hashed when asked.
    weights_sha256: str | None = None

    def __repr__(self) -> str:  # the dataclass's would print the whole network and run.json
        name = self.config.get("model", type(self.model).__name__)
        thresholds = {views: round(t, 4) for views, t in sorted(self.thresholds.items())}
        return (f"LoadedRun({str(self.run_dir)!r}, model={name!r}, device={str(self.device)!r}, "
                f"crop_px={self.crop_px}, shift_px={self.shift_px}, bf16={self.bf16}, "
                f"temperature={self.temperature:.4g}, thresholds={thresholds})")

    def computed_by(self) -> dict:
        """What computes this run's scores, for an output to record so that a number can be traced
        months later: the package, the run, the SHA-256 of the weights file (the run folder may have
        been trained again since), the device, and the precision used, which moves probabilities by
        up to ~1e-2 (bf16 only where `bf16_is_fast`; an export is always float32)."""
        exported = getattr(self.model, "exported", None)
        weights = exported.path if exported is not None else self.run_dir / "checkpoints" / f"{self.checkpoint}.pt"
        return {"histodetect": __version__, "run": str(self.run_dir), "run_started": self.run.get("started"),
                "weights": str(weights.resolve()), "weights_sha256": self.weights_sha256 or file_sha256(weights),
                "device": self.device.type,
                "threads": torch.get_num_threads() if exported is None else None,  # torch's CPU threads
                "bf16_autocast": bool(self.bf16 and bf16_is_fast(self.device))}

    @property
    def threshold(self) -> float:
        """The decision threshold for one view (0.5 until one was chosen)."""
        return self.thresholds[1]

    @property
    def shift_px(self) -> int:
        """How far training moved its crop: 40 and 72 test-time views move it as far."""
        return int(self.config.get("shift_px", 0) or 0)

    def threshold_for(self, tta: int) -> float:
        """The decision threshold chosen on validation for predictions averaged over `tta` views.

        A run trained before a view count had its own uses the largest smaller count's.
        """
        return self.thresholds[max((n for n in self.thresholds if n <= tta), default=1)]

    @property
    def tta_choices(self) -> tuple[int, ...]:
        """The test-time view counts this run can make: 40 and 72 need a shifted training crop."""
        return tta_view_counts(self.crop_px, self.shift_px)

    def check_tta(self, tta: int) -> None:
        """Raise UserError unless this run can make `tta` test-time views (`augment.check_tta`)."""
        check_tta(tta, self.crop_px, self.shift_px, str(self.run_dir))


def run_thresholds(run: dict, *, calibrated: bool = True, where: str = RUN_FILE) -> dict[int, float]:
    """run.json's decision thresholds by TTA view count, moved by the temperature when calibrated.

    Temperature scaling moves every probability, so a threshold chosen on the
    uncalibrated ones moves with it (`calibrate_run` stores where they land):
    without TTA, every patch gets the same decision as before calibrating.
    `calibrated=False` gives the thresholds chosen at the end of training.
    """
    source = (run.get("calibration") if calibrated else None) or run
    try:
        thresholds = {int(views): float(t) for views, t in (source.get("thresholds") or {}).items()}
        thresholds.setdefault(1, float(source.get("threshold", 0.5)))
    except (TypeError, ValueError, AttributeError):  # a hand-edited run.json
        raise UserError(f"{where}: its decision thresholds are not numbers by view count; "
                        "restore the file or train the run again") from None
    outside = {views: t for views, t in thresholds.items() if not 0 <= t <= 1}
    if outside:
        raise UserError(f"{where}: thresholds {outside} are not probabilities in [0, 1]; restore the file")
    return thresholds


def check_run(run: LoadedRun) -> LoadedRun:
    """`run` as the functions that score with it take it: a LoadedRun. A notebook's usual slip,
    the run folder's path, is refused saying how to load it."""
    if isinstance(run, LoadedRun):
        return run
    if isinstance(run, (str, os.PathLike)):
        raise UserError(f"run: expected a LoadedRun, found the path {str(run)!r}; load it first: "
                        f"run = load_run({str(run)!r})")
    raise UserError(f"run: expected a LoadedRun (run = load_run(RUN_DIR)), found {type(run).__name__}")


def run_folder(run_dir: Path | str) -> Path:
    """`run_dir` as the functions that open a run folder take it: a path. A LoadedRun is refused naming its folder."""
    if isinstance(run_dir, LoadedRun):
        raise UserError(f"run_dir: expected a run folder's path, found a LoadedRun; pass its folder, "
                        f"run.run_dir ({run_dir.run_dir})")
    if not isinstance(run_dir, (str, os.PathLike)):
        raise UserError(f"run_dir: expected a run folder's path, found {type(run_dir).__name__}")
    return Path(run_dir)


def check_threads(threads: int) -> int:
    """`threads` (torch's or ONNX Runtime's CPU threads; 0: one per core) as an int, or a UserError naming --threads."""
    threads = check_int("--threads", threads)
    if not 0 <= threads <= MAX_THREADS:
        raise UserError(f"--threads {threads}: expected a count in [0, {MAX_THREADS}] (0: one per core)")
    return threads


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (hashlib.file_digest is Python 3.11's)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        feed_digest(digest, handle)
    return digest.hexdigest()


def load_run(run_dir: Path | str, *, checkpoint: str = "best", device: str = "auto", threads: int = 0,
             fp32: bool = False) -> LoadedRun:
    """Load a run folder's `best` (or `last`) weights for inference; `fp32` turns bf16 autocast off.

    The LoadedRun's `run_dir` is absolute, so that it still names the run after an `os.chdir`.
    """
    run_dir = run_folder(run_dir).absolute()
    threads = check_threads(threads)
    run = read_run(run_dir)
    digest = hashlib.sha256()
    state = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt", digest=digest)
    config = state["config"]
    pre = state["preprocessing"]
    model = create_model(config["model"], drop_rate=config["drop_rate"],
                         input_size_px=int(pre["crop_px"]) or PATCH_SIZE_PX)
    key = "model" if checkpoint == "best" or state.get("ema") is None else "ema"
    weights = state[key]
    if key == "ema":  # timm's EMA wraps the model as `module`
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # torch lists every mismatched tensor; the first names the problem
        first = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise UserError(
            f"{run_dir / 'checkpoints' / f'{checkpoint}.pt'}: its weights do not fit {config['model']} as this "
            f"histodetect builds it ({first.rstrip('.')}); use the histodetect version that trained it, or train again"
        ) from None
    if threads:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device, Dist())
    model.to(torch_device).eval().to(memory_format=torch.channels_last)
    calibration = run.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise UserError(f"{run_dir / RUN_FILE}: 'calibration' is not a record; run 'histodetect calibrate' again")
    thresholds = run_thresholds(run, where=str(run_dir / RUN_FILE))  # moved by the temperature when calibrated
    if "threshold" not in run and "thresholds" not in run:  # still training, or stopped before its last step
        warnings.warn(f"{run_dir}: its training has not finished (the decision thresholds are chosen at its end), so "
                      f"it decides at 0.5; once it is not training, 'histodetect train --resume {run_dir}' finishes it",
                      stacklevel=2)
    run_thresholds(run, calibrated=False, where=str(run_dir / RUN_FILE))  # checked here: evaluate and calibrate read them
    return LoadedRun(
        run_dir=run_dir, model=model, device=torch_device, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
        crop_px=int(pre["crop_px"]), thresholds=thresholds,
        temperature=_temperature(calibration, run_dir), config=config, run=run, bf16=not fp32,
        checkpoint=checkpoint, weights_sha256=digest.hexdigest(),
    )


def _temperature(calibration: dict, run_dir: Path) -> float:
    try:
        temperature = float(calibration.get("temperature", 1.0))
    except (TypeError, ValueError):
        temperature = math.nan
    if not 0 < temperature < math.inf:
        raise UserError(f"{run_dir / RUN_FILE}: calibration temperature {calibration.get('temperature')!r} is not "
                        "a positive number; run 'histodetect calibrate' again")
    return temperature
