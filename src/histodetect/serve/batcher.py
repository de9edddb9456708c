"""Request batching: one worker thread owns the model; concurrent requests run together.

Each request's patches join a queue. The worker takes the first waiting request,
then everything already queued and whatever arrives within `max_wait_ms`, up to
`max_batch_patches`, and scores them in one model call per TTA setting. A batch
of 32 patches costs far less than 32 batches of one on a CPU, so throughput rises
with concurrency (benchmarks/serve_load.py). Keeping the model on one thread also
means Grad-CAM's hooks never see another request's forward pass.

The queue is bounded in work, not patches: a patch costs its test-time views (1 to
72) and a Grad-CAM overlay `OVERLAY_VIEWS` more, so the bound holds a request's wait
whatever it asks for. Past it a request is refused (ServerBusy, a 503) with a wait
estimated from the worker's measured views per second; a request over the bound on
its own is queued when the queue is empty, so none is refused for good.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np


# A Grad-CAM overlay (a forward and a backward pass) costs about as much as this many
# scored views per patch with two torch threads, the default on a 2-core CPU: medians
# 4.8, 7.0 and 9.0 in three runs on a loaded one; 1.3 with one thread
# (benchmarks/overlay_cost.py, a cpu-preset histo_tinynet). The throughput behind
# Retry-After is measured in these same views, so it includes the overlays' real cost.
OVERLAY_VIEWS = 8
# Retry-After is the measured time to work through the queue, 1 s to this: past a
# minute a client is better told to come back later than to wait for it.
MAX_RETRY_AFTER_S = 60
THROUGHPUT_BATCHES = 16  # the last model calls the throughput is measured over


class ServerBusy(Exception):
    """The queue holds max_queued_views already; answered with 503 and Retry-After."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class ScoredPatches:
    """One request's share of a batch."""

    logits: np.ndarray  # (N, 1, V): one pass, V dihedral views, before temperature scaling
    overlays: np.ndarray | None  # (N, ...) what the overlay function gave per patch (the app's: Grad-CAM maps)


def job_views(n_patches: int, tta: int, overlay: bool) -> int:
    """The work of scoring n_patches at `tta` views, with or without overlays, in scored views."""
    return n_patches * (tta + (OVERLAY_VIEWS if overlay else 0))


def retry_after_s(queued_views: int, views_per_s: float | None) -> int:
    """Whole seconds until the worker has done `queued_views`, 1 to MAX_RETRY_AFTER_S; 1 before it is measured."""
    if not views_per_s:
        return 1
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(queued_views / views_per_s)))


@dataclass
class _QueueShare:
    """A job's part of the queue's count. The future's cancel callback holds this, not the
    job: job -> future -> callback -> job would be a cycle keeping the pixels until a full GC."""

    patches: int
    views: int  # job_views
    counted: bool = True  # until the worker takes the job or its future is cancelled


@dataclass
class _Job:
    patches: np.ndarray  # (N, 96, 96, 3) uint8
    tta: int
    overlay: bool
    share: _QueueShare
    future: Future = field(default_factory=Future)


def _live_patches(job: _Job) -> int:
    """Patches a job adds to a batch: none once cancelled (its client has gone)."""
    return 0 if job.future.cancelled() else len(job.patches)


def _throughput(calls: deque[tuple[int, float]]) -> float | None:
    """Views per second of model calls (views, seconds); None before the first."""
    seconds = sum(s for _, s in calls)
    return sum(v for v, _ in calls) / seconds if seconds > 0 else None


@dataclass
class BatcherStats:
    requests: int = 0
    patches: int = 0
    views: int = 0  # job_views of what was scored, overlays included
    batches: int = 0  # model calls; requests / batches is how much batching happened


ScoreFn = Callable[[np.ndarray, int], np.ndarray]  # (patches uint8 (N, 96, 96, 3), tta) -> logits (N, 1, tta)
OverlayFn = Callable[[np.ndarray], np.ndarray]  # patches uint8 (N, 96, 96, 3) -> (N, ...), e.g. Grad-CAM maps


