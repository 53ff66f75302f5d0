"""Batches concurrent requests into one model call on a dedicated thread.

Requests are awaited on the event loop; the model runs only on the batcher's thread, so the loop
keeps answering (health checks, new requests) while a forward pass runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from handlers.errors import Overloaded, ServingError

logger = logging.getLogger(__name__)

Work = TypeVar("Work")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Work, Result]):
    work: Work
    size: int
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[Work, Result]):
    """Collects up to `max_batch_size` items, waiting at most `max_wait_s` after the first one.

    `process` gets a list of work and returns one result per work, in order; a result that is a
    ServingError fails only its own request. An exception from `process` fails the whole batch.
    """

    def __init__(
        self,
        process: Callable[[list[Work]], Sequence[Result | ServingError]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        name: str = "batcher",
    ) -> None:
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self._queue: queue.Queue[_Pending[Work, Result] | None] = queue.Queue()
        self._queued_size = 0
        self._size_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def submit(self, work: Work, size: int = 1) -> Result:
        """Queue `work` (counting `size` toward the batch size) and wait for its result."""
        with self._size_lock:
            if self._queued_size + size > self.max_queue_size:
                raise Overloaded(
                    f"the server is at capacity ({self._queued_size} inputs queued, max_queue_size="
                    f"{self.max_queue_size}); retry later"
                )
            self._queued_size += size
        loop = asyncio.get_running_loop()
        pending: _Pending[Work, Result] = _Pending(work, size, loop.create_future(), loop)
        self._queue.put(pending)
        # If the caller is cancelled (client gone), the future is cancelled and the worker skips it.
        return await pending.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _release(self, items: list[_Pending[Work, Result]]) -> None:
        with self._size_lock:
            self._queued_size -= sum(item.size for item in items)

    def _collect(self, first: _Pending[Work, Result]) -> tuple[list[_Pending[Work, Result]], bool]:
        batch, size = [first], first.size
        deadline = time.perf_counter() + self.max_wait_s
        while size < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if size + item.size > self.max_batch_size:
                # Too big to join: it starts the next batch instead of waiting behind a whole queue.
                self._queue.put(item)
                break
            batch.append(item)
            size += item.size
        return batch, False

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = self._collect(first)
            self._release(batch)
            live = [item for item in batch if not item.future.cancelled()]
            if live:
                self._run_batch(live)
            if closing:
                return

    def _run_batch(self, batch: list[_Pending[Work, Result]]) -> None:
        try:
            results = self._process([item.work for item in batch])
        except ServingError as error:
            for item in batch:
                _resolve(item, error)
            return
        except Exception as error:
            logger.exception("batch of %d failed", len(batch))
            failure = ServingError(f"inference failed: {type(error).__name__}: {error}")
            for item in batch:
                _resolve(item, failure)
            return
        for item, result in zip(batch, results, strict=True):
            _resolve(item, result)


def _resolve(item: _Pending[Work, Result], outcome: Result | BaseException) -> None:
    def settle() -> None:
        if item.future.done():
            return
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)

    item.loop.call_soon_threadsafe(settle)
