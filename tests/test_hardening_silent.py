"""Issue 21 §2 (no silent failure): the items of H4c, each with a check that fails on the old code."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest


# --------------------------------------------------------------------------- §2.12 the batcher


def test_batcher_output_length_mismatch_fails_every_request() -> None:
    """A model that returns fewer rows than the batch fails all requests of the batch (no zip truncation)."""
    from covidcxr.serve.batcher import BatchMismatch, MicroBatcher

    b = MicroBatcher(lambda x: np.zeros((max(0, len(x) - 1), 3), np.float32), max_batch=4, max_wait_ms=50)

    async def go() -> list:
        return await asyncio.wait_for(
            asyncio.gather(*(b.submit(np.zeros((1, 2, 2))) for _ in range(3)), return_exceptions=True), 10)

    res = asyncio.run(go())
    assert len(res) == 3 and all(isinstance(r, BatchMismatch) for r in res), res


def test_batcher_restart_fails_orphaned_requests() -> None:
    """Restarting the task fails the running batch and the queued requests instead of leaving them waiting."""
    from covidcxr.serve.batcher import BatcherRestarted, MicroBatcher

    release = threading.Event()

    def fn(x: np.ndarray) -> np.ndarray:
        release.wait(20)
        return np.ones((len(x), 3), np.float32)

    b = MicroBatcher(fn, max_batch=1, max_wait_ms=0)

    async def go() -> tuple[list, object]:
        old = [asyncio.ensure_future(b.submit(np.zeros((1, 2, 2)))) for _ in range(2)]
        for _ in range(200):  # until the first batch is in the inference thread
            if b.running:
                break
            await asyncio.sleep(0.01)
        assert b.running and b.not_started == 1  # one runs, one waits
        b._task.cancel()  # the task ends (as it would after a crash): the next submit restarts it
        await asyncio.sleep(0)
        new = asyncio.ensure_future(b.submit(np.zeros((1, 2, 2))))
        got = await asyncio.wait_for(asyncio.gather(*old, return_exceptions=True), 10)
        release.set()
        return got, await asyncio.wait_for(new, 20)

    old, new = asyncio.run(go())
    assert all(isinstance(r, BatcherRestarted) for r in old), old
    row, timing = new
    assert row.shape == (3,) and timing.batch_size == 1
    assert b.not_started == 0
