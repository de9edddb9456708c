"""Where training runs: the device, whether bf16 autocast pays there, and torchrun's process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the process group torchrun set up (RANK / WORLD_SIZE in the environment)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, dist: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
        if name == "cuda":
            name = f"cuda:{dist.local_rank}"
    elif name != "cpu":
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} GPUs (cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1})")
    return device


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here: on CUDA, and on CPUs with native
    bf16 matrix units (AMX or AVX512-BF16), where a histo_tinynet training step ran
    1.5-1.7x faster than fp32 (benchmarks/cpu_bf16.py). Elsewhere bf16 is emulated."""
    if device.type == "cuda":
        return True
    native = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return device.type == "cpu" and any(check is not None and check() for check in native)
