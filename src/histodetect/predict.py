"""load_run(), predict_patches(): a trained run applied to patches from any input.

Inputs are a store, an image folder (any reader format), image files or a PCam
h5 file; output is a CSV `id,prob,pred` (or Kaggle's `id,label`), written to a
temporary file and renamed. Asked for, each patch also gets its uncertainty:
the spread of its probability over the 8 dihedral views (TTA) and over
MC-dropout passes, and its predictive entropy; `review_above` sends the
uncertain ones to a pathologist.

Uncertainty sampling lives here, not in `explain`, because predict's columns
need it and imports flow down the pipeline (explain imports predict).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .augment import check_tta, tta_view_counts, tta_view_groups
from .data.decode import IMAGE_SUFFIXES
from .data.folder import list_image_files
from .data.formats import open_source
from .data.record import UNLABELLED, read_chunk
from .data.store import is_store, open_store
from .errors import UserError
from .models import create_model
from .outputs import check_output_file, write_file_atomic
from .train import (
    RUN_FILE,
    Dist,
    bf16_is_fast,
    load_checkpoint,
    model_logits,
    read_run,
    resolve_device,
)

# Measured in benchmarks/predict_speed.py on the 2-core CPU (BENCHMARKS.md): bf16
# autocast on its AMX units, inference_mode, channels_last and batches of 256 score
# patches 2-3x faster than timm's eager fp32 model called on batches of 64; float32
# alone (--fp32) gained only 0.9-1.3x there.
DEFAULT_BATCH_SIZE = 256

# Per-patch uncertainty columns of `predict_to_csv`, all "higher = more doubt":
# closeness to the decision threshold (see `uncertainty_measures`), predictive
# entropy of the mean probability in bits (0 = certain, 1 = a coin toss), and the
# standard deviation of the probability over the dihedral views (TTA) and over
# the MC-dropout passes.
UNCERTAINTY_COLUMNS = {"doubt": "doubt", "entropy": "entropy_bits", "tta_sd": "prob_sd_tta", "mc_sd": "prob_sd_mc"}
# The uncertainty `--review-above` compares with and `evaluate` triages by: how
# close the probability is to the decision threshold, where a decision is least
# sure. benchmarks/uncertainty.py ranked one prediction (8 views x 20 MC-dropout
# passes) of a 3-minute `cpu` run on pcam-jpeg valid by each uncertainty: the most
# confident half was 0.927 accurate by doubt, 0.896 by entropy, 0.883 by TTA spread
# and 0.799 by MC-dropout spread (0.782 for all patches). Entropy measures
# closeness to 0.5 instead, and falls further behind when the threshold is far
# from it: on the test model of tests/test_explain.py (threshold 0.655) the most
# confident half was 0.867 accurate by doubt and 0.828 by entropy (0.777 for all).
DEFAULT_UNCERTAINTY = "doubt"


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


def load_run(run_dir: Path, *, checkpoint: str = "best", device: str = "auto", threads: int = 0,
             fp32: bool = False) -> LoadedRun:
    """Load a run folder's `best` (or `last`) weights for inference; `fp32` turns bf16 autocast off."""
    run_dir = Path(run_dir)
    if threads < 0:
        raise UserError(f"--threads {threads}: expected a count >= 0 (0: one per core)")
    run = read_run(run_dir)
    state = load_checkpoint(run_dir / "checkpoints" / f"{checkpoint}.pt")
    config = state["config"]
    model = create_model(config["model"], drop_rate=config["drop_rate"])
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
    pre = state["preprocessing"]
    calibration = run.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise UserError(f"{run_dir / RUN_FILE}: 'calibration' is not a record; run 'histodetect calibrate' again")
    thresholds = run_thresholds(run, where=str(run_dir / RUN_FILE))  # moved by the temperature when calibrated
    run_thresholds(run, calibrated=False, where=str(run_dir / RUN_FILE))  # checked here: evaluate and calibrate read them
    return LoadedRun(
        run_dir=run_dir, model=model, device=torch_device, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
        crop_px=int(pre["crop_px"]), thresholds=thresholds,
        temperature=_temperature(calibration, run_dir), config=config, run=run, bf16=not fp32,
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


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: expected a number of patches, 1 or more")


def predict_logits(run: LoadedRun, patches_uint8: np.ndarray, *, tta: int = 1,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Logits (N, tta): one column per test-time view (`augment.tta_view_groups`), before temperature scaling."""
    run.check_tta(tta)
    check_batch_size(batch_size)
    return model_logits(run.model, patches_uint8, run.mean, run.std, run.crop_px, run.device, batch_size, tta=tta,
                        shift_px=run.shift_px, bf16=run.bf16)


def probabilities(run: LoadedRun, logits: np.ndarray) -> np.ndarray:
    """Logits (N, V) or (N, P, V) -> calibrated probability (N,): the mean over views (and passes)."""
    return mean_over_samples(sample_probabilities(logits, run.temperature))


def mean_over_samples(sample_probs: np.ndarray) -> np.ndarray:
    """(N, V) or (N, P, V) -> (N,): the mean over views (and passes); N may be 0."""
    return sample_probs.mean(axis=tuple(range(1, sample_probs.ndim)))


def sample_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Sigmoid of logits / temperature, elementwise, in float64 (any shape)."""
    return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64) / temperature))


