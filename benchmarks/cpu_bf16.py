"""Training step speed on the CPU: fp32 against bf16 autocast, channels_last, fused AdamW.

    .venv/bin/python benchmarks/cpu_bf16.py [--model histo_tinynet] [--batch 128]

bf16 pays off only on CPUs with native bf16 matrix units (AMX, AVX512-BF16);
`train.bf16_is_fast` turns it on there. Same model, batch and data for both, in one run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from histodetect.models import create_model
from histodetect.train import bf16_is_fast


def samples_per_second(model_name: str, size_px: int, batch: int, bf16: bool, steps: int = 8) -> float:
    torch.manual_seed(0)
    model = create_model(model_name).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    x = torch.randn(batch, 3, size_px, size_px).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,)).float()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).float().reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="histo_tinynet")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16: {bf16_is_fast(torch.device('cpu'))}")
    for size_px in (64, 96):
        fp32 = samples_per_second(args.model, size_px, args.batch, bf16=False)
        bf16 = samples_per_second(args.model, size_px, args.batch, bf16=True)
        print(f"{args.model} {size_px} px: fp32 {fp32:6.0f}/s  bf16 {bf16:6.0f}/s  ({bf16 / fp32:.2f}x)")


if __name__ == "__main__":
    main()
