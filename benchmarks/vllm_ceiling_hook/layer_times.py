"""When each ASGI layer in front of vLLM's app is entered, per request, in our worker (benchmarks.layer_costs).

Loaded by this folder's sitecustomize when BENCH_LAYER_TIMES is set, beside the ceiling. It times the same
requests at each boundary on both ways into vLLM's app, in the same process on the same engine:
- our way: the app BentoML's worker serves (caught by sitecustomize's `on_service_app` as it is handed to
  uvicorn), each layer of its built middleware stack preceded by a stamp, down to vLLM's app;
- the ceiling: vLLM's app served bare (sitecustomize), one stamp at its door.
vLLM's app itself gets a stamp as its own middleware stack is entered, so both ways end at the same point.
GET /bench/layer-times on the ceiling's port answers the records and the garbage collections since the last
GET (JSON), and clears them.
"""

from __future__ import annotations

import gc
import json
import time
from typing import Any

RECORD = "bench_layer_times"  # the scope key of a request's record (Stamp)
TIMES_PATH = "/bench/layer-times"
VLLM_APP = "vLLM's app"
RECORDS: dict[str, list[dict[str, Any]]] = {"ours": [], "ceiling": []}
COLLECTIONS: dict[str, list[float]] = {}  # garbage collections since the last GET, by generation: [count, seconds]
_collection_started = 0.0


def count_collections(phase: str, info: dict[str, Any]) -> None:
    """gc.callbacks entry: each collection's generation and time."""
    global _collection_started
    if phase == "start":
        _collection_started = time.perf_counter()
        return
    counted = COLLECTIONS.setdefault(str(info["generation"]), [0, 0.0])
    counted[0] += 1
    counted[1] += time.perf_counter() - _collection_started


class Stamp:
    """Notes the time a request reaches `name`, then passes it on. With `way`, the request's record starts here.
    With `sends`, also the time each response message passes: "sent_in" as vLLM's app sends it, "sent_out" as
    it leaves the outermost layer, so the two differ by the layers' `send` wrappers."""

    def __init__(self, app: Any, name: str, way: str | None = None, sends: str | None = None) -> None:
        self.app, self.name, self.way, self.sends = app, name, way, sends

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        record = None
        if scope["type"] == "http":
            if self.way is not None and scope["path"].endswith("/completions"):
                scope[RECORD] = {"entries": [], "sent_in": [], "sent_out": []}
                RECORDS[self.way].append(scope[RECORD])
            record = scope.get(RECORD)
            if record is not None:
                record["entries"].append((self.name, time.perf_counter()))
        if record is None or self.sends is None:
            await self.app(scope, receive, send)
            return
        sent = record[self.sends]

        async def timed_send(message: dict[str, Any]) -> None:
            sent.append(time.perf_counter())
            await send(message)

        await self.app(scope, receive, timed_send)
        if self.way is not None:
            record["returned"] = time.perf_counter()  # the layers' work after the answer's last message


def stamp_vllm_app(app: Any) -> None:
    """Stamp vLLM's app as its own middleware stack is entered (Starlette builds it on first call)."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    app.middleware_stack = Stamp(app.middleware_stack, VLLM_APP, sends="sent_in")


def stamp_our_layers(app: Any) -> None:
    """A stamp before each layer of the app BentoML's worker serves, down to BentoML's context middleware (the
    fast path hands /openai to vLLM's app from above it)."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    node = app.middleware_stack
    app.middleware_stack = Stamp(node, type(node).__name__, way="ours", sends="sent_out")
    while type(node).__name__ != "ContextMiddleware" and hasattr(node, "app"):
        node.app = Stamp(node.app, type(node.app).__name__)
        node = node.app.app


def with_times_route(app: Any) -> Any:
    """The ceiling's app, with GET /bench/layer-times answering the records, and stamped at its door."""
    stamped = Stamp(app, "uvicorn's app", way="ceiling", sends="sent_out")
    gc.callbacks.append(count_collections)

    async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == TIMES_PATH:
            body = json.dumps({**RECORDS, "collections": COLLECTIONS}).encode()
            for records in RECORDS.values():
                records.clear()
            COLLECTIONS.clear()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await stamped(scope, receive, send)

    return serve
