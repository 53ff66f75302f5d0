"""The micro-batcher alone: batching, per-request failures, a full queue, a caller that left."""

from __future__ import annotations

import asyncio
import gc
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


def test_each_pass_is_reported_with_the_rows_it_ran():
    """on_pass (the batch-size and pass-time metrics) gets each pass's live rows: a gone caller is not counted."""
    passes: list[tuple[int, bool]] = []
    gate = threading.Event()

    def process(works: list[int]) -> list[int]:
        gate.wait(5)
        return works

    batcher: MicroBatcher[int, int] = MicroBatcher(
        process,
        max_batch_size=8,
        max_wait_s=0,
        max_queue_size=100,
        on_pass=lambda rows, seconds, express: passes.append((rows, express)),
    )

    async def run() -> None:
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(w)) for w in (1, 2, 3)]
        await asyncio.sleep(0.05)
        rest[1].cancel()  # left while queued
        gate.set()
        await asyncio.gather(first, rest[0], rest[2])

    asyncio.run(run())
    batcher.close()
    assert passes == [(1, False), (2, False)]


# --- the pipeline: tokenizer lanes before a FIFO forward stage ---


def _pipeline(process, prepare, *, max_batch_size=8, max_batch_tokens=None, max_queue_size=100, **express):
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
        **express,
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
            rest.append(await _submitted_and_prepared(batcher, (name, 1, 64 if name == "wide" else 8)))
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


# --- the express lane: small items run beside a large batch ---


class _HeldLarge:
    """A process function that holds every batch with a 'big*' item until released, recording each batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[str]]] = []  # (thread name, item names), in the order they ran
        self.big_running = threading.Event()
        self.release = threading.Event()

    def __call__(self, works):
        names = [w[0] for w in works]
        self.batches.append((threading.current_thread().name, names))
        if any(name.startswith("big") for name in names):
            self.big_running.set()
            assert self.release.wait(5), "the test never released the large batch"
        return names


def _express_pipeline(process, **options):
    # Small: at most 32 padded tokens; the express lane opens beside a batch over 128.
    return _pipeline(process, lambda work, lane: work, express_cost=32, express_after_cost=128, **options)


async def _submitted_and_prepared(batcher: MicroBatcher, work: object, size: int = 1) -> asyncio.Future:
    """Submits `work` and returns once it has left its tokenizer lane (ready, or taken): submitted one by one
    this way, items become ready in submission order however slowly the lanes' threads are scheduled."""
    future = asyncio.ensure_future(batcher.submit(work, size=size))
    await asyncio.sleep(0)  # submit() runs up to its queueing
    while batcher._preparing:
        await asyncio.sleep(0.002)
    return future


async def _wait_for(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.01)


def test_small_requests_run_beside_a_large_batch_in_arrival_order():
    """While a large batch is held mid-pass, small requests behind it are answered, FIFO among themselves."""
    process = _HeldLarge()
    threads: list[str] = []
    batcher = _express_pipeline(process, thread_setup=lambda express: threads.append("express" if express else "fwd"))

    async def run() -> tuple[list[str], bool, str]:
        big = asyncio.ensure_future(batcher.submit(("big", 32, 512), size=32))
        await _wait_for(process.big_running)
        small = []
        for i in range(4):  # one by one, so the ready order is this order
            small.append(await _submitted_and_prepared(batcher, (f"s{i}", 1, 8)))
        answered = await asyncio.gather(*small)
        big_still_running = not big.done()
        process.release.set()
        return answered, big_still_running, await big

    small, big_was_running, big = asyncio.run(run())
    batcher.close()
    assert small == ["s0", "s1", "s2", "s3"] and big_was_running and big == "big"
    assert threads == ["express", "fwd"]  # the forward thread's setup runs last (torch's default stays)
    express = [name for thread, batch in process.batches if thread.endswith("-express") for name in batch]
    assert express == ["s0", "s1", "s2", "s3"]


