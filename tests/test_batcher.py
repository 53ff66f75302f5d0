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


# --- the pipeline: tokenizer lanes before a FIFO forward stage ---


def _pipeline(process, prepare, *, max_batch_size=8, max_batch_tokens=None, max_queue_size=100):
    """A batcher whose work is (name, rows, length); works named 'big*' go to the large lane."""
    return MicroBatcher(
        process,
        prepare=prepare,
        cost=lambda work: (work[1], work[2]),
        is_large=lambda work: work[0].startswith("big"),
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_wait_s=0,
        max_queue_size=max_queue_size,
    )


def test_a_large_request_does_not_delay_small_ones_tokenization():
    """While the large request is still being tokenized, small ones are tokenized and answered."""
    big_tokenizing = threading.Event()
    release_big = threading.Event()
    lanes: dict[str, int] = {}

    def prepare(work, lane):
        lanes[work[0]] = lane
        if work[0] == "big":
            big_tokenizing.set()
            release_big.wait(5)
        return work

    batcher = _pipeline(lambda works: [w[0] for w in works], prepare)

    async def run() -> tuple[list[str], bool, str]:
        big = asyncio.ensure_future(batcher.submit(("big", 32, 512), size=32))
        while not big_tokenizing.is_set():
            await asyncio.sleep(0.01)
        small = await asyncio.gather(*(batcher.submit((f"s{i}", 1, 8)) for i in range(5)))
        still_tokenizing = not big.done()
        release_big.set()
        return small, still_tokenizing, await big

    small, big_was_still_tokenizing, big = asyncio.run(run())
    batcher.close()
    assert small == [f"s{i}" for i in range(5)] and big_was_still_tokenizing and big == "big"
    assert lanes["big"] == 1 and {lanes[f"s{i}"] for i in range(5)} == {0}


def test_batches_keep_ready_order_and_a_large_item_is_not_overtaken():
    """An item over the token budget's remainder starts the next batch; later small items never pass it."""
    batches: list[list[str]] = []
    gate = threading.Event()

    def process(works):
        gate.wait(5)  # hold the first batch so the rest queue up ready
        batches.append([w[0] for w in works])
        return [w[0] for w in works]

    # Budget 64 tokens: 8 small rows of length 8 fit; the large one (1 row x 64) fits only alone.
    batcher = _pipeline(process, lambda work, lane: work, max_batch_tokens=64)
    names = ["a", "b", "c", "wide", "d", "e", "f", "g", "h", "i"]

    async def run() -> list[str]:
        first = asyncio.ensure_future(batcher.submit(("first", 1, 8)))
        await asyncio.sleep(0.05)
        rest = []
        for name in names:  # submitted one by one, so the ready order is this order
            rest.append(asyncio.ensure_future(batcher.submit((name, 1, 64 if name == "wide" else 8))))
            await asyncio.sleep(0.01)
        gate.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(run())
    batcher.close()
    assert results == ["first", *names]
    assert batches == [["first"], ["a", "b", "c"], ["wide"], ["d", "e", "f", "g", "h", "i"]]
    flat = [name for batch in batches for name in batch]
    assert flat == ["first", *names]  # FIFO: nothing overtook the wide item


def test_a_caller_gone_before_tokenizing_is_never_tokenized():
    prepared: list[str] = []
    hold = threading.Event()

    def prepare(work, lane):
        if work[0] == "hold":
            hold.wait(5)
        prepared.append(work[0])
        return work

    batcher = _pipeline(lambda works: [w[0] for w in works], prepare)

    async def run() -> str:
        held = asyncio.ensure_future(batcher.submit(("hold", 1, 8)))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(("gone", 1, 8)))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.01)
        hold.set()
        return await held

    assert asyncio.run(run()) == "hold"
    batcher.close()
    assert prepared == ["hold"]
