"""Micro-batching for the service: concurrent requests share one model call.

Requests hand a preprocessed C x H x W array to :meth:`MicroBatcher.submit` and await their row of
probabilities. One asyncio task forms batches: it takes the oldest waiting item, then whatever else is
waiting, and waits for more until ``max_batch`` items or until ``max_wait_ms`` after the *oldest* item
was queued, whichever comes first; the batch then runs in one dedicated inference thread (onnxruntime or
torch release the GIL), while the event loop and the decode threads go on.

Fairness: batches are formed in arrival order, and the deadline counts from the oldest item, so an item
that was queued while a batch ran goes into the very next batch whenever at most ``max_batch`` items are
waiting. :meth:`MicroBatcher.submit` refuses an item (503) when more would wait than the next batch takes
(``max_batch`` while a batch runs), so no request waits longer than ``max_wait_ms`` plus one batch's
inference, whether or not the running batch left full (``tests/test_batching.py``).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class BatcherFull(RuntimeError):
    """More requests wait than the next batch can take; answering 503 keeps every wait within T + one batch."""


class BatcherRestarted(RuntimeError):
    """The batching task was restarted (new event loop, or the old task ended); this request was orphaned."""


class BatchMismatch(RuntimeError):
    """The model returned a different number of rows than the batch had items; no row can be trusted."""


def _fail(fut: asyncio.Future, err: BaseException) -> None:
    """Fail ``fut`` from any thread or loop; a future whose loop is closed has nobody left to tell."""
    if fut.done():
        return
    loop = fut.get_loop()
    try:
        if loop.is_closed():
            fut.set_exception(err)
        else:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_exception(err))
    except RuntimeError:  # closed loop with callbacks attached: the waiter is gone with it
        pass


@dataclass
class _Job:
    x: np.ndarray
    fut: asyncio.Future
    t_queued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchTiming:
    """What one request saw: time from queueing to its batch starting, the batch's size and run time."""

    queue_ms: float
    batch_size: int
    infer_ms: float


class MicroBatcher:
    """Collects items into batches of up to ``max_batch``, waiting at most ``max_wait_ms`` for the oldest."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int = 8, max_wait_ms: float = 10.0):
        self.fn = fn
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidcxr-infer")
        self._queue: asyncio.Queue[_Job] | None = None
        #: the batch in the inference thread now (failed, not lost, if the task is restarted under it)
        self._current: list[_Job] = []
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.images = 0
        #: requests queued or being collected, not yet in a started batch
        self.not_started = 0
        #: whether a batch is in the inference thread now
        self.running = False

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        # one task per event loop (test clients may run each request in a fresh loop)
        if self._loop is not loop or self._task is None or self._task.done():
            why = "new event loop" if self._loop is not loop else "the old task ended"
            self._orphan(f"the batching task was restarted ({why})")
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(self._queue), name="covidcxr-batcher")

    def _orphan(self, why: str) -> None:
        """Fail every request of the old queue and the old running batch, instead of dropping them silently."""
        old_task, jobs = self._task, list(self._current)
        if old_task is not None and not old_task.done():
            try:
                old_task.get_loop().call_soon_threadsafe(old_task.cancel)
            except RuntimeError:  # its loop is closed: the task can never run again
                pass
        if self._queue is not None:
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                    self.not_started -= 1
                except asyncio.QueueEmpty:
                    break
        self._current = []
        self.running = False
        self.not_started = max(0, self.not_started)
        for j in jobs:
            _fail(j.fut, BatcherRestarted(why))

    def has_room(self) -> bool:
        """Whether a new item would be served by the next batch to start, or the one after an idle start.

        While a batch runs, at most ``max_batch`` items may wait (they all fit the next batch); while idle,
        at most two batches' worth (the second starts right after the first). Within that, no item waits
        longer than ``max_wait_ms`` plus one batch's inference, whether or not the running batch is full.
        """
        limit = self.max_batch if self.running else 2 * self.max_batch
        return self.not_started < limit

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, BatchTiming]:
        """Queue one preprocessed C x H x W array; returns its output row and what it waited.

        Raises :class:`BatcherFull` when :meth:`has_room` is false (the service answers 503).
        """
        self._ensure_running()
        if not self.has_room():
            raise BatcherFull(f"{self.not_started} requests already wait for the next batch")
        self.not_started += 1
        job = _Job(np.asarray(x, dtype=np.float32), asyncio.get_running_loop().create_future())
        assert self._queue is not None
        self._queue.put_nowait(job)
        return await job.fut

    async def _collect(self, queue: asyncio.Queue[_Job]) -> list[_Job]:
        batch = [await queue.get()]
        deadline = batch[0].t_queued + self.max_wait
        try:
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except (asyncio.TimeoutError, TimeoutError):
                    break
        except asyncio.CancelledError:  # taken off the queue but never run: fail them, never drop them
            self.not_started -= len(batch)
            for j in batch:
                _fail(j.fut, BatcherRestarted("the batching task was stopped while forming this batch"))
            raise
        self.not_started -= len(batch)
        return [j for j in batch if not j.fut.cancelled()]  # a client that went away costs nothing

    async def _run(self, queue: asyncio.Queue[_Job]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(queue)
            if not batch:
                continue
            t0 = time.perf_counter()
            self.running = True
            self._current = batch
            try:
                out = await loop.run_in_executor(self._executor, self.fn, np.stack([j.x for j in batch]))
                if len(out) != len(batch):  # zip() would silently leave some waiters without a row
                    raise BatchMismatch(f"the model returned {len(out)} rows for a batch of {len(batch)}")
            except asyncio.CancelledError:
                for j in batch:
                    _fail(j.fut, BatcherRestarted("the batching task was stopped while this batch ran"))
                raise
            except Exception as err:  # every waiter gets the error; the loop goes on
                for j in batch:
                    if not j.fut.done():
                        j.fut.set_exception(err)
                continue
            finally:
                if self._current is batch:  # a restart may already have handed these to a new task
                    self.running = False
                    self._current = []
            t1 = time.perf_counter()
            self.batches += 1
            self.images += len(batch)
            for j, row in zip(batch, out, strict=True):
                if not j.fut.done():
                    j.fut.set_result((row, BatchTiming(round((t0 - j.t_queued) * 1000, 2), len(batch),
                                                       round((t1 - t0) * 1000, 2))))

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images,
                "mean_batch": round(self.images / self.batches, 2) if self.batches else None}

    async def aclose(self) -> None:
        """Stop forming batches (app shutdown); the idle inference thread ends with the process."""
        self._orphan("the service is shutting down")
        self._task = None
