"""`prepare` against a plain single-process Pillow loop, and random batch reads from a store.

    .venv/bin/python benchmarks/prepare_speed.py [--n 100000] [--work /tmp/hd-bench]

Measured in one run, on the same files:
  * a Kaggle-style folder of N synthetic uncompressed .tif patches (written once, cached in --work),
  * the real shared samples (../shared/data/kaggle-sample and pcam-jpeg).
For each: patches/s of a plain loop `np.asarray(Image.open(f).convert("RGB"))` over
the files, and of `prepare` (decode, SHA-1, pack, on every core). The page cache
is warmed by one untimed read of every file first, so both read from memory.
Then: random batches of 256 patches from the prepared store (target >= 50,000/s).
Targets (issue #2): prepare >= 1.8x the loop on the 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from histodetect.data.formats import open_source
from histodetect.data.store import open_store, prepare
from histodetect.data.synthetic import write_synthetic

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def warm(files: list[Path]) -> None:
    for path in files:
        path.read_bytes()


def pillow_loop(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB"))
    return len(files) / (time.perf_counter() - start)


def prepare_rate(src: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    report = prepare(src, out, progress=False)
    return report.n_patches / report.seconds


def random_batch_rate(store_path: Path, batch: int = 256, seconds: float = 5.0) -> float:
    store = open_store(store_path)
    rng = np.random.default_rng(0)
    store.read_batch(np.arange(len(store)))  # page cache warm, as in training after the first epoch
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        store.read_batch(rng.integers(0, len(store), batch))
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="synthetic .tif files (default 100,000)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hd-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    synthetic = args.work / f"kaggle-synthetic-{args.n}"
    if not synthetic.exists():
        start = time.perf_counter()
        write_synthetic(synthetic, args.n, format="kaggle", seed=0)
        print(f"wrote {args.n} synthetic .tif files in {time.perf_counter() - start:.0f} s")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    print(f"{'source':<28}{'files':>8}{'Pillow loop/s':>15}{'prepare/s':>12}{'speed-up':>10}")
    sources = [("synthetic-kaggle", synthetic)]
    sources += [(name, SHARED / name) for name in ("kaggle-sample", "pcam-jpeg") if (SHARED / name).is_dir()]
    for name, src in sources:
        files = open_source(src).files
        warm(files)
        loop = pillow_loop(files)
        packed = prepare_rate(src, args.work / f"store-{name}")
        print(f"{name:<28}{len(files):>8}{loop:>15,.0f}{packed:>12,.0f}{packed / loop:>9.2f}x")
    rate = random_batch_rate(args.work / "store-synthetic-kaggle")
    print(f"random batches of 256 from the {args.n}-patch store: {rate:,.0f} patches/s")


if __name__ == "__main__":
    main()
