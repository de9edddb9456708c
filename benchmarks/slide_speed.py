"""Whole-slide speed: tiles/s split into tissue masking, reading and inference; peak memory; reading workers.

    .venv/bin/python benchmarks/slide_speed.py RUN [--slide /tmp/slide20k.tif] [--size-px 20000]
        [--whole-workers 0] [--workers 0 1 2] [--compare-px 4096] [--rounds 3] [--batch-size 256]
        [--patches ../shared/data/pcam-jpeg]

RUN is a run folder (speed does not depend on the weights: one epoch of
`histodetect train --preset cpu --epochs 1` will do). The slide is synthetic
but made of real tissue: a pyramidal, JPEG-compressed TIFF whose level 0 is
`--size-px` square at PCam's resolution (0.972 um/px), an ellipse of real PCam
patches (../shared/data/pcam-jpeg, train split) on glass, built once and reused.

1. The whole slide with reading inline (workers 0): the summary's seconds for
   masking, reading and inference are then each step's own time; and with each
   other `--whole-workers` value.
2. A central `--compare-px` square (`--roi`) with each `--workers` value, in
   interleaved rounds (the best and the median round reported): whether reading in
   worker processes, overlapped with inference, pays on this machine.
Each analysis runs in a fresh process, which reports its peak RSS (and its
workers'). On a GPU machine the device is picked automatically; try
`--workers 0 2 4 8 --batch-size 1024` there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Keep this module's top level light: reading workers are spawned and re-import it.
import numpy as np

PCAM_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "pcam-jpeg"
PATCH = 96
GLASS = 245
TILE = 256  # the TIFF's own tile size


def build_slide(path: Path, size_px: int, patches: Path = PCAM_JPEG, n_levels: int = 5, n_patches: int = 2000) -> None:
    """Write the synthetic slide tile by tile (never the whole level in memory)."""
    import tifffile
    from PIL import Image

    files = sorted((patches / "train" / "0").glob("*.jpg"))[: n_patches // 2]
    files += sorted((patches / "train" / "1").glob("*.jpg"))[: n_patches // 2]
    if not files:
        sys.exit(f"{patches}: no patches; the benchmark builds its slide from the shared PCam patches")
    rng = np.random.default_rng(0)
    bank = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]
                    + [np.clip(GLASS + rng.normal(0, 2, (PATCH, PATCH, 3)), 0, 255).astype(np.uint8)])
    places = -(-size_px // PATCH)
    r, c = np.mgrid[:places, :places]
    centre = (places - 1) / 2
    in_tissue = ((r - centre) / (0.45 * places)) ** 2 + ((c - centre) / (0.40 * places)) ** 2 <= 1
    table = np.where(in_tissue, rng.integers(0, len(files), (places, places)), len(files))  # last: glass

    def level_tiles(k: int):
        side = PATCH >> k  # a patch place's side at level k
        level_bank = bank.reshape(len(bank), side, PATCH // side, side, PATCH // side, 3).mean((2, 4)).astype(np.uint8)
        size = -(-size_px // 2**k)
        for y0 in range(0, size, TILE):
            for x0 in range(0, size, TILE):
                ys, xs = np.arange(y0, y0 + TILE), np.arange(x0, x0 + TILE)
                index = table[np.minimum(ys // side, places - 1)][:, np.minimum(xs // side, places - 1)]
                yield level_bank[index, (ys % side)[:, None], (xs % side)[None, :]]

    tmp = path.with_name(f".{path.name}.tmp")
    options = dict(tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                   dtype=np.uint8, resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for k in range(n_levels):
            size = -(-size_px // 2**k)
            extra = dict(subifds=n_levels - 1) if k == 0 else dict(subfiletype=1)
            tif.write(level_tiles(k), shape=(size, size, 3), resolution=(1e4 / (0.972 * 2**k),) * 2,
                      **options, **extra)
    os.replace(tmp, path)


def peak_rss_mib(pid: int | str = "self") -> float:
    """VmHWM of a process (Linux): its peak resident memory since it last exec'd.

    Not getrusage's ru_maxrss: a spawned worker's counts the moment it was forked
    from this process, torch and all, before it exec'd a fresh interpreter.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class ChildrenPeak(threading.Thread):
    """Samples the peak memory of this process's children (the reading workers) while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mib, self.stopped = 0.0, threading.Event()
        self.own_cmdline = Path("/proc/self/cmdline").read_bytes()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid() and \
                            (stat.parent / "cmdline").read_bytes() != self.own_cmdline:  # exec'd already
                        self.peak_mib = max(self.peak_mib, peak_rss_mib(stat.parent.name))
                except (OSError, ValueError, IndexError):
                    pass  # the process ended while we looked


def analyse_once(run_dir: str, slide: str, workers: int, batch_size: int, roi: list[int] | None) -> dict:
    """One analysis in this process; the summary's numbers plus peak memory."""
    import torch

    from histodetect.predict import load_run
    from histodetect.slide import SlideConfig, analyse_slide

    run = load_run(Path(run_dir))
    children = ChildrenPeak()
    children.start()
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = analyse_slide(run, Path(slide), Path(out) / "result",
                               SlideConfig(workers=workers, batch_size=batch_size, roi=tuple(roi) if roi else None),
                               progress=False)
        wall = time.perf_counter() - started
    children.stopped.set()
    s = result.summary
    device = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "CPU"
    return {
        "workers": workers, "device": device, "tiles": s["tiles_read"], "seconds": wall,
        "tiles_per_s": s["tiles_read"] / wall, "seconds_mask": s["seconds_mask"],
        "seconds_read": s["seconds_read"], "seconds_inference": s["seconds_inference"],
        "peak_rss_mib": peak_rss_mib(), "peak_rss_worker_mib": children.peak_mib,
    }