def test_the_express_lane_leaves_large_items_to_the_forward_thread_and_stays_shut_beside_small_batches():
    process = _HeldLarge()
    gate = threading.Event()

    def held_small(works):
        if works[0][0] == "first":
            gate.wait(5)  # a small batch: the express lane must not open beside it
        return process(works)

    batcher = _express_pipeline(held_small)

    async def run() -> list[str]:
        first = asyncio.ensure_future(batcher.submit(("first", 1, 8)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.submit(("a", 1, 8)))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # behind a small batch: FIFO on the forward thread
        gate.set()
        assert await first == "first" and await waiting == "a"
        big = asyncio.ensure_future(batcher.submit(("big", 2, 128), size=2))
        await _wait_for(process.big_running)
        rest = []
        # A second large item and a wide one (over express_cost) queue behind it with small ones.
        for name, length in [("big2", 128), ("b", 8), ("wide", 64), ("c", 8)]:
            rest.append(await _submitted_and_prepared(batcher, (name, 1, length)))
        small = await asyncio.gather(rest[1], rest[3])
        big2_waiting, wide_waiting = not rest[0].done(), not rest[2].done()
        process.release.set()
        return [*small, big2_waiting, wide_waiting, await big, await rest[0], await rest[2]]

    assert asyncio.run(run()) == ["b", "c", True, True, "big", "big2", "wide"]
    batcher.close()
    forward = [batch for thread, batch in process.batches if "-forward-" in thread]
    express = [batch for thread, batch in process.batches if thread.endswith("-express")]
    assert forward[:3] == [["first"], ["a"], ["big"]]
    assert [name for batch in forward[3:] for name in batch] == ["big2", "wide"]  # in ready order, not overtaken
    assert [name for batch in express for name in batch] == ["b", "c"]


def test_the_express_lane_skips_a_gone_caller_and_reports_a_failure_to_its_own_batch():
    process = _HeldLarge()

    def failing(works):
        if works[0][0] == "boom":
            raise RuntimeError("broken input")
        return process(works)

    batcher = _express_pipeline(failing)

    async def run() -> None:
        big = asyncio.ensure_future(batcher.submit(("big", 32, 512), size=32))
        await _wait_for(process.big_running)
        gone = asyncio.ensure_future(batcher.submit(("gone", 1, 8)))
        gone.cancel()
        with pytest.raises(ServingError, match="broken input"):
            await batcher.submit(("boom", 1, 8))
        assert await batcher.submit(("after", 1, 8)) == "after"
        process.release.set()
        assert await big == "big"

    asyncio.run(run())
    batcher.close()
    ran = [name for _, batch in process.batches for name in batch]
    assert "gone" not in ran and "after" in ran
    assert batcher._queued_size == 0  # every item's size was given back


def test_with_the_express_lane_small_items_never_share_a_large_items_batch():
    """Small items queued around a large one are batched apart from it (in order), so none waits in its pass."""
    process = _HeldLarge()
    gate = threading.Event()

    def held_first(works):
        if works[0][0] == "first":
            gate.wait(5)  # so the next items are all ready when the forward thread collects them
        return process(works)

    batcher = _express_pipeline(held_first, max_batch_tokens=1024)

    async def run() -> list[str]:
        first = asyncio.ensure_future(batcher.submit(("first", 1, 8)))
        await asyncio.sleep(0.05)
        queued = []
        for name, rows, length in [("a", 1, 8), ("big", 2, 128), ("b", 1, 8)]:  # all fit one budget
            queued.append(await _submitted_and_prepared(batcher, (name, rows, length), size=rows))
        gate.set()
        await _wait_for(process.big_running)
        answered = [await first, await queued[0], await queued[2]]  # while the large batch is held
        process.release.set()
        return [*answered, await queued[1]]

    assert asyncio.run(run()) == ["first", "a", "b", "big"]
    batcher.close()
    assert [batch for _, batch in process.batches] == [["first"], ["a"], ["big"], ["b"]]
    assert process.batches[-1][0].endswith("-express")


def test_the_express_lane_stays_shut_beside_a_full_batch_of_small_items():
    """A batch of small items over express_after_cost is still short: the next small item waits its turn."""
    process = _HeldLarge()
    hold_first, hold_full = threading.Event(), threading.Event()
    full_running = threading.Event()

    def held(works):
        names = [w[0] for w in works]
        if names == ["first"]:
            hold_first.wait(5)
        if "s0" in names:
            full_running.set()
            hold_full.wait(5)
        return process(works)

    batcher = _express_pipeline(held)  # max_batch_size 8: 8 small rows x 32 = 256 > express_after_cost 128

    async def run() -> list[str]:
        first = asyncio.ensure_future(batcher.submit(("first", 1, 8)))
        await asyncio.sleep(0.05)
        full = [asyncio.ensure_future(batcher.submit((f"s{i}", 1, 32))) for i in range(8)]
        await asyncio.sleep(0.05)
        hold_first.set()
        await _wait_for(full_running)
        after = asyncio.ensure_future(batcher.submit(("t", 1, 8)))
        await asyncio.sleep(0.1)
        assert not after.done()  # no express lane beside small items
        hold_full.set()
        return [await first, *(await asyncio.gather(*full)), await after]

    assert asyncio.run(run()) == ["first", *(f"s{i}" for i in range(8)), "t"]
    batcher.close()
    assert all("-forward-" in thread for thread, _ in process.batches)
    assert [batch for _, batch in process.batches] == [["first"], [f"s{i}" for i in range(8)], ["t"]]


def test_requests_on_their_way_fill_the_batch_and_the_wait_is_bounded(monkeypatch):
    """With `arriving` counting requests the server holds, an empty queue waits for those not submitted yet
    (instead of running a one-item pass), and never longer than the fill bound."""
    import engines.batcher as batcher_module

    # Wide margins, structure not timing: after a 1 s pass the fill may wait 8 s, which even a starved event loop
    # (a loaded machine, a GC pause) outlasts; without the fill the batch would start at once with one item.
    monkeypatch.setattr(batcher_module, "FILL_WAIT_MAX_S", 10.0)
    monkeypatch.setattr(batcher_module, "FILL_WAIT_FRACTION", 8.0)
    gc.collect()  # earlier tests' models: no full collection pauses the loop between the submissions
    seen: list[list[int]] = []
    in_flight = {"count": 0}

    def process(works: list[int]) -> list[int]:
        seen.append(works)
        if works == [0]:
            threading.Event().wait(1.0)  # the last pass's length bounds the next fill (FILL_WAIT_FRACTION of it)
        return works

    batcher: MicroBatcher[int, int] = MicroBatcher(
        process, max_batch_size=8, max_wait_s=0, max_queue_size=100, arriving=lambda: in_flight["count"]
    )

    async def run() -> None:
        await batcher.submit(0)  # a 1 s pass: the next fill may wait up to 8 s
        in_flight["count"] = 4  # four requests received; one is submitted now, three are still being parsed
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(w)) for w in (2, 3, 4)]
        await asyncio.gather(first, *rest)
        in_flight["count"] = 9  # requests that never come: the wait ends at its bound, the item is answered
        assert await asyncio.wait_for(batcher.submit(5), 10) == 5

    asyncio.run(run())
    batcher.close()
    assert seen == [[0], [1, 2, 3, 4], [5]]
