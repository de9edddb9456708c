"""Several slides: find_slides (files, folders, patterns) and analyse_slides with its slides.csv."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from ...errors import UserError
from ...outputs import check_folder_location, unique_name
from ...predict import LoadedRun, check_run, input_paths, write_csv_atomic
from ..reader import has_slide_suffix, slide_stem
from .config import SlideConfig, SlidesReport, check_config
from .pipeline import analyse_slide

SLIDES_TABLE = "slides.csv"


def find_slides(inputs: list[str | Path]) -> list[Path]:
    """Slide files from files, folders (their slide files, not recursive) and glob patterns, in order."""
    found: list[Path] = []
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and has_slide_suffix(p))
            if not matches:
                raise UserError(f"{path}: no slide files in this folder (looked for .svs, .tif, .tiff, .ndpi, ...)")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file() and has_slide_suffix(Path(p)))
            if not matches:
                raise UserError(f"{item}: no slide file matches this pattern (looked for .svs, .tif, .tiff, ...)")
        else:
            raise UserError(f"{path}: no such slide file, folder or pattern")
        found += [m for m in matches if m not in found]
    return found


def analyse_slides(run: LoadedRun, inputs: str | Path | Iterable[str | Path], out: Path | str, config: SlideConfig | None = None, *,
                   overwrite: bool = False, progress: bool = True) -> SlidesReport:
    """Analyse one slide into `out`, or several (folders, patterns) into `out/NAME/` plus `out/slides.csv`.

    With several slides, one that fails is recorded (in the report and the table)
    and the others go on; slides already done with the same settings are reused.
    `inputs` is one slide, folder or pattern, or any iterable of them.
    """
    run = check_run(run)
    # One slide is a list of one, not of its characters; Path.glob's generator or a set was a TypeError.
    inputs = input_paths(inputs, kinds="slide files, folders, patterns")
    config = config or SlideConfig()
    check_config(config)  # once, not as every slide's failure
    check_folder_location(out)
    slides = find_slides(inputs)
    if len(inputs) == 1 and Path(inputs[0]).is_file():
        return SlidesReport(results=[analyse_slide(run, slides[0], out, config, overwrite=overwrite,
                                                   progress=progress)])
    report = SlidesReport()
    names = _unique_names(slides)
    for slide, name in zip(slides, names):
        try:
            result = analyse_slide(run, slide, Path(out) / name, config, overwrite=overwrite, progress=progress)
        # One bad slide in a batch of hundreds must not cost the others: record any error
        # (a UserError, or a decoder failing on a corrupt tile) and go on.
        except Exception as exc:  # noqa: BLE001
            reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            report.failed.append((slide, reason))
            if progress:
                tqdm.write(f"{slide}: failed: {reason}")
        else:
            report.results.append(result)
        report.table = _write_slides_table(Path(out) / SLIDES_TABLE, report, names, slides)
    return report


def _unique_names(slides: list[Path]) -> list[str]:
    taken: set[str] = set()
    return [unique_name(slide_stem(slide), taken) for slide in slides]


def _write_slides_table(path: Path, report: SlidesReport, names: list[str], slides: list[Path]) -> Path:
    columns = ("max_prob", "mean_prob", "tumour_area_mm2", "n_regions", "tiles_read", "seconds")
    by_slide = {r.slide: r for r in report.results}
    failed = dict(report.failed)
    rows = []
    for slide, name in zip(slides, names):
        if slide in by_slide:
            result = by_slide[slide]
            status = "reused" if result.reused else ("no tissue" if result.summary["tiles_read"] == 0 else "done")
            rows.append((str(slide), name, status, *(_cell(result.summary[c]) for c in columns), ""))
        elif slide in failed:
            rows.append((str(slide), name, "failed", *([""] * len(columns)), failed[slide]))
    return write_csv_atomic(path, ("slide", "out", "status", *columns, "error"), rows)


def _cell(value) -> str:
    return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))