# --- uncertainty: TTA views, MC-dropout passes, entropy --------------------------------------

_DROPOUT_TYPES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                  torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _dropout_owners(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that drop units in training mode: dropout layers with p > 0, and modules with a
    `drop_rate` > 0 (timm heads call F.dropout(..., training=self.training) with it)."""
    return [m for m in model.modules()
            if (isinstance(m, _DROPOUT_TYPES) and m.p > 0) or float(getattr(m, "drop_rate", 0) or 0) > 0]


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether MC-dropout can sample anything from `model`."""
    return bool(_dropout_owners(model))


@contextmanager
def mc_dropout(model: torch.nn.Module):
    """Turn on the model's dropout, and nothing else, for MC-dropout (Gal & Ghahramani 2016).

    Only the `training` flag of the dropout owners is set (not `.train()`, which
    would recurse): BatchNorm keeps its running statistics and stochastic depth
    stays off. The flags are restored on exit. It changes the shared model, so
    do not score with the same model in another thread meanwhile.
    """
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    for module in _dropout_owners(model):
        module.training = True
    try:
        yield model
    finally:
        for module, training in saved:
            module.training = training


def _check_mc_passes(run: LoadedRun, mc_passes: int) -> None:
    if mc_passes < 0 or mc_passes == 1:
        raise UserError(f"--mc {mc_passes}: expected 0 (off) or at least 2 MC-dropout passes, e.g. --mc 20")
    if mc_passes and not has_dropout(run.model):
        raise UserError(
            f"--mc {mc_passes}: {run.run_dir} ({run.config.get('model', 'exported model')}, "
            f"drop_rate {run.config.get('drop_rate', 0)}) "
            "has no dropout to sample; drop --mc, or train with --drop-rate 0.2 or more"
        )


def _backbone_is_random(model: torch.nn.Module, views: torch.Tensor) -> bool:
    """Whether forward_features itself drops units (dropout inside the backbone), tried on two passes."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return True
    sample = views[:4]
    return not torch.equal(model.forward_features(sample), model.forward_features(sample))


@torch.inference_mode()
def _mc_logits(run: LoadedRun, patches_uint8: np.ndarray, tta: int, mc_passes: int,
               batch_size: int) -> np.ndarray:
    """Logits (N, mc_passes, tta) with dropout on; each view of each patch gets its own masks."""
    device = run.device
    columns, backbone_random = [], None
    for begin in range(0, len(patches_uint8), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(patches_uint8[begin : begin + batch_size])).to(device)
        parts = []
        for views in tta_view_groups(batch, tta, run.mean, run.std, run.crop_px, run.shift_px):  # (V, B, 3, H, W)
            flat = views.flatten(0, 1).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.bf16 and bf16_is_fast(device)):
                if backbone_random is None:
                    backbone_random = _backbone_is_random(run.model, flat)
                if backbone_random:
                    logits = torch.stack([run.model(flat) for _ in range(mc_passes)])
                else:
                    # timm heads drop units only after pooling: the backbone runs once and
                    # the cheap head once per pass. 20 passes of a cpu-preset model took 4.0 s
                    # per 1,000 patches against 36 s for 20 full passes and 1.7 s for one plain
                    # pass (benchmarks/uncertainty.py, shared 2-core CPU).
                    features = run.model.forward_features(flat)
                    logits = torch.stack([run.model.forward_head(features) for _ in range(mc_passes)])
            parts.append(logits.float().reshape(mc_passes, len(views), -1))  # (P, V, B)
        columns.append(torch.cat(parts, dim=1).permute(2, 0, 1).cpu().numpy())  # (B, P, tta)
    return np.concatenate(columns) if columns else np.empty((0, mc_passes, tta), np.float32)


def predict_samples(run: LoadedRun, patches_uint8: np.ndarray, *, tta: int = 1, mc_passes: int = 0,
                    batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> np.ndarray:
    """Logits (N, P, V) before temperature scaling: P MC-dropout passes (1 without MC) of V test-time views.

    With `mc_passes`, the dropout masks come from `seed`: the same call gives the same logits.
    """
    run.check_tta(tta)
    _check_mc_passes(run, mc_passes)
    if not mc_passes:
        return predict_logits(run, patches_uint8, tta=tta, batch_size=batch_size)[:, None, :]
    devices = [run.device] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), mc_dropout(run.model):
        torch.manual_seed(seed)
        return _mc_logits(run, patches_uint8, tta, mc_passes, batch_size)


def entropy_bits(probs: np.ndarray) -> np.ndarray:
    """Binary predictive entropy in bits of tumour probabilities: 0 when certain, 1 at 0.5."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def uncertainty_measures(sample_probs: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Per-patch uncertainties (N,) of probabilities (N, P, V) over P passes and V views; higher = more doubt.

    `doubt` is plain confidence turned around: 1 on the decision threshold, falling
    linearly to 0 at probability 0 below it and at 1 above it (prob / threshold, or
    (1 - prob) / (1 - threshold)), so a confident call on either side has no doubt
    whatever the threshold. `entropy` is the predictive entropy in bits, `tta_sd` the
    spread over views (P-averaged; when V > 1), `mc_sd` the spread over passes
    (V-averaged; when P > 1).
    """
    prob = sample_probs.mean(axis=(1, 2))
    # One scale for both sides (|prob - t| / max(t, 1 - t)) left a sure negative at
    # doubt (1 - 2t) / (1 - t), 0.51 for t = 0.33: --review-above 0.5 reviewed every negative.
    doubt = np.where(prob < threshold, prob / max(threshold, 1e-12), (1 - prob) / max(1 - threshold, 1e-12))
    measures = {"doubt": doubt, "entropy": entropy_bits(prob)}
    if sample_probs.shape[2] > 1:
        measures["tta_sd"] = sample_probs.mean(axis=1).std(axis=1)
    if sample_probs.shape[1] > 1:
        measures["mc_sd"] = sample_probs.mean(axis=2).std(axis=1)
    return measures


def predict_patches(run: LoadedRun, patches_uint8: np.ndarray, *, tta: int = 1,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Probability of tumour (N,) for uint8 patches (N, 96, 96, 3)."""
    return probabilities(run, predict_logits(run, patches_uint8, tta=tta, batch_size=batch_size))


@dataclass
class InputChunk:
    ids: list[str]
    patches: np.ndarray  # (N, 96, 96, 3) uint8
    labels: np.ndarray  # (N,) int8, UNLABELLED where unknown


def count_inputs(inputs: list[Path], split: str | None = None) -> int:
    return sum(n for n, _ in (_open_input(path, split, False) for path in _group_inputs(inputs)))


def _group_inputs(inputs: list[Path]) -> list[Path | list[Path]]:
    """Image files given one by one are read as one group; folders, stores and h5 files alone."""
    groups: list[Path | list[Path]] = []
    files: list[Path] = []
    for path in map(Path, inputs):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        elif path.is_file() and path.suffix.lower() not in (".h5", ".hdf5"):
            raise UserError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}), h5 file, store or folder")
        else:
            groups.append(path)
    return groups + ([files] if files else [])


