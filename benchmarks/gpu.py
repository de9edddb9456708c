"""Everything issue #3 measures on a GPU, in one run (H100 / H200 class card).

    python benchmarks/gpu.py --data PCAM_JPEG_DIR --work /tmp/hd-gpu [--out results.json]

1. Training throughput of resnet18 at 96x96, batch 256, bf16, channels_last, fused AdamW:
   a. pure compute: random uint8-free float data already on the GPU, no augmentation;
   b. histodetect's data path: the store's train split resident on the GPU as uint8,
      `augment_batch` with the `default` preset's augmentations, normalisation fused;
   c. a reference PyTorch DataLoader: per-sample torchvision transforms (flips,
      rotation, colour jitter, ToTensor, Normalize), 8 workers, pinned memory.
   Targets: b >= 0.85 a, and b >= 2 c.
2. Accuracy on real tissue: `seed-mobilenetv2`, `seed-xception` and `default` trained
   on the pcam-jpeg train split, scored on its valid split with TTA 1 and 8.
   Targets: default >= 0.89 accuracy and >= 0.955 ROC AUC, and >= 8 points above both seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from histodetect.augment import augment_batch
from histodetect.data.store import is_store, open_store, prepare
from histodetect.evaluate import evaluate_run
from histodetect.models import create_model
from histodetect.train import PRESETS, DeviceBatches, build_optimizer, fit, preset_config, training_loss

BATCH = 256
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timed_steps(step, n_warmup: int, n_steps: int) -> float:
    """Patches per second of `step()` over n_steps, after n_warmup untimed steps."""
    for _ in range(n_warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    torch.cuda.synchronize()
    return n_steps * BATCH / (time.perf_counter() - start)


def make_trainer(device):
    model = create_model("resnet18").to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(preset_config("default", model="resnet18"), model)

    def train_step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).float().reshape(-1)
        loss = training_loss(logits, y, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def throughput(store_path: Path, device: torch.device, n_steps: int) -> dict:
    store = open_store(store_path)
    rows = store.split_indices("train")
    results = {}

    step = make_trainer(device)
    x = torch.randn(BATCH, 3, 96, 96, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (BATCH,), device=device).float()
    results["pure_compute"] = timed_steps(lambda: step(x, y), 20, n_steps)

    step = make_trainer(device)
    # The default preset's augmentations, without its crop: the model sees 96 px, as in a.
    aug = dataclasses.replace(PRESETS["default"].augment(), crop_px=0, shift_px=0)
    batches = DeviceBatches(store, rows, device, BATCH, seed=0, resident_fraction=0.5)
    generator = torch.Generator(device=device).manual_seed(0)
    stream = iter(())

    def data_path_step():
        nonlocal stream
        try:
            patches, labels = next(stream)
        except StopIteration:
            stream = batches.epoch(np.random.randint(1 << 30))
            patches, labels = next(stream)
        step(augment_batch(patches, aug, MEAN, STD, generator=generator), labels)

    results["histodetect_data_path"] = timed_steps(data_path_step, 20, n_steps)

    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class StoreDataset(Dataset):
        transform = transforms.Compose([
            transforms.ToPILImage(), transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
            transforms.RandomChoice([transforms.RandomRotation((a, a)) for a in (0, 90, 180, 270)]),
            transforms.ColorJitter(0.15, 0.15, 0.1, 0.03), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ])

        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return self.transform(np.asarray(store.patches[rows[i]])), float(store.labels[rows[i]])

    step = make_trainer(device)
    loader = DataLoader(StoreDataset(), batch_size=BATCH, shuffle=True, num_workers=8, pin_memory=True,
                        drop_last=True, persistent_workers=True)
    iterator = iter(loader)

    def dataloader_step():
        nonlocal iterator
        try:
            xb, yb = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            xb, yb = next(iterator)
        step(xb.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last),
             yb.to(device, non_blocking=True).float())

    results["reference_dataloader"] = timed_steps(dataloader_step, 10, n_steps)
    results["data_path_vs_compute"] = results["histodetect_data_path"] / results["pure_compute"]
    results["data_path_vs_dataloader"] = results["histodetect_data_path"] / results["reference_dataloader"]
    return results


def accuracy(store_path: Path, work: Path, presets: list[str]) -> dict:
    results = {}
    for name in presets:
        out = work / f"run-{name}"
        start = time.perf_counter()
        fit(preset_config(name), store_path, out, overwrite=True, preset=name, progress=False)
        minutes = (time.perf_counter() - start) / 60
        for tta in (1, 8):
            m = evaluate_run(out, store_path, split="valid", tta=tta, n_boot=200)
            results[f"{name}/tta{tta}"] = {"accuracy": m["accuracy"], "roc_auc": m["roc_auc"],
                                          "accuracy_at_0.5": m["accuracy_at_0.5"], "minutes": minutes}
            print(name, tta, results[f"{name}/tta{tta}"], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="pcam-jpeg folder, or a store of it")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hd-gpu"))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per throughput variant")
    parser.add_argument("--presets", default="default,seed-mobilenetv2,seed-xception")
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    store = args.data if is_store(args.data) else args.work / "store"
    if not is_store(store):
        prepare(args.data, store, progress=False)
    results = {"device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__}
    results["throughput"] = throughput(store, device, args.steps)
    print(json.dumps(results["throughput"], indent=2), flush=True)
    if not args.skip_accuracy:
        results["accuracy"] = accuracy(store, args.work, args.presets.split(","))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
