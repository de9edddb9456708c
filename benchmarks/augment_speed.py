"""Time the choices behind histodetect.augment on the CPU, for 256 patches of 3x96x96.

Claims it backs (see the comments in src/histodetect/augment/):
  1. a per-image gather beats the other ways of applying a random symmetry per image;
  2. what augment_batch costs per batch with each augmentation on.

Run: .venv/bin/python benchmarks/augment_speed.py [--batch 256] [--threads 2]
Reports the best of --repeats runs in milliseconds; other load on the machine only
makes numbers worse, so run it on an idle machine and compare within one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from histodetect.augment import (
    AugmentConfig,
    _dihedral,
    augment_batch,
    random_dihedral,
)


def best_ms(run: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up, in milliseconds."""
    run()
    times_s = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        run()
        times_s.append(time.perf_counter() - start_s)
    return 1e3 * min(times_s)


# The alternatives to the gather in random_dihedral, as they would be written.
def dihedral_by_where(images: torch.Tensor) -> torch.Tensor:
    """Transpose, flip rows, flip columns, each kept per image by a random bit."""
    choice = torch.randint(8, (images.shape[0],))
    keep = lambda bit: ((choice & bit) != 0)[:, None, None, None]  # noqa: E731
    images = torch.where(keep(4), images.transpose(-2, -1), images)
    images = torch.where(keep(2), images.flip(-2), images)
    return torch.where(keep(1), images.flip(-1), images)


def dihedral_by_group(images: torch.Tensor) -> torch.Tensor:
    """Split the batch by drawn symmetry, transform each group, scatter back."""
    choice = torch.randint(8, (images.shape[0],))
    out = torch.empty_like(images)
    for k in range(8):
        members = (choice == k).nonzero().squeeze(1)
        out[members] = _dihedral(images[members], k)
    return out


def dihedral_by_stack(images: torch.Tensor) -> torch.Tensor:
    """Build all 8 views of the batch, then pick one per image."""
    choice = torch.randint(8, (images.shape[0],))
    views = torch.stack([_dihedral(images, k) for k in range(8)])
    return views[choice, torch.arange(images.shape[0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    patches_uint8 = torch.randint(256, (args.batch, 96, 96, 3), dtype=torch.uint8)  # as stored
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, best of {args.repeats}")

    print("\n1. one random symmetry per image (ms)")
    for label, images in (
        ("uint8 NCHW", patches_uint8.permute(0, 3, 1, 2).contiguous()),
        ("uint8 channels_last", patches_uint8.permute(0, 3, 1, 2)),
        ("float32 NCHW", patches_uint8.permute(0, 3, 1, 2).contiguous().float()),
    ):
        timings = {
            "gather": best_ms(lambda: random_dihedral(images), args.repeats),
            "where x3": best_ms(lambda: dihedral_by_where(images), args.repeats),
            "group": best_ms(lambda: dihedral_by_group(images), args.repeats),
            "stack 8": best_ms(lambda: dihedral_by_stack(images), args.repeats),
        }
        print(f"  {label:20s}" + "".join(f"{name:>10s} {ms:6.1f}" for name, ms in timings.items()))

    print("\n2. augment_batch from uint8 (N, 96, 96, 3) (ms)")
    mean, std = (0.70, 0.54, 0.69), (0.17, 0.20, 0.15)
    generator = torch.Generator().manual_seed(0)
    for label, config in (
        ("nothing", AugmentConfig()),
        ("crop 64", AugmentConfig(crop_px=64)),
        ("dihedral", AugmentConfig(dihedral=True)),
        ("crop 64, shift 8, dihedral", AugmentConfig(crop_px=64, shift_px=8, dihedral=True)),
        ("HED 0.05/0.05", AugmentConfig(hed_sigma=0.05, hed_bias=0.05)),
        ("colour 0.1/0.1/0.1/0.05", AugmentConfig(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.05)),
        ("all of the above", AugmentConfig(
            dihedral=True, hed_sigma=0.05, hed_bias=0.05, brightness=0.1, contrast=0.1,
            saturation=0.1, hue=0.05, crop_px=64, shift_px=8,
        )),
    ):
        ms = best_ms(lambda: augment_batch(patches_uint8, config, mean, std, generator), args.repeats)
        print(f"  {label:28s} {ms:6.1f}")


if __name__ == "__main__":
    main()
