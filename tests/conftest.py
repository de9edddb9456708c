"""Shared fixtures: the real PCam / Kaggle samples in ../shared/data, skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PCAM_JPEG = SHARED_DATA / "pcam-jpeg"
KAGGLE_SAMPLE = SHARED_DATA / "kaggle-sample"


def _require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (the shared data folder beside the repository)")
    return path


@pytest.fixture(scope="session")
def pcam_jpeg() -> Path:
    """10,000 real PCam patches as JPEGs: split/label/file."""
    return _require(PCAM_JPEG)


@pytest.fixture(scope="session")
def kaggle_sample() -> Path:
    """15 labelled + 29 unlabelled original Kaggle .tif files."""
    return _require(KAGGLE_SAMPLE)
