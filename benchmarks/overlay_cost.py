"""What a Grad-CAM overlay costs the server's model thread, in scored test-time views.

    .venv/bin/python benchmarks/overlay_cost.py RUN [--threads 1 2] [--rounds 7] [--data ../shared/data/pcam-jpeg/valid]

The serve queue counts work in views (patches x tta), and an overlay as
serve.batcher.OVERLAY_VIEWS views more per patch. This times, on 256 real patches,
predict_samples at tta 8 and the serve app's Grad-CAM call, alternating, `--rounds`
times per torch thread count, and prints the median and range of
(Grad-CAM seconds per patch) / (seconds per scored view).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from histodetect.data.decode import decode_patch_file
from histodetect.explain import class_activation_maps
from histodetect.predict import load_run, predict_samples

SHARED_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam-jpeg" / "valid"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (the cpu preset's, for the number in batcher.py)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--data", type=Path, default=SHARED_VALID, help="folder of real .jpg patches")
    args = parser.parse_args()
    patches = np.stack([decode_patch_file(f).patch for f in sorted(args.data.rglob("*.jpg"))[:256]])  # (256, 96, 96, 3)
    for threads in args.threads:
        run = load_run(args.run, device="cpu", threads=threads)

        def gradcam() -> None:  # as serve/app.py calls it
            class_activation_maps(run.model, patches, mean=run.mean, std=run.std, crop_px=run.crop_px,
                                  device=run.device, method="gradcam")

        def views() -> None:
            predict_samples(run, patches, tta=8)

        gradcam(), views()  # warm-up
        ratios = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            views()
            scored = time.perf_counter()
            gradcam()
            ratios.append((time.perf_counter() - scored) / ((scored - start) / 8))
        print(f"{threads} torch thread(s): an overlay costs {np.median(ratios):.1f} views "
              f"(range {min(ratios):.1f}-{max(ratios):.1f}, {args.rounds} rounds; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
