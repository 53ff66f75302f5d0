"""traffic.timeout kept by the request guard (routes/response_deadline.py, routes/guard.py): a 504 in the
protocol's shape when no response starts in time, without a timer left on the event loop per answered request.

BentoML's own TimeoutMiddleware leaves one for the whole timeout (600 s here), which `benchmarks.soak` saw as
the server's memory growing linearly (about 0.7 KB per request). The guard is driven directly over ASGI with
trivial apps; the service test checks that service.py makes BentoML build its stack without its own layer and
gives the guard the timeout.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bentoml._internal.server.base_app import BaseAppFactory
from bentoml._internal.server.http import traffic

from routes.guard import RequestGuard
from routes.outer_layers import no_layer

PROJECT_DIR = Path(__file__).resolve().parent.parent
ORIGINAL = traffic.TimeoutMiddleware  # read before any import of service.py replaces it (checked below)
REQUESTS = 500


def guarded(app: Any, timeout: float | None) -> RequestGuard:
    return RequestGuard(app, api_key=None, max_request_bytes=1 << 20, retry_after_s=1, max_log_len=None,
                        response_timeout_s=timeout)  # fmt: skip


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, path: str = "/v1/models/m:predict") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"x-request-id", b"slow-1")]}
    await app(scope, receive, send)
    return sent


def pending_timers(after: int) -> int:
    """Timer handles still armed on the running loop: TimerHandle is tracked by the garbage collector."""
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.TimerHandle) and not o.cancelled()) - after


def timers_left_by(app: Any) -> int:
    async def scenario() -> int:
        before = pending_timers(0)
        for _ in range(REQUESTS):
            assert (await call(app))[0]["status"] == 200
        return pending_timers(before)

    return asyncio.run(scenario())


def test_no_timer_outlives_its_request():
    assert timers_left_by(guarded(ok_app, 600)) == 0


def test_bentoml_timeout_middleware_still_leaves_one_timer_per_request():
    assert ORIGINAL.__name__ == "TimeoutMiddleware", "service.py was imported before this module: no original"
    # When this fails, BentoML cancels its own timer: routes/response_deadline.py's history no longer holds.
    assert timers_left_by(ORIGINAL(ok_app, timeout=600)) == REQUESTS


def test_504_in_the_protocols_shape_when_the_response_does_not_start_in_time(caplog):
    cancelled = asyncio.Event()

    async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario(path: str) -> list[dict[str, Any]]:
        cancelled.clear()
        sent = await asyncio.wait_for(call(guarded(slow_app, 0.05), path), 10)
        await asyncio.wait_for(cancelled.wait(), 5)
        return sent

    for path, shape in (("/v1/models/m:predict", str), ("/openai/v1/completions", dict)):
        caplog.clear()
        start, body = asyncio.run(scenario(path))
        assert "no response within 0.05 s; answered 504" in caplog.text
        assert start["status"] == 504 and (b"x-request-id", b"slow-1") in start["headers"]
        answer = json.loads(body["body"])
        assert isinstance(answer["error"], shape) and answer["request_id"] == "slow-1", answer
        assert "did not start within 0.05 seconds" in json.dumps(answer)


def test_a_handler_that_raises_is_not_held_until_the_deadline():
    async def broken_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("route bug")

    sent = asyncio.run(asyncio.wait_for(call(guarded(broken_app, 600)), 5))
    assert sent[0]["status"] == 500


def test_the_service_makes_bentoml_build_its_stack_without_its_timeout_layer(tiny_models, monkeypatch):
    monkeypatch.setattr(traffic, "TimeoutMiddleware", ORIGINAL)  # restored after the import below replaces it
    monkeypatch.setenv("HF_SERVE_MODEL_DIR", str(tiny_models["sequence_classification"]))
    spec = importlib.util.spec_from_file_location("service_under_test_deadline", PROJECT_DIR / "service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    # BentoML's app factories take their timeout middleware from this property when the worker builds the app.
    factory = SimpleNamespace(timeout=600.0, max_concurrency=None)
    layers = [m.cls for m in BaseAppFactory.middlewares.fget(factory)]  # type: ignore[attr-defined]
    assert layers == [no_layer]
    assert module._GUARD_OPTIONS["response_timeout_s"] == module.RESPONSE_TIMEOUT_S == 600


def test_the_handler_runs_in_the_requests_own_task():
    # A task per request would start each request a turn of the event loop later, behind the streams that share
    # the loop (README, "Generation on vLLM"): the deadline cancels this task instead.
    handler_tasks: list[asyncio.Task[Any] | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler_tasks.append(asyncio.current_task())
        await ok_app(scope, receive, send)

    async def scenario() -> asyncio.Task[Any] | None:
        await call(guarded(app, 600))
        return asyncio.current_task()

    assert asyncio.run(scenario()) is handler_tasks[0]


def test_504_when_the_handler_swallows_its_cancellation():
    async def stubborn_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return  # ends without answering

    sent = asyncio.run(asyncio.wait_for(call(guarded(stubborn_app, 0.05)), 10))
    assert [m.get("status") for m in sent][:1] == [504]


def test_the_handlers_own_timeout_is_a_bug_not_the_deadline():
    async def app_with_its_own_timeout(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(30)

    sent = asyncio.run(asyncio.wait_for(call(guarded(app_with_its_own_timeout, 600)), 5))
    assert sent[0]["status"] == 500  # the last-resort answer to an exception no handler knew


def test_a_response_that_started_is_not_cut_by_the_deadline():
    async def slow_stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.15)  # three deadlines' worth, after the start
        await send({"type": "http.response.body", "body": b"late"})

    sent = asyncio.run(asyncio.wait_for(call(guarded(slow_stream, 0.05)), 10))
    assert [m.get("status") for m in sent] == [200, None] and sent[1]["body"] == b"late"


def test_a_handler_that_answers_while_being_cancelled_keeps_its_answer():
    # Past the deadline the handler is cancelled; one that answers then (e.g. a 503 on its way out) and re-raises
    # must neither fail in `send` nor get a second answer, and nothing is raised for the deadline's own doing.
    async def answers_on_cancel(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"shutting down"})
            raise

    sent = asyncio.run(asyncio.wait_for(call(guarded(answers_on_cancel, 0.05)), 10))
    assert [m.get("status") for m in sent] == [503, None] and sent[1]["body"] == b"shutting down"


def test_without_a_timeout_nothing_is_armed():
    assert timers_left_by(guarded(ok_app, None)) == 0