def run_in_subprocess(args: argparse.Namespace, workers: int, roi: list[int] | None) -> dict:
    command = [sys.executable, __file__, "--one", json.dumps([str(args.run), str(args.slide), workers,
                                                               args.batch_size, roi])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"analysis with {workers} workers failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(analyse_once(*json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--slide", type=Path, default=Path(tempfile.gettempdir()) / "histodetect-slide20k.tif")
    parser.add_argument("--size-px", type=int, default=20000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--compare-px", type=int, default=4096, help="side of the central region for --workers")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the --workers comparison")
    parser.add_argument("--whole-workers", type=int, nargs="+", default=[0],
                        help="reading workers for the whole-slide runs (0: inline, each step's own time)")
    parser.add_argument("--skip-whole", action="store_true", help="only the --workers comparison")
    parser.add_argument("--patches", type=Path, default=PCAM_JPEG, help="the pcam-jpeg folder the slide is built from")
    args = parser.parse_args()
    if not args.slide.exists():
        started = time.perf_counter()
        build_slide(args.slide, args.size_px, args.patches)
        print(f"built {args.slide} ({args.slide.stat().st_size / 2**20:.0f} MiB) "
              f"in {time.perf_counter() - started:.0f} s")
    print(f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d')}; slide {args.size_px} px square at 0.972 um/px; run {args.run}")
    for workers in [] if args.skip_whole else args.whole_workers:
        whole = run_in_subprocess(args, workers, None)
        how = f"{workers} reading workers" if workers else "reading inline"
        print(f"whole slide, {how}: {whole['tiles']} tiles in {whole['seconds']:.1f} s = "
              f"{whole['tiles_per_s']:.0f} tiles/s on {whole['device']}")
        for step in ("mask", "read", "inference"):
            seconds = whole[f"seconds_{step}"]
            rate = f", {whole['tiles'] / seconds:,.0f} tiles/s" if step != "mask" and seconds > 0 else ""
            label = "waiting for tiles" if step == "read" and workers else step
            print(f"  {label:<17} {seconds:7.1f} s{rate}")
        print(f"  peak RSS {whole['peak_rss_mib']:.0f} MiB" +
              (f", a worker {whole['peak_rss_worker_mib']:.0f} MiB" if workers else ""))
    side = min(args.compare_px, args.size_px)
    roi = [(args.size_px - side) // 2, (args.size_px - side) // 2, side, side]
    print(f"central {side} px square (--roi {','.join(map(str, roi))}), reading workers, "
          f"{args.rounds} interleaved rounds, best round (median):")
    rounds: dict[int, list[dict]] = {w: [] for w in args.workers}
    for _ in range(args.rounds):
        for workers in args.workers:
            rounds[workers].append(run_in_subprocess(args, workers, roi))
    for workers, results in rounds.items():
        best = max(results, key=lambda r: r["tiles_per_s"])
        median = float(np.median([r["tiles_per_s"] for r in results]))
        worker = f", a worker {best['peak_rss_worker_mib']:.0f} MiB" if workers else ""
        print(f"  workers {workers}: {best['tiles']} tiles, {best['tiles_per_s']:5.0f} ({median:.0f}) tiles/s; "
              f"best round: waiting for tiles {best['seconds_read']:.1f} s, "
              f"inference {best['seconds_inference']:.1f} s, "
              f"peak RSS {best['peak_rss_mib']:.0f} MiB{worker}")


if __name__ == "__main__":
    main()
