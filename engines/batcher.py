"""Batches concurrent requests into model calls: a tokenizer stage, then FIFO forward passes, each on its threads.

Requests are awaited on the event loop; the model runs only on the forward threads, so the loop keeps
answering (health checks, new requests) while a forward pass runs. The pipeline:

    submit --> tokenizer lane ("small" or "large") --> ready queue (FIFO) --> forward thread --> result
                                                                      +--> express thread --> result

- Preparing work (tokenizing) never happens on a forward thread, so the model is never idle behind a
  tokenizer, and a request with long texts is prepared on its own lane: small requests arriving beside it
  are tokenized on the other lane meanwhile (tokenizers release the GIL).
- The forward thread takes ready items strictly in the order they became ready. A batch grows while it
  fits both `max_batch_size` rows (with forward lanes, each lane's share) and the `max_batch_tokens` budget
  (padded length x rows); an item that does not fit stays at the head of the queue and starts the next
  batch, so nothing is overtaken forever.
- The express lane (on when `express_cost` is given): items costing at most `express_cost` (rows x padded
  length) are *small*, and the forward thread batches them only with small items, so none rides in a long
  pass. While it runs a *large* batch (of items that are not small, costing over `express_after_cost`), a
  second thread takes small ready items and runs them beside it. A pass over a few 512-token rows takes
  tens of times a short sentence's, and strict FIFO on one thread would make every small request arriving
  behind it wait for all of it; on the express lane it shares the CPU with that pass instead. Beside a
  batch of small items the lane stays shut: that batch is short, and splitting a stream of small requests
  into two lanes would only shrink batches and oversubscribe the cores (c=32 throughput fell by half).
- Filling batches with requests already received (on when `arriving` is given: the server's requests in
  flight). Under load, the clients a batch answers come back while the next batch is collected, but their
  requests are still being read and parsed on the event loop: taking only what is ready then alternates
  full batches with tiny ones (a 1-row pass costs a third of a 32-row one here), and the requests in the
  tiny ones wait for both. So once the ready queue is empty, the forward thread waits while the server
  holds requests that are not ready yet (in flight minus inside, plus those in a tokenizer lane), for at
  most half the last pass and 50 ms. Measured on all-MiniLM-L6-v2, one sentence per request: at c=32 the
  p99 fell from 2-7x the p50 to ~1.5x at equal or better throughput, at c=8 throughput rose ~20%; at c=1
  nothing is on the way, so nothing waits.
- Forward lanes (`forward_lanes`, default 1): several forward threads take batches from the one ready queue,
  each on one torch thread (`thread_setup(True)`), one collecting at a time so lanes never split a batch.
  On a CPU, small passes gain little from a second OpenMP thread; one single-threaded pass per core does
  a little more (all-MiniLM-L6-v2, 2 cores, one sentence per request at c=32, traced: 291-318 req/s against
  265-294 on one lane, README "where the time goes"), provided the passes hold no GIL (a traced model,
  handlers/traced.py). A lane waits for requests on their way (below) only while no other lane runs a
  pass: waiting beside a running pass would leave its core idle. `max_batch_size` counts the rows in passes
  at once, so each lane's pass takes its share (32 rows on 2 lanes: 16 each; one item larger than that still
  runs whole). Without the share, one lane ran passes of 20-32 rows while the other ran the 1-4 that came in
  meanwhile: the big passes made the tail and the small ones wasted the core (classifier, one sentence per
  request, 32 clients: 312 req/s with p99 219 ms against 335 and 142 ms with 16 rows a pass; README).
- A caller that left (its future cancelled) is skipped at every stage: before preparing and before running.

Why arrival order still holds. The forward thread's batches are FIFO as above. The express lane takes small
items in ready order too (skipping the items it may not take), so small items among themselves keep their
order. An item it skips (a large one) waits only for the forward thread, which is busy with the large batch
anyway: the express lane opens only while a large batch runs, never delays the forward thread's next pick,
and its batches are themselves never large (their cost stays within `express_after_cost`). So a waiting
large item starts as soon as it would have without the express lane; what it gives up is a share of the
CPU while both lanes run. Two forward passes at once need a model that mutates nothing in its forward
(true of transformers' encoders in inference mode); the caller decides by turning the lane on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from engines.os_threads import name_os_thread
from engines.tokenizer_stage import Pending, TokenizerStage, resolve
from handlers.errors import Overloaded, ServingError

logger = logging.getLogger(__name__)

Work = TypeVar("Work")
Result = TypeVar("Result")

# Filling a batch with requests on their way (see _collect): wait at most this fraction of the last pass,
# and never more than FILL_WAIT_MAX_S, checking every FILL_POLL_S.
FILL_WAIT_FRACTION = 0.5
FILL_WAIT_MAX_S = 0.05
FILL_POLL_S = 0.001


def _identity(work: Any, lane: int) -> Any:
    return work


class MicroBatcher(Generic[Work, Result]):
    """Prepares each item on a tokenizer lane, then runs FIFO batches of prepared items on the forward thread.

    `prepare(work, lane)` turns one work into what `process` takes (e.g. token ids), or returns a ServingError
    that fails that request alone; `cost(prepared)` gives its (rows, padded length); `is_large(work)` routes
    it to the large lane. `process` gets a list of prepared work and returns one result per item, in order; a
    result that is a ServingError fails only its own request. An exception from `process` fails the batch.
    With `express_cost` or `forward_lanes` > 1, `process` is called from several threads at once (see the
    module's docstring); `thread_setup(single_threaded)` runs first on each forward thread, the express
    thread's before the others', with True on the express thread and on each of several forward lanes.
    """

    def __init__(
        self,
        process: Callable[[list[Any]], Sequence[Result | ServingError]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        max_batch_tokens: int | None = None,
        prepare: Callable[[Work, int], Any] = _identity,
        cost: Callable[[Any], tuple[int, int]] | None = None,
        is_large: Callable[[Work], bool] | None = None,
        streams_results: bool = False,
        express_cost: int | None = None,
        express_after_cost: int | None = None,
        thread_setup: Callable[[bool], None] | None = None,
        forward_lanes: int = 1,
        arriving: Callable[[], int] | None = None,
        on_pass: Callable[[int, float, bool], None] | None = None,
        name: str = "batcher",
    ) -> None:
        self._process = process
        self._streams_results = streams_results
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._queued_size = 0
        self._size_lock = threading.Lock()
        self._ready: collections.deque[Pending[Work, Result]] = collections.deque()
        self._ready_changed = threading.Condition()
        self._closing = False
        self.express_cost = express_cost
        # A batch costlier than this opens the express lane; by default four of the largest express items.
        self.express_after_cost = express_after_cost if express_after_cost is not None else 4 * (express_cost or 0)
        if express_cost is not None and not 0 < express_cost <= self.express_after_cost:
            raise ValueError(f"express_cost={express_cost} must be positive and at most express_after_cost")
        self._large_passes = 0  # forward lanes running a batch above express_after_cost
        self._passes_running = 0  # forward lanes running a batch; under _ready_changed
        self.forward_lanes = forward_lanes
        self.lane_batch_size = -(-max_batch_size // forward_lanes)  # each lane's share of max_batch_size, rounded up
        self._collecting = threading.Lock()  # one forward lane collects at a time, so lanes never split a batch
        # Filling batches with requests already received: `arriving()` counts the server's requests in flight;
        # those not inside the batcher are being read, parsed or answered on the event loop (see _collect).
        self._arriving = arriving
        self._inside = 0  # requests submitted whose submit() has not returned
        self._preparing = 0  # requests submitted and not yet ready (in a tokenizer lane); under _ready_changed
        self._last_pass_s = 0.0
        self._on_pass = on_pass  # (rows, seconds, express) after each pass, e.g. metrics
        self._thread_setup = thread_setup
        self._tokenizers = TokenizerStage(prepare, cost, is_large, self._prepared, self._release, name)
        self._threads = list(self._tokenizers.threads)
        # Each forward thread's setup must be done before the next starts: the express thread's first, so
        # the forward thread's (e.g. torch's process-wide default thread count) is the one that stays.
        if express_cost is not None:
            self._start_forward(self._express_loop, f"{name}-express")
        for lane in range(forward_lanes):
            self._start_forward(self._forward_loop, f"{name}-forward-{lane}")

    def _start_forward(self, loop: Callable[[threading.Event], None], name: str) -> None:
        set_up = threading.Event()
        thread = threading.Thread(target=loop, args=(set_up,), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        set_up.wait()

    def _set_up(self, express: bool, set_up: threading.Event) -> None:
        name_os_thread("hf-express" if express else "hf-forward")  # the OpenMP threads it starts inherit it
        try:
            if self._thread_setup is not None:
                self._thread_setup(express or self.forward_lanes > 1)
        except Exception:  # a failed setup (thread count) leaves the defaults; serving goes on
            logger.exception("setting up a forward thread failed")
        finally:
            set_up.set()

    async def submit(self, work: Work, size: int = 1) -> Result:
        """Queue `work` (counting `size` toward the queue limit) and wait for its result."""
        with self._size_lock:
            if self._queued_size + size > self.max_queue_size:
                raise Overloaded(
                    f"the server is at capacity ({self._queued_size} inputs queued, max_queue_size="
                    f"{self.max_queue_size}); retry later"
                )
            self._queued_size += size
        loop = asyncio.get_running_loop()
        pending: Pending[Work, Result] = Pending(work, size, loop.create_future(), loop)
        self._inside += 1  # only ever changed on the event loop's thread
        with self._ready_changed:
            self._preparing += 1
        self._tokenizers.put(pending)
        try:
            # If the caller is cancelled (client gone), the future is cancelled and every stage skips it.
            return await pending.future
        finally:
            self._inside -= 1

    def close(self) -> None:
        self._tokenizers.close()
        with self._ready_changed:
            self._closing = True
            self._ready_changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _release(self, items: list[Pending[Work, Result]]) -> None:
        with self._size_lock:
            self._queued_size -= sum(item.size for item in items)

    # --- stage 1: preparing (tokenizing), off the forward threads (engines/tokenizer_stage.py) ---

    def _prepared(self, item: Pending[Work, Result] | None) -> None:
        """One item left its tokenizer lane: ready (`item`), or answered or dropped there (None)."""
        with self._ready_changed:
            self._preparing -= 1
            if item is not None:
                self._ready.append(item)
            self._ready_changed.notify_all()  # both forward threads may be waiting for it (or for the count)

    # --- stage 2: forward passes, FIFO, with an express lane beside long ones ---

    def _fits(self, rows: int, length: int, item: Pending[Work, Result]) -> bool:
        rows, length = rows + item.rows, max(length, item.length)
        if rows > self.lane_batch_size:
            return False
        return self.max_batch_tokens is None or rows * length <= self.max_batch_tokens

    def _collect(self) -> tuple[list[Pending[Work, Result]], bool] | None:
        """The next batch in ready order and whether it is large (opens the express lane); None once closing.

        Waits up to max_wait_s to fill it. Called with the condition's lock free; returns with it free.
        """
        with self._ready_changed:
            while not self._ready:
                if self._closing:
                    return None
                self._ready_changed.wait()
            first = self._ready.popleft()
            batch, rows, length = [first], first.rows, first.length
            # With the express lane, small items are never batched with others: a small row in a long row's
            # batch may share its pass (tiny passes are not split off), and would wait for all of it.
            small_batch = self._is_small(first)
            now = time.perf_counter()
            deadline = now + self.max_wait_s
            fill_deadline = now + min(FILL_WAIT_MAX_S, FILL_WAIT_FRACTION * self._last_pass_s)
            while rows < self.lane_batch_size:
                if not self._ready:
                    now = time.perf_counter()
                    if self._closing:
                        break
                    if now < deadline:
                        self._ready_changed.wait(deadline - now)
                    elif now < fill_deadline and not self._passes_running and self._requests_on_the_way() > 0:
                        self._ready_changed.wait(min(FILL_POLL_S, fill_deadline - now))
                    else:
                        break
                    continue
                head = self._ready[0]
                if head.future.cancelled():
                    self._ready.popleft()
                    batch.append(head)  # dropped below with the other gone callers
                    continue
                if not self._fits(rows, length, head) or self._is_small(head) != small_batch:
                    break  # it stays at the head and starts the next batch: arrival order is kept
                batch.append(self._ready.popleft())
                rows, length = rows + head.rows, max(length, head.length)
            cost = rows * length
            # A batch of small items is short however full (its rows are short): the lane stays shut beside it,
            # so a stream of small requests is batched exactly as without the lane.
            large = self.express_cost is not None and not small_batch and cost > self.express_after_cost
            self._passes_running += 1  # both counted down by _forward_loop once the batch is done
            if large:
                self._large_passes += 1
                self._ready_changed.notify_all()
            return batch, large

    def _forward_loop(self, set_up: threading.Event) -> None:
        self._set_up(False, set_up)
        while True:
            with self._collecting:
                collected = self._collect()
            if collected is None:
                return
            batch, large = collected
            started = time.perf_counter()
            live: list[Pending[Work, Result]] = []
            try:
                live = self._run_live(batch)
            finally:
                self._last_pass_s = time.perf_counter() - started
                with self._ready_changed:
                    self._passes_running -= 1
                    self._large_passes -= int(large)
            self._observe(live, self._last_pass_s, express=False)

    def _requests_on_the_way(self) -> int:
        """Requests bound for the next batch and not ready yet: those the server holds outside the batcher
        (being read or parsed, bound for it under load, or being answered, whose clients will be back soon in a
        closed loop), and those in a tokenizer lane. Called with _ready_changed held."""
        if self._arriving is None:
            return 0
        return self._arriving() - self._inside + self._preparing

    def _is_small(self, item: Pending[Work, Result]) -> bool:
        return self.express_cost is not None and item.rows * item.length <= self.express_cost

    def _collect_express(self) -> list[Pending[Work, Result]] | None:
        """Small ready items, in ready order, to run beside the forward thread's large batch; None once closing.

        Items it may not take stay where they are. Gone callers met on the way are taken (and dropped).
        """
        with self._ready_changed:
            while True:
                if self._closing:
                    return None
                if self._large_passes and any(map(self._is_small, self._ready)):
                    break
                self._ready_changed.wait()
            batch: list[Pending[Work, Result]] = []
            rows, length = 0, 1
            kept: collections.deque[Pending[Work, Result]] = collections.deque()
            while self._ready:
                item = self._ready.popleft()
                if item.future.cancelled():
                    batch.append(item)  # dropped with the other gone callers
                    continue
                if not self._is_small(item):
                    kept.append(item)  # the forward thread's, in its place
                    continue
                new_rows, new_length = rows + item.rows, max(length, item.length)
                # Its batches stay within express_after_cost: the express lane never runs a large batch.
                fits = new_rows <= self.max_batch_size and new_rows * new_length <= self.express_after_cost
                if rows and not fits:
                    kept.append(item)  # it and the small items after it wait for the next batch, in order
                    break
                batch.append(item)
                rows, length = new_rows, new_length
            kept.extend(self._ready)
            self._ready = kept
            return batch

    def _express_loop(self, set_up: threading.Event) -> None:
        self._set_up(True, set_up)
        while True:
            batch = self._collect_express()
            if batch is None:
                return
            started = time.perf_counter()
            live = self._run_live(batch)
            self._observe(live, time.perf_counter() - started, express=True)

    def _observe(self, batch: list[Pending[Work, Result]], seconds: float, express: bool) -> None:
        if self._on_pass is None or not batch:
            return
        try:
            self._on_pass(sum(item.rows for item in batch), seconds, express)
        except Exception:  # metrics never stop the forward thread
            logger.exception("observing a forward pass failed")

    def _run_live(self, batch: list[Pending[Work, Result]]) -> list[Pending[Work, Result]]:
        """Runs the items whose callers are still there; returns them."""
        self._release(batch)
        live = [item for item in batch if not item.future.cancelled()]
        if live:
            self._run_batch(live)
        return live

    def _run_batch(self, batch: list[Pending[Work, Result]]) -> None:
        works = [item.prepared if item.prepared is not None else item.work for item in batch]
        try:
            if self._streams_results:
                # process(works, on_result) answers each item as soon as it is done; the rest are checked below.
                results = self._process(works, lambda index, result: resolve(batch[index], result))  # type: ignore[call-arg]
                return
            results = self._process(works)
        except ServingError as error:
            for item in batch:
                resolve(item, error)
            return
        except Exception as error:
            logger.exception("batch of %d failed", len(batch))
            failure = ServingError(f"inference failed: {type(error).__name__}: {error}")
            for item in batch:
                resolve(item, failure)
            return
        for item, result in zip(batch, results, strict=True):
            resolve(item, result)
