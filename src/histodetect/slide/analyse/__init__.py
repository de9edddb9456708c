"""analyse_slide(): a scanned slide in, a tumour heatmap, regions and a summary out.

Steps: open the slide and check its resolution (reader.py); pick the level and
lay the tile grid (tiling.py); find tissue on a thumbnail (tissue.py); read the
tissue tiles block by block, in worker processes or inline, and score them with
`histodetect.predict` in batches (so TTA, the run's centre crop and its
calibration apply exactly as for patches); write the outputs (outputs.py).

Memory is bounded whatever the slide's size: at most `2 * workers` blocks of
tiles are in flight and one batch is being scored. What grows with the slide is
small: a few bytes per tile, and the tissue mask's thumbnail at ~12 um/px (27 MB
for a 25 x 50 mm section). The outputs are written in a hidden `.NAME.partial` folder,
renamed to NAME when complete; the scores done so far are saved there every
`CHECKPOINT_SECONDS`, so an interrupted run, rerun with the same settings,
resumes where it stopped (and with other settings starts clean).

The package, in the order a slide meets it:

    config.py     SlideConfig and its checks, parse_roi, SlideResult, SlidesReport
    batch.py      find_slides, analyse_slides (several slides, slides.csv)
    pipeline.py   analyse_slide (one slide, step by step)
    resume.py     the settings key, reusing a finished result, progress.npy, moving the result in
    scoring.py    reading blocks of tiles (inline or in workers) and scoring them in batches
    results.py    summary.json and the heatmap, overlay, regions and tiles files
"""

from .batch import SLIDES_TABLE, analyse_slides, find_slides
from .config import (
    DEFAULT_WORKERS,
    SlideConfig,
    SlideResult,
    SlidesReport,
    check_config,
    parse_roi,
)
from .pipeline import OVERVIEW_MAX_SIDE_PX, analyse_slide
from .resume import PROGRESS_FILE, SUMMARY_FILE
from .scoring import BLOCK_READ_PX, CHECKPOINT_SECONDS, MAX_BLOCK_CELLS

__all__ = [
    "BLOCK_READ_PX",
    "CHECKPOINT_SECONDS",
    "DEFAULT_WORKERS",
    "MAX_BLOCK_CELLS",
    "OVERVIEW_MAX_SIDE_PX",
    "PROGRESS_FILE",
    "SLIDES_TABLE",
    "SUMMARY_FILE",
    "SlideConfig",
    "SlideResult",
    "SlidesReport",
    "analyse_slide",
    "analyse_slides",
    "check_config",
    "find_slides",
    "parse_roi",
]
