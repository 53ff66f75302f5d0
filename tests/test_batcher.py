"""The micro-batcher alone: batching, per-request failures, a full queue, a caller that left."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engines.batcher import MicroBatcher
from handlers.errors import InvalidInput, Overloaded, ServingError


def test_concurrent_submissions_share_a_batch_and_keep_their_answers():
    seen: list[list[int]] = []
    gate = threading.Event()

    def process(works: list[int]) -> list[int | ServingError]:
        gate.wait(5)  # hold the first batch so the others queue up behind it
        seen.append(works)
        return [InvalidInput("odd") if w == 3 else w * 10 for w in works]

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_batch_size=8, max_wait_s=0, max_queue_size=100)

    async def run() -> list[object]:
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(w)) for w in (1, 2, 3, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(run())
    batcher.close()
    assert results[:3] == [0, 10, 20] and results[4] == 40
    assert isinstance(results[3], InvalidInput)  # only its own request failed
    assert seen == [[0], [1, 2, 3, 4]]


def test_a_full_queue_is_overloaded_and_a_gone_caller_is_skipped():
    ran: list[int] = []
    gate = threading.Event()

    def process(works: list[int]) -> list[int]:
        gate.wait(5)
        ran.extend(works)
        return works

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_batch_size=1, max_wait_s=0, max_queue_size=2)

    async def run() -> None:
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        # max_queue_size counts inputs waiting, not the batch being run.
        gone = asyncio.ensure_future(batcher.submit(2))
        waiting = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await batcher.submit(4)
        gone.cancel()  # the client left while queued
        gate.set()
        assert [await running, await waiting] == [1, 3]

    asyncio.run(run())
    batcher.close()
    assert ran == [1, 3]
