"""CPU inference: histodetect's predict path against timm's eager fp32 model called batch by batch.

    .venv/bin/python benchmarks/predict_speed.py RUN [--store STORE] [--n 2048]

Both score the same uint8 patches with the same weights and preprocessing (the
run's mean, std and crop), in the same process, alternating 3 rounds; the best
round of each is reported. Baseline: `model(x)` under `torch.no_grad()`, NCHW,
batches of 64. Target (issue #3): predict >= 1.3x the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from histodetect.augment import preprocess_batch
from histodetect.data.store import open_store
from histodetect.models import create_model
from histodetect.export import export_run, load_exported_run
from histodetect.predict import load_run, predict_patches

BASELINE_BATCH = 64


def baseline_probs(model, patches: np.ndarray, mean, std, crop_px: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for begin in range(0, len(patches), BASELINE_BATCH):
            x = preprocess_batch(torch.from_numpy(patches[begin : begin + BASELINE_BATCH]), mean, std, crop_px)
            out.append(torch.sigmoid(model(x.contiguous())).reshape(-1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--store", type=Path, help="default: the run's store")
    parser.add_argument("--n", type=int, default=2048, help="patches to score")
    args = parser.parse_args()
    run = load_run(args.run, device="cpu")
    store = open_store(args.store or Path(run.run["data"]["path"]))
    patches = store.read_batch(np.arange(min(args.n, len(store))))

    baseline = create_model(run.config["model"], drop_rate=run.config["drop_rate"])
    baseline.load_state_dict(run.model.state_dict())
    baseline.eval()

    export_run(args.run, format="onnx", out=args.run / "model.onnx")
    onnx_run = load_exported_run(args.run / "model.onnx")
    engines = {
        "timm eager fp32, batch 64": lambda: baseline_probs(baseline, patches, run.mean, run.std, run.crop_px),
        "histodetect predict": lambda: predict_patches(run, patches),
        "histodetect predict --engine onnx": lambda: predict_patches(onnx_run, patches),
    }
    timings: dict[str, list[float]] = {name: [] for name in engines}
    results = {}
    for _ in range(3):
        for name, score in engines.items():
            start = time.perf_counter()
            results[name] = score()
            timings[name].append(time.perf_counter() - start)
    baseline_probs_ = results["timm eager fp32, batch 64"]
    max_diff = max(float(np.abs(baseline_probs_ - p).max()) for p in results.values())
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
          f"model {run.config['model']}, input {run.crop_px or 96} px, {len(patches)} patches")
    rates = {name: len(patches) / min(seconds) for name, seconds in timings.items()}
    for name, rate in rates.items():
        print(f"  {name:<28} {rate:8,.0f} patches/s")
    base = rates["timm eager fp32, batch 64"]
    print("  speed-up: " + ", ".join(f"{name} {rate / base:.2f}x" for name, rate in rates.items() if rate != base)
          + f"; max |prob difference| {max_diff:.1e}")


if __name__ == "__main__":
    main()
