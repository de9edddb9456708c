"""Accuracy on real tissue: train presets on pcam-jpeg's train split, score its valid split.

    .venv/bin/python benchmarks/accuracy.py --presets cpu [--work /tmp/hd-acc] [--data ../shared/data/pcam-jpeg]

PCam's train and valid splits come from different slides, so valid is an honest
held-out set. For each preset: the training time, epochs run, and valid accuracy
(at the threshold chosen on valid for that many views at the end of training, and
at 0.5) and ROC AUC with TTA 1 and 8. `cpu` must reach >= 0.87 accuracy and >= 0.94 AUC in <= 10
minutes on the 2-core machine (issue #3); the GPU presets are in benchmarks/gpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from histodetect.data.store import is_store, prepare
from histodetect.evaluate import evaluate_run
from histodetect.train import fit, preset_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pcam-jpeg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="cpu")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hd-acc"))
    args = parser.parse_args()
    store = args.work / "store"
    if not is_store(store):
        prepare(args.data, store, progress=False)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average before: {os.getloadavg()[0]:.1f}")
    for name in args.presets.split(","):
        out = args.work / f"run-{name}"
        result = fit(preset_config(name), store, out, overwrite=True, preset=name, progress=False)
        run = json.loads((out / "run.json").read_text())
        row = {"preset": name, "model": run["config"]["model"], "train_minutes": round(run["train_seconds"] / 60, 2),
               "epochs": result.epochs_run, "stopped": result.stopped_because,
               "load_average_after": round(os.getloadavg()[0], 1)}
        # 72 views (crops moved by the training shift) where the run was trained on a shifted crop.
        for tta in [t for t in (1, 8, 72) if t <= 8 or str(t) in (run.get("thresholds") or {})]:
            m = evaluate_run(out, store, split="valid", tta=tta, n_boot=1000)
            row[f"tta{tta}"] = {"accuracy": round(m["accuracy"], 4), "threshold": round(m["threshold"], 3),
                                "accuracy_at_0.5": round(m["accuracy_at_0.5"], 4),
                                "roc_auc": round(m["roc_auc"], 4), "roc_auc_ci": [round(v, 4) for v in m["roc_auc_ci"]]}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
