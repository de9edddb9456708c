"""SlideConfig (how to analyse a slide) and its checks, parse_roi, and the result types."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...augment import TTA_VIEW_COUNTS
from ...errors import UserError, check_int, check_number
from ...predict import DEFAULT_BATCH_SIZE
from ..tiling import PCAM_MPP

# Read in the main process by default: on the 2-core dev CPU, reading workers steal
# the cores inference needs. benchmarks/slide_speed.py, `cpu` run (histo_tinynet),
# 1,616 tiles, best (median) of 3 interleaved rounds: 241 (226) tiles/s inline,
# 194 (144) with 1 worker, 180 (134) with 2; reading alone runs at ~3,300 tiles/s,
# inference at ~260. On a GPU, where inference stops being the bottleneck,
# --workers may pay: not measured yet.
DEFAULT_WORKERS = 0
# Reading processes: this covers the largest machines; --workers 2**63 was a traceback
# from multiprocessing (an OverflowError making its semaphore).
MAX_WORKERS = 256


@dataclass
class SlideConfig:
    """How to analyse a slide. The CLI fills it in; summary.json stores it."""

    stride_px: int = 96  # pixels (at PCam's resolution) between tiles; 32 = one tile per PCam label region
    tta: int = 1  # dihedral views averaged per tile (1, 4 or 8)
    mpp: float | None = None  # micrometres per level-0 pixel; None = from the slide's metadata
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height in level-0 pixels; None = whole slide
    threshold: float | None = None  # tumour regions: cells with prob >= this; None = the run's validation threshold
    min_tissue_fraction: float = 0.25  # a tile is scored when at least this share of it is tissue
    target_mpp: float = PCAM_MPP  # the resolution the model was trained at
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int = DEFAULT_WORKERS  # reading processes; 0 = read in the main process

    def __post_init__(self) -> None:
        # Where the options come in: a str "48" for stride_px failed in each slide's tiling,
        # which analyse_slides recorded as every slide's failure.
        check_config(self)


@dataclass
class SlideResult:
    slide: Path
    out_dir: Path
    summary: dict
    reused: bool = False  # a complete result with the same settings was already there


@dataclass
class SlidesReport:
    results: list[SlideResult] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (slide, one-line reason)
    table: Path | None = None  # slides.csv, when more than one slide was asked for


def parse_roi(text: str) -> tuple[int, int, int, int]:
    """'x,y,w,h' (level-0 pixels) -> a tuple of 4 ints, or a UserError naming --roi."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise UserError(f"--roi {text!r}: expected x,y,width,height in level-0 pixels, "
                        f"e.g. --roi 20000,15000,4096,4096")
    return values


# The flag that sets each number, for the messages (target_mpp has none).
_INT_OPTIONS = {"stride_px": "--stride", "tta": "--tta", "batch_size": "--batch-size", "workers": "--workers"}
_NUMBER_OPTIONS = {"min_tissue_fraction": "--min-tissue", "target_mpp": "target_mpp", "mpp": "--mpp",
                   "threshold": "--threshold"}
OPTION_FLAGS = {**_INT_OPTIONS, **_NUMBER_OPTIONS, "roi": "--roi"}


def _check_types(config: SlideConfig) -> None:
    """Refuse an option of another type (stride_px="48", True) in one line naming its flag.

    numpy's numbers are replaced by Python's: summary.json and the settings key store the config.
    """
    for name, flag in _INT_OPTIONS.items():
        setattr(config, name, check_int(flag, getattr(config, name)))
    for name, flag in _NUMBER_OPTIONS.items():
        if getattr(config, name) is not None or name not in ("mpp", "threshold"):
            setattr(config, name, check_number(flag, getattr(config, name)))
    if config.roi is not None:
        if isinstance(config.roi, (str, bytes)) or not hasattr(config.roi, "__len__") or len(config.roi) != 4:
            raise UserError(f"--roi {config.roi!r}: expected x, y, width, height in level-0 pixels, "
                            f"e.g. roi=(20000, 15000, 4096, 4096)")
        config.roi = tuple(check_int("--roi", v) for v in config.roi)


def check_config(config: SlideConfig) -> None:
    """The options' types and ranges, checked before any work, as UserErrors naming the flag."""
    if not isinstance(config, SlideConfig):
        raise UserError(f"config: expected a SlideConfig (e.g. SlideConfig(stride_px=48)), found {type(config).__name__}")
    _check_types(config)
    threshold = config.threshold
    checks = [
        (config.tta in TTA_VIEW_COUNTS, f"--tta {config.tta}: expected one of {', '.join(map(str, TTA_VIEW_COUNTS))}"),
        (threshold is None or 0 <= threshold <= 1, f"--threshold {threshold}: expected a probability between 0 and 1"),
        (0 <= config.min_tissue_fraction <= 1,
         f"--min-tissue {config.min_tissue_fraction}: expected a share of the tile between 0 and 1"),
        (config.batch_size >= 1, f"--batch-size {config.batch_size}: expected at least 1"),
        (0 <= config.workers <= MAX_WORKERS,
         f"--workers {config.workers}: expected 0 (read in this process) to {MAX_WORKERS} reading processes"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
