"""BentoML's `traffic.timeout` (a 504 when no response starts in time), kept by the request guard, without a
timer left behind per request and without a layer of its own.

BentoML 1.4's `TimeoutMiddleware` schedules `loop.call_later(timeout, ...)` for every HTTP request and never
cancels it, so each answered request leaves a timer handle, a future, a bound method and a context copy
(about 0.7 KB) on the event loop until the timeout elapses, 600 s here. Under steady traffic the server's
memory grows for those 600 s by rate × 0.7 KB per second (about 80 MB at 200 requests/s) before it levels
off: measured by `benchmarks.soak` as a linear RSS growth, and by tracemalloc in the worker as
`traffic.py`'s `call_later` and `create_future`, for every kind of request (even a 401 that never reaches a
route). It also ran every handler in a task of its own, so each request started one turn of the event loop
later, behind the streams' tokens at 32 streams on the vLLM backend.

Here `asyncio.timeout` runs the deadline on the request's own task, and the response's first message lifts
it. The request guard (routes/guard.py) holds it: it lifts it from the one `send` wrapper every streamed
message already passes (a layer of its own cost one more wrapper per message), and answers the 504 as it
answers every error, in the protocol's shape with the request id. BentoML's own timeout layer is left out of
the stack BentoML builds (routes/outer_layers.py).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class ResponseDeadline:
    """`async with ResponseDeadline(seconds):` around a handler cancels it if `lift()` was not called within
    `seconds` (None: never); `expired` then says so. Its own expiry is not raised; the handler's own
    TimeoutError, or anything it raises while being cancelled, is."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        # Cancels the task it is entered in, the request's own; without seconds nothing is made or armed.
        self._timeout = asyncio.timeout(seconds) if seconds is not None else None
        self._running = False

    async def __aenter__(self) -> ResponseDeadline:
        if self._timeout is not None:
            await self._timeout.__aenter__()
            self._running = True
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        if self._timeout is None:
            return False
        self._running = False
        try:
            await self._timeout.__aexit__(kind, error, trace)
        except TimeoutError:
            return True  # the deadline's own cancellation, which asyncio turned into TimeoutError
        return False

    @property
    def expired(self) -> bool:
        return self._timeout is not None and self._timeout.expired()

    def lift(self) -> None:
        """The response started: the deadline is for its start only. Past the deadline (a handler answering
        while being cancelled), or once the handler is done (the guard's own answers), there is nothing to lift."""
        timeout = self._timeout
        if self._running and timeout is not None and not timeout.expired():
            timeout.reschedule(None)
