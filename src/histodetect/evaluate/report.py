"""One self-contained report.html (images inlined) and atomic JSON."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UserError
from ..outputs import write_file_atomic, write_json_atomic  # noqa: F401 (evaluate's API)

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

_METRIC_LABELS = {
    "n": "patches",
    "n_positive": "tumour patches",
    "roc_auc": "ROC AUC",
    "balanced_accuracy": "balanced accuracy",
    "sensitivity": "sensitivity (tumour recall)",
    "specificity": "specificity (normal recall)",
    "nll": "log loss (NLL)",
    "brier": "Brier score",
    "ece": "expected calibration error",
    "tn": "true negatives",
    "fp": "false positives",
    "fn": "false negatives",
    "tp": "true positives",
}

_IMAGE_MIME_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

_REPORT_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 980px; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
.summary { color: #444; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .95rem; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .8rem; text-align: left;
         font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5rem; }
figure { margin: 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #555; }
footer { margin-top: 2rem; font-size: .8rem; color: #888; }
"""


def _format_value(value) -> str:
    """Format a number for the report: counts with thousands separators, scores to 3 decimals."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"[{_format_value(value[0])}, {_format_value(value[1])}]"
    return str(value)


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) per metric; an `X_ci` entry joins X's row as `0.953 [0.944, 0.961]`."""
    rows = []
    for key, value in metrics.items():
        if key.endswith("_ci") and key[: -len("_ci")] in metrics:
            continue
        shown = _format_value(value)
        if f"{key}_ci" in metrics:
            shown += " " + _format_value(metrics[f"{key}_ci"])
        rows.append((_METRIC_LABELS.get(key, key.replace("_", " ")), shown))
    return rows


def _summary_line(metrics: dict) -> str:
    parts = []
    if "n" in metrics:
        parts.append(f"{_format_value(metrics['n'])} patches")
        if "n_positive" in metrics:
            parts[-1] += f" ({_format_value(metrics['n_positive'])} tumour)"
    if "roc_auc" in metrics:
        parts.append(f"ROC AUC {_format_value(metrics['roc_auc'])}")
        if "roc_auc_ci" in metrics:
            parts[-1] += f" {_format_value(metrics['roc_auc_ci'])}"
    if "accuracy" in metrics:
        parts.append(f"accuracy {_format_value(metrics['accuracy'])}")
        if "threshold" in metrics:
            parts[-1] += f" at threshold {_format_value(metrics['threshold'])}"
    return " · ".join(parts)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(text)}</td>" for text in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image_data_uri(caption: str, image_path: Path) -> str:
    image_path = Path(image_path)
    mime_type = _IMAGE_MIME_TYPES.get(image_path.suffix.lower())
    if mime_type is None:
        raise UserError(
            f"images[{caption!r}]: expected a .png or .jpg file, found {image_path}. Save the figure as PNG."
        )
    return f"data:{mime_type};base64," + base64.b64encode(image_path.read_bytes()).decode("ascii")


def write_report(
    out_dir: Path,
    title: str,
    metrics: dict,
    images: dict[str, Path],
    tables: dict[str, list[dict]] | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write `out_dir/report.html`: one self-contained page with metrics, figures, tables and notes.

    Images (key = caption) are inlined as base64 data URIs and the CSS is
    inline, so the file needs no other file, network or JavaScript. Every
    string is HTML-escaped. Returns the report's path.
    """
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="summary">{html.escape(_summary_line(metrics))}</p>',
        "<h2>Metrics</h2>",
        _html_table(("metric", "value"), _metric_rows(metrics)),
    ]
    if images:
        figures = "".join(
            f'<figure><img src="{_image_data_uri(caption, image_path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            for caption, image_path in images.items()
        )
        sections += ["<h2>Figures</h2>", f'<div class="figures">{figures}</div>']
    for table_title, table_rows in (tables or {}).items():
        columns = list(dict.fromkeys(column for row in table_rows for column in row))
        cells = [[_format_value(row.get(column, "")) for column in columns] for row in table_rows]
        sections += [f"<h2>{html.escape(table_title)}</h2>", _html_table(columns, cells)]
    if notes:
        items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        sections += ["<h2>Notes</h2>", f"<ul>{items}</ul>"]
    sections.append(f"<footer>histodetect {html.escape(__version__)}</footer>")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_REPORT_CSS}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    return write_file_atomic(Path(out_dir) / "report.html", lambda handle: handle.write(page))