def _open_input(item: Path | list[Path], split: str | None, resize: bool):
    """(number of patches, a function yielding InputChunks)."""
    if isinstance(item, list):
        source = list_image_files(item)
    elif is_store(item):
        store = open_store(item)
        rows = store.split_indices(split) if split else np.arange(len(store))

        def chunks(chunk_size: int) -> Iterator[InputChunk]:
            for begin in range(0, len(rows), chunk_size):
                part = rows[begin : begin + chunk_size]
                yield InputChunk(list(store.ids[part]), store.read_batch(part), store.labels[part])

        return len(rows), chunks
    else:
        source = open_source(item)
    keep = np.array([split is None or s == split for s in source.splits])
    name = item if not isinstance(item, list) else ", ".join(map(str, item))
    if split and not keep.any():
        raise UserError(f"{name}: no patches in split {split!r} (found {', '.join(sorted(set(source.splits)))})")
    if len(source) == 0:
        raise UserError(f"{name}: holds no patches")

    def chunks(chunk_size: int) -> Iterator[InputChunk]:
        # read_chunk rather than source.iter_batches: it also counts the resized files.
        for task in source.tasks(chunk_size, resize=resize):
            result = read_chunk(task)
            if result.errors:
                path, reason = result.errors[0]
                raise UserError(f"{path}: {reason}")
            if result.n_resized:
                warnings.warn(f"{item if not isinstance(item, list) else 'inputs'}: resized {result.n_resized} "
                              "patches that were not 96x96 pixels (--resize); their scores are less reliable",
                              stacklevel=2)
            rows = np.arange(task.start, task.start + len(result.patches))
            mask = keep[rows]
            if mask.any():
                yield InputChunk([source.ids[r] for r in rows[mask]], result.patches[mask], source.labels[rows[mask]])

    return int(keep.sum()), chunks


