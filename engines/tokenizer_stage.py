"""The batcher's first stage: each request prepared (tokenized) on one of two lanes, off the forward threads.

A request with long texts goes to the large lane, so small requests arriving beside it are tokenized on the
small lane meanwhile (fast tokenizers release the GIL). An item whose caller left is dropped unprepared; an
item whose preparation fails is answered with the error there. Either way the batcher hears of every item
once, through `on_done`: the prepared item, or None.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from engines.os_threads import name_os_thread
from handlers.errors import ServingError

logger = logging.getLogger(__name__)

Work = TypeVar("Work")
Result = TypeVar("Result")

SMALL_LANE, LARGE_LANE = 0, 1


@dataclass
class Pending(Generic[Work, Result]):
    """One submitted request on its way through the batcher."""

    work: Work
    size: int
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    prepared: Any = None
    rows: int = 1  # rows and padded length once prepared: what the item costs in a batch
    length: int = 1


def resolve(item: Pending[Any, Result], outcome: Result | BaseException) -> None:
    """Answer the item's caller on its event loop (from any thread); a caller already answered or gone is left."""

    def settle() -> None:
        if item.future.done():
            return
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)

    item.loop.call_soon_threadsafe(settle)


class TokenizerStage(Generic[Work, Result]):
    """Two lanes, each a thread preparing its queue's items in order; `on_done` gets each item's outcome."""

    def __init__(
        self,
        prepare: Callable[[Work, int], Any],
        cost: Callable[[Any], tuple[int, int]] | None,
        is_large: Callable[[Work], bool] | None,
        on_done: Callable[[Pending[Work, Result] | None], None],
        release: Callable[[list[Pending[Work, Result]]], None],
        name: str,
    ) -> None:
        """`release` gives back an item's queue room when it leaves here unprepared (answered or dropped)."""
        self._prepare, self._cost, self._is_large = prepare, cost, is_large
        self._on_done, self._release = on_done, release
        self._queues: list[queue.Queue[Pending[Work, Result] | None]] = [queue.Queue(), queue.Queue()]
        self.threads = [
            threading.Thread(target=self._loop, args=(lane,), name=f"{name}-prepare-{lane}", daemon=True)
            for lane in (SMALL_LANE, LARGE_LANE)
        ]
        for thread in self.threads:
            thread.start()

    def put(self, item: Pending[Work, Result]) -> None:
        large = self._is_large is not None and self._is_large(item.work)
        self._queues[LARGE_LANE if large else SMALL_LANE].put(item)

    def close(self) -> None:
        for lane in self._queues:
            lane.put(None)

    def _loop(self, lane: int) -> None:
        name_os_thread(f"hf-tokenize-{lane}")
        while True:
            item = self._queues[lane].get()
            if item is None:
                return
            if item.future.cancelled():  # the client left while its request waited to be tokenized
                self._release([item])
                self._on_done(None)
                continue
            try:
                prepared = self._prepare(item.work, lane)
            except Exception as error:  # reported to the caller, the lane keeps running
                if not isinstance(error, ServingError):
                    logger.exception("preparing a request failed")
                    error = ServingError(f"preparing the input failed: {type(error).__name__}: {error}")
                prepared = error
            if isinstance(prepared, ServingError):
                self._release([item])
                resolve(item, prepared)
                self._on_done(None)
                continue
            item.prepared = prepared
            if self._cost is not None:
                item.rows, item.length = self._cost(prepared)
            self._on_done(item)
