"""Training configuration as plain data: `TrainConfig`, the named presets, and the
progressive-crop schedule.

Free of torch, so that the command line can build its flags from `TrainConfig`
without loading torch and timm (`histodetect --help`, `prepare` and `info` start fast).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from .data.decode import PATCH_SIZE_PX
from .errors import UserError, check_bool, check_int, check_number

if TYPE_CHECKING:
    from .augment import AugmentConfig


@dataclass
class TrainConfig:
    """Everything a training run depends on. Presets are named instances of it."""

    model: str = "histo_tinynet"
    pretrained: bool = False
    weights: str | None = None  # a local state dict / safetensors file to start from
    drop_rate: float = 0.0  # dropout before the one-logit head
    optimizer: str = "adamw"  # "adam" (the seed's) or "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 128  # per process; the global batch is this times the number of processes
    epochs: int = 30
    warmup_fraction: float = 0.05  # of all steps, linear from 0
    schedule: str = "cosine"  # "cosine" (to 0 after warm-up), "onecycle" (cosine up, then down) or "constant"
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup alpha: each batch is blended with itself reversed by a weight ~ Beta(alpha, alpha); 0 = off
    ema_decay: float = 0.0  # 0 = no EMA; validation and `best` use the EMA weights when on
    grad_clip_norm: float = 0.0  # 0 = no clipping
    # Sharpness-aware minimisation (Foret et al. 2021): each step takes its gradient at
    # the weights moved up the loss by this L2 radius; two passes a step. 0 = off.
    sam_rho: float = 0.0
    # Augmentation, on the device, on whole batches (augment.AugmentConfig).
    dihedral: bool = False
    hed_sigma: float = 0.0
    hed_bias: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    crop_px: int = 0  # train and predict on the centre crop of this size; 0 = the whole 96 px
    shift_px: int = 0  # random shift of that crop, in pixels
    rotate_deg: float = 0.0  # random rotation by any angle up to this, on top of the dihedral ones
    scale: float = 0.0  # random zoom by a factor in [1 - scale, 1 + scale]
    blur_sigma: float = 0.0  # Gaussian blur, sigma ~ U(0, this) pixels per patch
    noise_std: float = 0.0  # Gaussian pixel noise, std ~ U(0, this) of the [0, 1] range per patch
    # Progressive resizing: "64@0.4,76@0.7" trains on 64 px crops until 40% of the
    # schedule, 76 px until 70%, then crop_px (never above it); smaller crops make early
    # steps cheaper. "" = crop_px throughout. Validation and prediction use crop_px.
    progressive_crop: str = ""
    # Time and stopping.
    max_minutes: float = 0.0  # 0 = no limit; else the schedule anneals to the time limit
    early_stopping: int = 0  # stop after this many epochs without a better validation AUC; 0 = never
    checkpoint_minutes: float = 10.0  # also save last.pt mid-epoch this often
    # Machine.
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    bf16: bool = True  # bf16 autocast for training, where bf16_is_fast(device)
    channels_last: bool = True
    compile: bool = False
    threads: int = 0  # torch CPU threads; 0 = one per core
    resident_fraction: float = 0.5  # keep the shard on the GPU if it needs less than this share of free memory
    val_batch_size: int = 512
    train_split: str = "train"
    val_split: str = "valid"
    profile: bool = False  # print data vs compute time per step

    def augment(self) -> AugmentConfig:
        from .augment import AugmentConfig

        return AugmentConfig(
            dihedral=self.dihedral, hed_sigma=self.hed_sigma, hed_bias=self.hed_bias,
            brightness=self.brightness, contrast=self.contrast, saturation=self.saturation,
            hue=self.hue, crop_px=self.crop_px, shift_px=self.shift_px,
            rotate_deg=self.rotate_deg, scale=self.scale, blur_sigma=self.blur_sigma,
            noise_std=self.noise_std,
        )


# The seed notebook: the backbone, global average pooling, dropout 0.5, one sigmoid
# output, Adam 1e-3, binary cross-entropy, 10 epochs, no augmentation.
_SEED = dict(
    pretrained=False, drop_rate=0.5, optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=64,
    epochs=10, warmup_fraction=0.0, schedule="constant", label_smoothing=0.0, ema_decay=0.0,
)
PRESETS: dict[str, TrainConfig] = {
    "seed-xception": TrainConfig(model="legacy_xception", **_SEED),
    "seed-mobilenetv2": TrainConfig(model="mobilenetv2_100", **_SEED),
    # Best recipe measured for one GPU (H200, pcam-jpeg, BENCHMARKS.md): the CPU network
    # on the shifted 88 px crop, trained longer. On 8,000 training patches the larger
    # networks tried (histo_net96 at 88 and 96 px, histo_net, resnet18) overfitted and
    # scored no better; with far more data, try --model histo_net or resnet18.
    "default": TrainConfig(
        model="histo_tinynet", lr=2e-3, weight_decay=0.05, batch_size=128, epochs=110,
        warmup_fraction=0.05, schedule="cosine", label_smoothing=0.0, ema_decay=0.999,
        dihedral=True, hed_sigma=0.05, hed_bias=0.05, brightness=0.1, contrast=0.1,
        saturation=0.1, hue=0.0, crop_px=88, shift_px=4,
    ),
    # Best recipe for a 2-core CPU and 10 minutes (benchmarks in BENCHMARKS.md). The
    # centre 88 px, shifted by up to 4 px, beat the centre 64 and 80 px (more epochs,
    # less context) and the whole 96 px patch (no shift: it overfitted) in 10 minutes;
    # growing the crop from 64 px gets more epochs out of the 10 minutes than 88 px throughout.
    "cpu": TrainConfig(
        model="histo_tinynet", lr=2e-3, weight_decay=0.05, batch_size=128, epochs=100,
        warmup_fraction=0.05, schedule="cosine", label_smoothing=0.0, ema_decay=0.999,
        dihedral=True, hed_sigma=0.05, hed_bias=0.05, brightness=0.1, contrast=0.1,
        saturation=0.1, hue=0.0, crop_px=88, shift_px=4, progressive_crop="64@0.4,76@0.7",
        max_minutes=10.0, device="cpu",
    ),
}


def parse_progressive_crop(text: str) -> list[tuple[float, int]]:
    """'64@0.4,76@0.7' -> [(0.4, 64), (0.7, 76)]: each crop size until that share of the schedule."""
    if not text:
        return []
    usage = f"--progressive-crop {text!r}: expected PX@FRACTION pairs such as 64@0.4,76@0.7"
    stages = []
    for part in text.split(","):
        px, _, until = part.strip().partition("@")
        try:
            stage = (float(until), int(px))
        except ValueError:
            raise UserError(f"{usage}, found {part.strip()!r}") from None
        stages.append(stage)
    fractions = [until for until, _ in stages]
    if not all(0 < until < 1 for until in fractions) or fractions != sorted(set(fractions)):
        raise UserError(f"{usage}: the fractions must rise strictly between 0 and 1")
    if not all(0 < px <= PATCH_SIZE_PX for _, px in stages):
        raise UserError(f"{usage}: each size must be between 1 and {PATCH_SIZE_PX} px")
    return stages


def scheduled_crop(stages: list[tuple[float, int]], progress: float, crop_px: int) -> int:
    """The training crop at `progress` (0-1) through the schedule: the first stage not yet over, else crop_px.

    The crop only grows to crop_px: a stage larger than it (after `--crop-px` was
    lowered) trains at crop_px.
    """
    px = next((px for until, px in stages if progress < until), crop_px)
    return min(px, crop_px) if crop_px else px


def training_crop_sizes(cfg: TrainConfig) -> list[int]:
    """Every crop side (px) a run uses, largest first: crop_px (96 for the whole patch), which
    validation and prediction use too, and each --progressive-crop stage as scheduled_crop caps it."""
    stages = [min(px, cfg.crop_px) if cfg.crop_px else px for _, px in parse_progressive_crop(cfg.progressive_crop)]
    return sorted({cfg.crop_px or PATCH_SIZE_PX, *stages}, reverse=True)


def preset_config(name: str, **overrides) -> TrainConfig:
    """A preset with some fields replaced; unknown names are UserErrors listing the known ones."""
    if name not in PRESETS:
        raise UserError(f"--preset {name!r}: unknown preset (choose from {', '.join(PRESETS)})")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise UserError(f"unknown training option(s) {', '.join(sorted(unknown))}")
    return check_config_types(dataclasses.replace(PRESETS[name], **overrides))


def _check_str(flag: str, value, optional: bool = False) -> str | None:
    if not (isinstance(value, str) or (optional and value is None)):
        raise UserError(f"{flag} {value!r}: expected a str{' or None' if optional else ''}, found {type(value).__name__}")
    return value


# The errors module's checks, one per TrainConfig annotation: a str where a number goes failed
# deep in fit as a TypeError, and numpy's numbers (a sweep's np.arange) could not go into run.json.
_FIELD_CHECKS = {"int": check_int, "float": check_number, "bool": check_bool, "str": _check_str,
                 "str | None": lambda flag, value: _check_str(flag, value, optional=True)}


def check_config_types(cfg: TrainConfig, names: Collection[str] | None = None) -> TrainConfig:
    """`cfg` with each field of its annotation's type, as Python's (numpy's numbers and bools
    converted); another type (e.g. epochs="2") is a UserError naming it in one line.

    `names` limits the check to those fields (None: all of them).
    """
    checked = {f.name: _FIELD_CHECKS[f.type]("--" + f.name.replace("_", "-"), getattr(cfg, f.name))
               for f in fields(TrainConfig) if names is None or f.name in names}
    return dataclasses.replace(cfg, **checked)


SCHEDULES = ("cosine", "onecycle", "constant")
# torch CPU threads, far past any machine's cores: on the dev machine OpenMP could not start
# 16384 threads, 100000000 ended in a segmentation fault and 2**63 in a traceback from torch.
# Fixed rather than this machine's cores, so that a run resumes on another machine.
MAX_THREADS = 1024
OPTIMIZERS = ("adam", "adamw")


def _check_starting_weights(cfg: TrainConfig) -> None:
    if cfg.weights is not None and not cfg.weights.strip():  # `--weights "$UNSET"` trained from random weights
        raise UserError("--weights '': expected a .safetensors or state dict file; drop --weights to start from "
                        "random weights")
    if cfg.pretrained and cfg.weights:  # the file replaced the hub's weights after fetching them (network, minutes)
        raise UserError(f"--pretrained and --weights {cfg.weights}: both choose the starting weights; pass one "
                        "(--weights alone to start from that file)")


def check_train_config(cfg: TrainConfig, *, resuming: bool = False) -> None:
    """Refuse a setting outside its range in one line naming the flag; `fit` calls it before writing anything.

    Augmentation ranges are checked by `augment.AugmentConfig`; this covers the rest,
    and that every training crop (with its shift) fits the 96 px patch. `resuming` skips
    the starting weights: a resume starts from last.pt, and a run saved before these
    checks (--weights '', --pretrained with --weights) cannot change them.
    """
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if not resuming:
        _check_starting_weights(cfg)
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {cfg.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule {cfg.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    # Finite too: --lr inf passed "> 0" and made the weights NaN in the first update.
    at_least_one = (lambda v: 1 <= v < math.inf, "a finite value >= 1")
    positive, not_negative = (lambda v: 0 < v < math.inf, "a finite value > 0"), (lambda v: 0 <= v < math.inf, "a finite value >= 0")
    below_one, fraction = (lambda v: 0 <= v < 1, "a value in [0, 1)"), (lambda v: 0 <= v <= 1, "a value in [0, 1]")
    ranges = {
        "seed": (lambda v: 0 <= v < 2**32, "a value in [0, 2**32)"),  # numpy's and torch's seeds
        "epochs": at_least_one, "batch_size": at_least_one, "val_batch_size": at_least_one, "lr": positive,
        "weight_decay": not_negative, "drop_rate": below_one, "ema_decay": below_one, "warmup_fraction": below_one,
        "label_smoothing": below_one, "grad_clip_norm": not_negative, "max_minutes": not_negative,
        "early_stopping": not_negative, "checkpoint_minutes": (lambda v: v > 0, "a value > 0 (inf: only at epoch ends)"),
        "threads": (lambda v: 0 <= v <= MAX_THREADS, f"a value in [0, {MAX_THREADS}] (0 = one per core)"),
        "resident_fraction": fraction,
    }
    for name, (allowed, expected) in ranges.items():
        value = getattr(cfg, name)
        if not allowed(value):  # NaN fails every comparison, so it is refused too
            raise UserError(f"{flag(name)} {value}: expected {expected}")
    if not 0 <= cfg.mixup < math.inf:
        raise UserError(f"--mixup {cfg.mixup}: expected an alpha >= 0 (0 turns mixup off, 0.2-0.4 is usual)")
    if not 0 <= cfg.sam_rho <= 1:
        raise UserError(f"--sam-rho {cfg.sam_rho}: expected a radius in [0, 1] (0 turns SAM off, 0.05 is usual)")
    for px in training_crop_sizes(cfg):
        window_px = px + 2 * cfg.shift_px
        if window_px > PATCH_SIZE_PX:
            where = f"--crop-px {px}" if px == cfg.crop_px else f"the --progressive-crop stage of {px} px"
            raise UserError(f"{where} with --shift-px {cfg.shift_px}: the crop reads a {window_px}-pixel window "
                            f"of a {PATCH_SIZE_PX} px patch; choose crop + 2 * shift <= {PATCH_SIZE_PX}")


# One line of `histodetect train --help` per TrainConfig field (the default is the preset's value).
OPTION_HELP = {
    "model": "timm model name, or histo_tinynet / histo_tinynet_std / histo_net96 / histo_net (ours)",
    "pretrained": "start from timm's hub weights (from the local Hugging Face cache, else the network)",
    "weights": "start from a local state dict or .safetensors file (its classifier may differ)",
    "drop_rate": "dropout before the one-logit head, in [0, 1)",
    "optimizer": "adam or adamw (fused)",
    "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "batch_size": "patches per step and process",
    "epochs": "passes over the training split",
    "warmup_fraction": "share of the schedule spent warming the learning rate up from 0, in [0, 1)",
    "schedule": "cosine, onecycle or constant",
    "label_smoothing": "pull the targets towards 0.5 by this much, in [0, 1)",
    "mixup": "mixup alpha (0 = off; 0.2-0.4 is usual)",
    "ema_decay": "exponential moving average of the weights (0 = off); validation and best.pt use it",
    "grad_clip_norm": "clip the gradient's L2 norm to this (0 = off)",
    "sam_rho": "sharpness-aware minimisation radius (0 = off; two passes a step)",
    "dihedral": "random turns and mirrors (the 8 symmetries of a square)",
    "hed_sigma": "HED stain jitter: scale of each stain by 1 +- this",
    "hed_bias": "HED stain jitter: shift of each stain by +- this",
    "brightness": "brightness jitter, +- this",
    "contrast": "contrast jitter, +- this",
    "saturation": "saturation jitter, +- this",
    "hue": "hue turn, +- this share of the colour wheel (up to 0.5)",
    "crop_px": "train and predict on the centre crop of this size (0 = the whole 96 px)",
    "shift_px": "random shift of that crop, in pixels (crop + 2 * shift <= 96)",
    "rotate_deg": "random rotation by up to this many degrees, on top of the dihedral turns",
    "scale": "random zoom by a factor in [1 - scale, 1 + scale] (up to 0.5)",
    "blur_sigma": "Gaussian blur, sigma ~ U(0, this) pixels (up to 4)",
    "noise_std": "Gaussian pixel noise, std ~ U(0, this) of the [0, 1] range",
    "progressive_crop": "smaller crops early: PX@FRACTION pairs, e.g. 64@0.4,76@0.7 ('' = off)",
    "max_minutes": "stop after this many minutes of training steps, the schedule fitted to them (0 = no limit)",
    "early_stopping": "stop after this many epochs without a better validation AUC (0 = never)",
    "checkpoint_minutes": "also save last.pt mid-epoch this often (one process only)",
    "seed": "seed of the data order, initialisation and augmentation",
    "device": "auto, cpu, cuda or cuda:N",
    "bf16": "bf16 autocast where fast (CUDA, CPUs with AMX / AVX512-BF16); --no-bf16 trains in float32",
    "channels_last": "channels-last memory format (faster convolutions)",
    "compile": "torch.compile the training model (one graph per crop size)",
    "threads": "torch CPU threads (0 = one per core)",
    "resident_fraction": "keep the training shard on the GPU if it needs less than this share of free memory",
    "val_batch_size": "patches per validation batch",
    "train_split": "the store's split to train on",
    "val_split": "the store's split to validate on (made from 10%% of train if it has no labels)",
    "profile": "print data vs compute milliseconds per step, each epoch",
}
