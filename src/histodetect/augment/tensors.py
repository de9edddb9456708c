"""Small tensors made for a batch on its device: cached constants and random draws from an optional generator."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per values, dtype and device; never modify it in place.

    torch.tensor(..., device="cuda") copies from pageable host memory and then waits
    for the GPU to finish everything queued before it. Made on every augmentation
    step, such constants stalled GPU training: the CPU launched each step onto an
    idle GPU (resnet18's data path ran at 0.74 of pure compute on an H200, BENCHMARKS.md).
    """
    return torch.tensor(values, dtype=dtype, device=device)


def _draw_device(like: Tensor, generator: torch.Generator | None) -> torch.device:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor),
    # so one seed gives the same augmentations on CPU and GPU; the draws are a few
    # numbers per image, so moving them is cheap.
    return generator.device if generator is not None else like.device


def _uniform(
    shape: tuple[int, ...], low: float, high: float, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """U(low, high) samples on like's device and dtype; exactly `low` when low == high."""
    draws = torch.rand(shape, generator=generator, device=_draw_device(like, generator))
    return (low + (high - low) * draws).to(device=like.device, dtype=like.dtype)


def _randint(
    high: int, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Integers in [0, high) on like's device."""
    draws = torch.randint(high, shape, generator=generator, device=_draw_device(like, generator))
    return draws.to(like.device)
