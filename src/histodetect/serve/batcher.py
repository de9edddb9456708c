"""Request batching: one worker thread owns the model; concurrent requests run together.

Each request's patches join a queue. The worker takes the first waiting request,
then everything already queued and whatever arrives within `max_wait_ms`, up to
`max_batch_patches`, and scores them in one model call per TTA setting. A batch
of 32 patches costs far less than 32 batches of one on a CPU, so throughput rises
with concurrency (benchmarks/serve_load.py). Keeping the model on one thread also
means Grad-CAM's hooks never see another request's forward pass.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np


class ServerBusy(Exception):
    """The queue holds max_queued_patches already; answered with 503 and Retry-After."""


@dataclass
class ScoredPatches:
    """One request's share of a batch."""

    logits: np.ndarray  # (N, 1, V): one pass, V dihedral views, before temperature scaling
    overlays: np.ndarray | None  # (N, ...) what the overlay function gave per patch (the app's: Grad-CAM maps)


@dataclass
class _Job:
    patches: np.ndarray  # (N, 96, 96, 3) uint8
    tta: int
    overlay: bool
    future: Future = field(default_factory=Future)


@dataclass
class BatcherStats:
    requests: int = 0
    patches: int = 0
    batches: int = 0  # model calls; requests / batches is how much batching happened


ScoreFn = Callable[[np.ndarray, int], np.ndarray]  # (patches uint8 (N, 96, 96, 3), tta) -> logits (N, 1, tta)
OverlayFn = Callable[[np.ndarray], np.ndarray]  # patches uint8 (N, 96, 96, 3) -> (N, ...), e.g. Grad-CAM maps


class PredictionBatcher:
    """Queue of scoring requests served by one worker thread that owns the model."""

    def __init__(self, score: ScoreFn, overlay: OverlayFn, *, max_batch_patches: int,
                 max_wait_ms: float, max_queued_patches: int):
        self._score, self._overlay = score, overlay
        self.max_batch_patches, self.max_wait_s = max_batch_patches, max_wait_ms / 1000
        self.max_queued_patches = max_queued_patches
        self.stats = BatcherStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._queued_patches = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def queued_patches(self) -> int:
        return self._queued_patches

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="histodetect-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the queued requests, then end the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, patches_uint8: np.ndarray, tta: int, overlay: bool = False) -> Future:
        """Queue patches (N, 96, 96, 3) uint8; the future's result is a `ScoredPatches`."""
        if self._thread is None:
            raise RuntimeError("PredictionBatcher.submit before start()")
        with self._lock:
            if self._queued_patches + len(patches_uint8) > self.max_queued_patches:
                raise ServerBusy(f"server busy: {self._queued_patches} patches queued (limit "
                                 f"{self.max_queued_patches}); retry in a second")
            self._queued_patches += len(patches_uint8)
        job = _Job(patches_uint8, tta, overlay)
        self._queue.put(job)
        return job.future

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus what is queued or arrives within max_wait, up to max_batch_patches."""
        jobs, n_patches, stop = [first], len(first.patches), False
        deadline = time.perf_counter() + self.max_wait_s
        while n_patches < self.max_batch_patches:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
            n_patches += len(job.patches)
        return jobs, stop

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._gather(first)
            with self._lock:
                self._queued_patches -= sum(len(job.patches) for job in jobs)
            # A request the ASGI server cancelled (client gone, shutdown) cancelled its future:
            # skip it, and mark the rest running so that a later cancel cannot make set_result
            # raise InvalidStateError here, which would end this thread and hang every request after.
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            for tta in sorted({job.tta for job in jobs}):
                self._run([job for job in jobs if job.tta == tta], tta)

    def _run(self, jobs: list[_Job], tta: int) -> None:
        try:
            logits = self._score(np.concatenate([job.patches for job in jobs]), tta)  # (N, 1, tta)
            wanted = [job for job in jobs if job.overlay]
            overlays = self._overlay(np.concatenate([job.patches for job in wanted])) if wanted else None
        except Exception as exc:  # a bug: raised again in each waiting request, which answers 500
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.stats.requests += len(jobs)
        self.stats.patches += len(logits)
        self.stats.batches += 1
        begin = overlay_begin = 0
        for job in jobs:
            n = len(job.patches)
            job_overlays = None
            if job.overlay:
                job_overlays = overlays[overlay_begin : overlay_begin + n]
                overlay_begin += n
            job.future.set_result(ScoredPatches(logits[begin : begin + n], job_overlays))
            begin += n