class PredictionBatcher:
    """Queue of scoring requests served by one worker thread that owns the model."""

    def __init__(self, score: ScoreFn, overlay: OverlayFn, *, max_batch_patches: int,
                 max_wait_ms: float, max_queued_views: int, max_queued_patches: int | None = None,
                 timer: Callable[[], float] = time.perf_counter):
        """The queue holds at most `max_queued_views` of work and `max_queued_patches` patches (their
        pixels: requests with fewer views than the server's default would otherwise queue more of
        them than that). `timer` times the model calls for Retry-After (a test passes a fake one)."""
        self._score, self._overlay, self._timer = score, overlay, timer
        self.max_batch_patches, self.max_wait_s = max_batch_patches, max_wait_ms / 1000
        self.max_queued_views, self.max_queued_patches = max_queued_views, max_queued_patches
        self.stats = BatcherStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._queued_patches = self._queued_views = 0
        self._recent_calls: deque[tuple[int, float]] = deque(maxlen=THROUGHPUT_BATCHES)  # (views, seconds)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def queued_patches(self) -> int:
        return self._queued_patches

    @property
    def queued_views(self) -> int:
        return self._queued_views

    @property
    def views_per_s(self) -> float | None:
        """The worker's throughput over its last THROUGHPUT_BATCHES model calls; None before the first."""
        with self._lock:
            return _throughput(self._recent_calls)

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
        """Queue patches (N, 96, 96, 3) uint8; the future's result is a `ScoredPatches`.

        Cancelling the future (the client has gone) takes the job out of the queue's
        count and frees its pixels at once; the worker skips it. A job already being
        scored cannot be cancelled.
        """
        if self._thread is None:
            raise RuntimeError("PredictionBatcher.submit before start()")
        share = _QueueShare(len(patches_uint8), job_views(len(patches_uint8), tta, overlay))
        with self._lock:
            # An empty queue takes any request, however big: else one over the limit would never be served.
            over_patches = (self.max_queued_patches is not None
                            and self._queued_patches + share.patches > self.max_queued_patches)
            if self._queued_views and (self._queued_views + share.views > self.max_queued_views or over_patches):
                wait_s = retry_after_s(self._queued_views, _throughput(self._recent_calls))
                limits = f"{self.max_queued_views:,}" + (f" views, {self.max_queued_patches:,} patches"
                                                         if self.max_queued_patches is not None else "")
                patches = f"{self._queued_patches:,} patch{'' if self._queued_patches == 1 else 'es'}"
                raise ServerBusy(f"server busy: {patches} queued, "
                                 f"{self._queued_views:,} test-time views of work (limit {limits}; this request "
                                 f"{share.views:,}); retry in {wait_s} s", wait_s)
            self._queued_patches += share.patches
            self._queued_views += share.views
        job = _Job(patches_uint8, tta, overlay, share)
        queued = weakref.ref(job)
        job.future.add_done_callback(lambda future: self._cancelled(share, queued) if future.cancelled() else None)
        self._queue.put(job)
        return job.future

    def _cancelled(self, share: _QueueShare, queued: weakref.ref[_Job]) -> None:
        """Uncount a cancelled job and free its pixels now, not when the worker reaches it.

        Once uncounted its room goes to new requests, so pixels it kept would be over the
        limit: clients that upload and hang up while the worker is busy would fill memory.
        """
        self._dequeue(share)
        job = queued()
        if job is not None:  # never scored: the worker skips a cancelled future
            job.patches = np.empty((0, *job.patches.shape[1:]), job.patches.dtype)

    def _dequeue(self, share: _QueueShare) -> None:
        """Take a job out of the queue's count, once: when the worker takes it or its future is cancelled."""
        with self._lock:
            if share.counted:
                share.counted = False
                self._queued_patches -= share.patches
                self._queued_views -= share.views

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus what is queued or arrives within max_wait, up to max_batch_patches."""
        jobs, n_patches, stop = [first], _live_patches(first), False
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
            n_patches += _live_patches(job)
        return jobs, stop

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._gather(first)
            for job in jobs:
                self._dequeue(job.share)
            # A request the ASGI server cancelled (client gone, shutdown) cancelled its future:
            # skip it, and mark the rest running so that a later cancel cannot make set_result
            # raise InvalidStateError here, which would end this thread and hang every request after.
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            for tta in sorted({job.tta for job in jobs}):
                self._run([job for job in jobs if job.tta == tta], tta)

    def _run(self, jobs: list[_Job], tta: int) -> None:
        started = self._timer()
        try:
            logits = self._score(np.concatenate([job.patches for job in jobs]), tta)  # (N, 1, tta)
            wanted = [job for job in jobs if job.overlay]
            overlays = self._overlay(np.concatenate([job.patches for job in wanted])) if wanted else None
        except Exception as exc:  # a bug: raised again in each waiting request, which answers 500
            for job in jobs:
                job.future.set_exception(exc)
            return
        views = sum(job.share.views for job in jobs)
        with self._lock:
            self._recent_calls.append((views, self._timer() - started))
        self.stats.requests += len(jobs)
        self.stats.patches += len(logits)
        self.stats.views += views
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
