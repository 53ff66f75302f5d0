"""Cancel a request's handler when its client disconnects, on every route (pure ASGI, cheap on the hot path).

Starlette cancels a streaming response when the client leaves, but a plain handler runs on to its end: a
non-streamed generation keeps its engine rows busy, an encoder request keeps its place in the batcher. This
wrapper watches the connection once the request body has been read (before that, the handler's own reads
see the disconnect) and cancels the task running the handler when `http.disconnect` arrives before the
response is complete. The cancellation reaches whatever the handler awaits: the batcher skips a cancelled
request at every stage, and the generation backends abort the request's rows when its stream is closed.

Once cancelled, the request is still answered with a 499 ("client closed request", nginx's code) that the
server drops, since the client is gone: BentoML's timeout middleware waits for a response to start before it
lets the request's task end, so without one every client that left would hold a task, and a graceful stop,
until `traffic.timeout` (600 s). The 499 also shows in BentoML's request metrics.

Cost: one extra task per request with a body, created after the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import bentoml

CLIENT_CLOSED_REQUEST = 499

CANCELLED = bentoml.metrics.Counter(
    name="requests_cancelled_on_disconnect",
    documentation="Requests whose handler was cancelled because the client disconnected before the answer",
    labelnames=["route"],
)

Scope = dict[str, Any]
Message = dict[str, Any]


class CancelOnDisconnect:
    """ASGI middleware: `app.add_middleware(CancelOnDisconnect)`. `route` labels the counter where no router
    put its route in the scope (the fast path, routes/fast_path.py); else the route's path template is used."""

    def __init__(self, app: Any, route: str | None = None) -> None:
        self.app = app
        self.route = route

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = asyncio.current_task()
        gone = asyncio.Event()
        state = {"body_read": False, "started": False, "responded": False, "cancelled": False}
        watcher: asyncio.Task[None] | None = None

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not state["responded"] and handler is not None:
                        state["cancelled"] = True
                        handler.cancel()
                        route = self.route or getattr(scope.get("route"), "path", None) or scope.get("path", "")
                        CANCELLED.labels(route=route).inc()
                    return

        async def receive_wrapper() -> Message:
            nonlocal watcher
            if state["body_read"]:
                # The watcher owns the connection now; a handler (e.g. a streaming response) that listens
                # for the disconnect hears it from the watcher.
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                state["body_read"] = True
                watcher = asyncio.create_task(watch())
            elif message["type"] == "http.disconnect":
                gone.set()
            return message

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["responded"] = True
            await send(message)

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except asyncio.CancelledError:
            if not state["cancelled"]:
                raise  # cancelled by the server (shutdown), not by us
            if handler is not None:
                handler.uncancel()
            if not state["started"]:  # ends the request for the layers outside (see the module's docstring)
                await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST, "headers": []})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
