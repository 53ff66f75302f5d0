"""BentoML's `traffic.timeout` (a 504 when no response starts in time), without a timer left behind per request.

BentoML 1.4's `TimeoutMiddleware` schedules `loop.call_later(timeout, ...)` for every HTTP request and never
cancels it, so each answered request leaves a timer handle, a future, a bound method and a context copy
(about 0.7 KB) on the event loop until the timeout elapses, 600 s here. Under steady traffic the server's
memory grows for those 600 s by rate × 0.7 KB per second (about 80 MB at 200 requests/s) before it levels
off: measured by `benchmarks.soak` as a linear RSS growth, and by tracemalloc in the worker as
`traffic.py`'s `call_later` and `create_future`, for every kind of request (even a 401 that never reaches a
route). This version behaves the same and cancels its timer once the response has started (uvloop frees a
cancelled timer at once).

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
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, started)

        async def send_and_mark(message: Message) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receive, send_and_mark))
        # A handler that ends without answering (it raised) must not wait for the deadline: its error goes
        # on to Starlette's error middleware at once.
        handler.add_done_callback(lambda _: started.done() or started.set_result(None))
        try:
            await started
        except TimeoutError:
            if handler.cancel():
                body = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(body, status_code=504)(scope, receive, send)
            return
        finally:
            timer.cancel()
        await handler


def install() -> None:
    """Make BentoML build its timeout middleware from ResponseDeadline (it looks the class up per app)."""
    traffic.TimeoutMiddleware = ResponseDeadline  # type: ignore[misc]
