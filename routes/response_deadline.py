"""BentoML's `traffic.timeout` (a 504 when no response starts in time), without a timer left behind per request.

BentoML 1.4's `TimeoutMiddleware` schedules `loop.call_later(timeout, ...)` for every HTTP request and never
cancels it, so each answered request leaves a timer handle, a future, a bound method and a context copy
(about 0.7 KB) on the event loop until the timeout elapses, 600 s here. Under steady traffic the server's
memory grows for those 600 s by rate × 0.7 KB per second (about 80 MB at 200 requests/s) before it levels
off: measured by `benchmarks.soak` as a linear RSS growth, and by tracemalloc in the worker as
`traffic.py`'s `call_later` and `create_future`, for every kind of request (even a 401 that never reaches a
route). This version answers the same 504, and leaves nothing behind: `asyncio.timeout` runs the deadline
on the request's own task, and the first message of the response lifts it.

It runs the handler in that task rather than a task of its own. A task per request starts every request one
turn of the event loop later, behind whatever else the loop has ready; at 32 streams on the vLLM backend
that is the streams' tokens. In a probe at 32 streams (20 interleaved repetitions, in one worker), our app
with the old layer taken out had 0.94x the TTFT of our app with it (README, "Generation on vLLM").

`install()` puts it in the place BentoML builds its middleware stack from; call it before the service's
ASGI app is built (service.py does at import).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse

Scope = dict[str, Any]
Message = dict[str, Any]


class ResponseDeadline(traffic.TimeoutMiddleware):
    """504 if the response has not started within `timeout` seconds; the handler is cancelled then."""

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        deadline = asyncio.timeout(self.timeout)  # cancels this task, the request's own, when it expires
        started = False

        async def send_and_disarm(message: Message) -> None:
            nonlocal started
            if not started:
                started = True
                if not deadline.expired():  # else it is answering while being cancelled: its answer stands
                    deadline.reschedule(None)  # the deadline is for the response's start only
            await send(message)

        try:
            async with deadline:
                await self.app(scope, receive, send_and_disarm)
        except TimeoutError:
            if not deadline.expired():
                raise  # the handler's own timeout, not this deadline
        if deadline.expired() and not started:  # a handler that swallowed its cancellation ends here too
            body = {"error": f"Not able to process the request in {self.timeout} seconds"}
            await JSONResponse(body, status_code=504)(scope, receive, send)


def install() -> None:
    """Make BentoML build its timeout middleware from ResponseDeadline (it looks the class up per app)."""
    traffic.TimeoutMiddleware = ResponseDeadline  # type: ignore[misc]