def iter_inputs(inputs: list[Path], *, split: str | None = None, chunk_size: int = 1024,
                resize: bool = False) -> Iterator[InputChunk]:
    """Decode the inputs chunk by chunk, in order; image files not 96x96 are refused, or resized with `resize`."""
    for item in _group_inputs(inputs):
        _, chunks = _open_input(item, split, resize)
        yield from chunks(chunk_size)


def write_csv_atomic(path: Path, header: tuple[str, ...], rows) -> Path:
    """A CSV with Unix line ends (csv's default "\r\n" leaves a "\r" in `cut` and `awk`), written whole."""

    def write(handle) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)

    return write_file_atomic(path, write)


def _check_unique_ids(rows: list[tuple], inputs: list[Path], kaggle_submission: bool) -> None:
    """Kaggle refuses a submission that repeats an id; elsewhere a repeat is worth a warning."""
    counts = Counter(row[0] for row in rows)
    repeated = [patch_id for patch_id, n in counts.items() for _ in range(n - 1)]
    if not repeated:
        return
    where = ", ".join(map(str, inputs))
    if kaggle_submission:
        raise UserError(f"{where}: id {repeated[0]} appears more than once ({len(repeated)} repeats); "
                        "a Kaggle submission needs each test id once: pass the test/ folder once")
    warnings.warn(f"{where}: {len(repeated)} ids appear more than once (first: {repeated[0]}): the same file "
                  "name in two inputs; predict them into separate CSVs to tell them apart", stacklevel=3)


def _check_review(review_above: float | None, review_by: str, tta: int, mc_passes: int) -> None:
    needs = {"doubt": None, "entropy": None, "tta_sd": ("--tta 4 or more", tta > 1), "mc_sd": ("--mc N", mc_passes > 0)}
    if review_by not in needs:
        raise UserError(f"--review-by {review_by!r}: expected one of {', '.join(needs)}")
    if needs[review_by] is not None and not needs[review_by][1]:
        raise UserError(f"--review-by {review_by}: this uncertainty needs {needs[review_by][0]}; add it or review by doubt")
    if review_above is not None and not 0 <= review_above <= 1:
        raise UserError(f"--review-above {review_above}: expected an uncertainty in [0, 1] "
                        f"(doubt, entropy in bits, or a probability spread), e.g. --review-above 0.5")


