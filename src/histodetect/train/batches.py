"""The training shard as uint8 batches on the device, in a seeded order per epoch.

Patches stay uint8 until they are on the device. On the GPU the whole shard lives there
when it fits under `resident_fraction` of free memory, otherwise batches are gathered
from the memory-mapped store by a background thread into pinned memory and copied on a
side stream. On the CPU each batch is gathered from the memory map as the step asks.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from ..data.store import PatchStore


class DeviceBatches:
    """The training shard as uint8 batches on the device, in a seeded order per epoch."""

    def __init__(self, store: PatchStore, rows: np.ndarray, device: torch.device, batch_size: int,
                 seed: int, resident_fraction: float):
        self.store, self.rows, self.device, self.batch_size, self.seed = store, rows, device, batch_size, seed
        self.labels = torch.from_numpy(store.labels[rows].astype(np.float32)).to(device)
        shard_bytes = len(rows) * int(np.prod(store.patches.shape[1:]))
        if device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(device)
            self.resident = shard_bytes < resident_fraction * free_bytes
        else:
            # The memory map is already in RAM through the page cache: a copy of Kaggle's
            # 198,022-patch train split cost 5.5 GB more RAM and 15 s before the first step,
            # and gathered 128 patches in 2.8 ms against 1.4 ms from the memory map, on a
            # CPU whose training step takes ~250 ms (2026-12-06, a 277,483-patch store).
            self.resident = False
        self.patches = torch.from_numpy(store.read_batch(rows)).to(device) if self.resident else None
        self.steps_per_epoch = len(rows) // batch_size  # drop the ragged last batch

    def order(self, epoch: int) -> torch.Tensor:
        """A permutation of the shard for `epoch`, the same whenever it is asked for (resume)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.rows), generator=generator)

    def epoch(self, epoch: int, first_step: int = 0):
        """Yield (patches uint8 (B, 96, 96, 3), labels float (B,)) from `first_step` on."""
        order = self.order(epoch)
        # One copy of the epoch's order to the device, not one per step: a blocking
        # host-to-device copy waits for the GPU to finish the previous step.
        order_on_device = order.to(self.device)
        steps = range(first_step, self.steps_per_epoch)
        if self.resident:
            for s in steps:
                local = order_on_device[s * self.batch_size : (s + 1) * self.batch_size]
                yield self.patches[local], self.labels[local]
        elif self.device.type == "cpu":
            for s in steps:
                local = order[s * self.batch_size : (s + 1) * self.batch_size]
                yield torch.from_numpy(self.store.read_batch(self.rows[local.numpy()])), self.labels[local]
        else:
            yield from self._streamed(order, order_on_device, steps)

    def _streamed(self, order: torch.Tensor, order_on_device: torch.Tensor, steps: range):
        """Gather from the memory map in a thread, into pinned memory, copy on a side stream.

        An error in the thread (a read error, pinned memory running out) is raised
        here, in the training loop; when the loop leaves early (a time limit), the
        thread stops too instead of holding its pinned batches.
        """
        ready: queue.Queue = queue.Queue(maxsize=3)
        finished = threading.Event()

        def hand_over(item) -> bool:
            """Put `item` on the queue unless the consumer has gone; whether it was put."""
            while not finished.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for s in steps:
                    local = order[s * self.batch_size : (s + 1) * self.batch_size]
                    patches = torch.from_numpy(self.store.read_batch(self.rows[local.numpy()])).pin_memory()
                    if not hand_over((patches, s)):
                        return
                hand_over(None)
            except BaseException as error:  # noqa: BLE001 (re-raised in the training loop)
                hand_over(error)

        threading.Thread(target=produce, daemon=True, name="histodetect-batches").start()
        stream = torch.cuda.Stream(self.device)
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                patches, s = item
                with torch.cuda.stream(stream):
                    on_device = patches.to(self.device, non_blocking=True)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                on_device.record_stream(torch.cuda.current_stream(self.device))
                yield on_device, self.labels[order_on_device[s * self.batch_size : (s + 1) * self.batch_size]]
        finally:
            finished.set()
