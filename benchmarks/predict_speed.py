"""CPU inference: histodetect's predict path against timm's eager fp32 model called batch by batch.

    .venv/bin/python benchmarks/predict_speed.py RUN [--store STORE] [--n 2048]

Both score the same uint8 patches with the same weights and preprocessing (the
run's mean, std and crop), in the same process, alternating 3 rounds; the best
round of each is reported. Baseline: `model(x)` under `torch.no_grad()`, NCHW,
batches of 64. Target (issue #3): predict >= 1.3x the baseline.

Rows: `predict` as it runs by default (bf16 autocast where `bf16_is_fast`: on a CPU
with AMX or AVX512-BF16), `predict --fp32`, and `predict --engine onnx`. Each row
prints its largest probability difference from the baseline and, where the patches
are labelled, its ROC AUC, so the price of bf16 is measured beside its speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from histodetect.augment import preprocess_batch
from histodetect.data.store import open_store
from histodetect.models import create_model
from histodetect.export import export_run, load_exported_run
from histodetect.predict import load_run, predict_patches
from histodetect.train import bf16_is_fast

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
    run_fp32 = load_run(args.run, device="cpu", fp32=True)
    store = open_store(args.store or Path(run.run["data"]["path"]))
    # The validation split where there is one (held out, so its AUC means something),
    # spread over it so that both classes are in; else spread over the whole store.
    pool = store.split_indices("valid") if "valid" in store.split_names else np.arange(len(store))
    rows = pool[np.unique(np.linspace(0, len(pool) - 1, min(args.n, len(pool))).astype(np.int64))]
    patches, labels = store.read_batch(rows), store.labels[rows]

    baseline = create_model(run.config["model"], drop_rate=run.config["drop_rate"])
    baseline.load_state_dict(run.model.state_dict())
    baseline.eval()

    export_run(args.run, format="onnx", out=args.run / "model.onnx")
    onnx_run = load_exported_run(args.run / "model.onnx")
    engines = {
        "timm eager fp32, batch 64": lambda: baseline_probs(baseline, patches, run.mean, run.std, run.crop_px),
        "histodetect predict": lambda: predict_patches(run, patches),
        "histodetect predict --fp32": lambda: predict_patches(run_fp32, patches),
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
    labelled = labels >= 0
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average {os.getloadavg()[0]:.1f}; bf16 fast here: {bf16_is_fast(torch.device('cpu'))}; "
          f"model {run.config['model']}, input {run.crop_px or 96} px, {len(patches)} patches")
    rates = {name: len(patches) / min(seconds) for name, seconds in timings.items()}
    base = rates["timm eager fp32, batch 64"]
    for name, rate in rates.items():
        diff = float(np.abs(baseline_probs_ - results[name]).max())
        auc = (f", ROC AUC {roc_auc_score(labels[labelled], results[name][labelled]):.4f}"
               if len(np.unique(labels[labelled])) == 2 else "")
        print(f"  {name:<34} {rate:8,.0f} patches/s  {rate / base:.2f}x  max |prob difference| {diff:.1e}{auc}")


if __name__ == "__main__":
    main()