def _is_predict_csv(path: Path) -> bool:
    """Whether `path` is empty (`mktemp`) or starts with a header predict writes (`id,prob,pred...`
    or Kaggle's `id,label`): replacing it loses nothing of anyone else's."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(256).strip()
    except OSError:
        return False
    return first == b"" or first.startswith(b"id,prob,pred") or first == b"id,label"


def predict_to_csv(run: LoadedRun, inputs: list[Path], out: Path, *, tta: int = 1, split: str | None = None,
                   kaggle_submission: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: bool = True, uncertainty: bool = False, mc_passes: int = 0,
                   review_above: float | None = None, review_by: str = DEFAULT_UNCERTAINTY,
                   resize: bool = False, seed: int = 0) -> tuple[Path, int]:
    """Score every patch of `inputs` and write `id,prob,pred` (or Kaggle's `id,label`) to `out`.

    A Kaggle submission scores only unlabelled patches (a Kaggle folder's test/).
    With `uncertainty`, `mc_passes` or `review_above`, the CSV also has `doubt`,
    `entropy_bits`, `prob_sd_tta` (with TTA) and `prob_sd_mc` (with MC-dropout;
    `prob` is then the mean over the passes; see `uncertainty_measures`); with
    `review_above` U, a column `decision` says `tumour`, `normal`, or `review`
    where the `review_by` uncertainty is above U, so that a pathologist looks
    only at those.
    """
    # Never over an input (or the labels and slide table beside it), the run's own files or
    # a model file: only an earlier output of predict is replaced.
    inputs = [Path(i) for i in inputs]
    beside = [f for folder in inputs if folder.is_dir()
              for f in (*folder.glob("*labels*.csv"), *folder.glob("*_meta.csv"))]
    check_output_file(out, is_ours=_is_predict_csv, protect=[
        run.run_dir / RUN_FILE, run.run_dir / "checkpoints", *(i for i in inputs if i.is_file()), *beside])
    check_batch_size(batch_size)
    _check_mc_passes(run, mc_passes)
    _check_review(review_above, review_by, tta, mc_passes)
    with_uncertainty = uncertainty or mc_passes > 0 or review_above is not None
    if kaggle_submission and (uncertainty or review_above is not None):
        raise UserError("--kaggle-submission writes exactly id,label; drop --uncertainty and --review-above "
                        "(or write a second CSV without --kaggle-submission)")
    columns = [name for name in UNCERTAINTY_COLUMNS
               if name in ("doubt", "entropy") or (name == "tta_sd" and tta > 1) or (name == "mc_sd" and mc_passes)]
    rows: list[tuple] = []
    threshold = run.threshold_for(tta)
    total = count_inputs(inputs, split)
    with tqdm(total=total, unit="patch", desc="predict", disable=not progress) as bar:
        for index, chunk in enumerate(iter_inputs(inputs, split=split, resize=resize)):
            ids, patches = chunk.ids, chunk.patches
            if kaggle_submission:
                unlabelled = chunk.labels == UNLABELLED
                ids, patches = [i for i, u in zip(ids, unlabelled) if u], patches[unlabelled]
            logits = predict_samples(run, patches, tta=tta, mc_passes=mc_passes, batch_size=batch_size,
                                     seed=seed + index)  # (N, P, V)
            sample_probs = sample_probabilities(logits, run.temperature)
            probs = mean_over_samples(sample_probs)
            if kaggle_submission:
                rows += [(i, f"{p:.6f}") for i, p in zip(ids, probs)]
            elif not with_uncertainty:
                rows += [(i, f"{p:.6f}", int(p >= threshold)) for i, p in zip(ids, probs)]
            else:
                measures = uncertainty_measures(sample_probs, threshold)
                preds = (probs >= threshold).astype(int)
                extra = [[f"{u:.6f}" for u in measures[name]] for name in columns]
                if review_above is not None:
                    decisions = np.where(preds == 1, "tumour", "normal").astype(object)
                    decisions[measures[review_by] > review_above] = "review"
                    extra.append(list(decisions))
                rows += [(i, f"{p:.6f}", pred, *more) for i, p, pred, *more in zip(ids, probs, preds, *extra)]
            bar.update(len(chunk.ids))
    if kaggle_submission and not rows:
        raise UserError(f"{', '.join(map(str, inputs))}: no unlabelled patches for a Kaggle submission; pass the test/ folder")
    _check_unique_ids(rows, inputs, kaggle_submission)
    if kaggle_submission:
        header: tuple[str, ...] = ("id", "label")
    else:
        header = ("id", "prob", "pred")
        if with_uncertainty:
            header += tuple(UNCERTAINTY_COLUMNS[name] for name in columns)
            header += ("decision",) if review_above is not None else ()
    return write_csv_atomic(out, header, rows), len(rows)
