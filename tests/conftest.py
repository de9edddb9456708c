"""Shared fixtures: the real PCam / Kaggle samples in ../shared/data, skipped when absent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PCAM_JPEG = SHARED_DATA / "pcam-jpeg"
KAGGLE_SAMPLE = SHARED_DATA / "kaggle-sample"


def copy_patches(pcam_jpeg: Path, dest: Path, per_class: dict[str, int]) -> Path:
    """Copy the first `n` real patches of each label of each split into split/label/ under `dest`."""
    for split, n in per_class.items():
        for label in ("0", "1"):
            (dest / split / label).mkdir(parents=True)
            for path in sorted((pcam_jpeg / split / label).glob("*.jpg"))[:n]:
                shutil.copy(path, dest / split / label / path.name)
    return dest


def calibrated_copy(run_dir: Path, dest: Path, temperature: float) -> Path:
    """A copy of a run folder whose run.json carries a calibration temperature."""
    shutil.copytree(run_dir, dest)
    run_json = json.loads((dest / "run.json").read_text())
    run_json["calibration"] = {"temperature": temperature}
    (dest / "run.json").write_text(json.dumps(run_json))
    return dest


class PooledColour(torch.nn.Module):
    """A model with weights that scores patches but has no map of any kind to explain: the mean colour, weighed."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


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
