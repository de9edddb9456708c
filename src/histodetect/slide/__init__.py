"""Whole slides: find the tissue, score it tile by tile, write a tumour heatmap and regions.

    from histodetect.predict import load_run
    from histodetect.slide import SlideConfig, analyse_slides

    report = analyse_slides(load_run("runs/cpu"), ["slides/"], "out/", SlideConfig(stride_px=64))

Modules: reader (tiffslide / openslide behind one interface), tiling (level, grid,
reading tiles), tissue (the mask), regions (polygons), outputs (files), analyse
(the pipeline). The pipeline imports torch; the rest does not, and is imported
lazily from here so that reading worker processes start without torch.
"""

from __future__ import annotations

from .reader import SlideGeometry, SlideReader, open_slide
from .tiling import PCAM_MPP, TileGrid, choose_level, plan_grid

_ANALYSE_NAMES = ("SlideConfig", "SlideResult", "SlidesReport", "analyse_slide", "analyse_slides", "find_slides",
                  "parse_roi")

__all__ = ["PCAM_MPP", "SlideConfig", "SlideGeometry", "SlideReader", "SlideResult", "SlidesReport", "TileGrid",
           "analyse_slide", "analyse_slides", "choose_level", "find_slides", "open_slide", "parse_roi", "plan_grid"]


def __getattr__(name: str):
    if name in _ANALYSE_NAMES:
        from . import analyse

        return getattr(analyse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
