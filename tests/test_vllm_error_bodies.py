"""Errors of vLLM's own OpenAI layer under /openai carry the request id in their body, as every other error does.

Fast, without an engine: a FastAPI app with vLLM's own exception handlers (`init_exception_handler`, which
`build_app` installs) stands in for vLLM's app, mounted through routes/vllm_openai.py behind the request guard.
The same check against the real vLLM app on SmolLM2 is `test_errors_are_openai_shaped` in
test_vllm_openai.py (slow).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import pytest

try:
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
except Exception as error:  # ImportError, or a broken install raising anything at import time
    pytest.skip(f"vllm does not import ({type(error).__name__}: {error})", allow_module_level=True)

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel

from routes import vllm_openai
from routes.errors import body_with_request_id, install_error_handlers
from routes.guard import RequestGuard


class Completion(BaseModel):
    prompt: str
    max_tokens: int = 16


def vllm_like_app() -> FastAPI:
    app = FastAPI()
    init_exception_handler(app)
    app.state.args = SimpleNamespace(log_error_stack=False)  # what vLLM's handlers read of `vllm serve`'s args

    @app.post("/v1/completions")
    async def completions(request: Completion) -> object:
        if request.max_tokens < 0:
            raise ValueError("max_tokens must be at least 0")  # vLLM's fallback handler: 400, OpenAI-shaped
        if request.prompt == "stream":

            async def events() -> AsyncIterator[bytes]:
                yield b'data: {"error": {"message": "in a stream", "code": 400}}\n\n'
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"choices": [{"text": "ok"}]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> object:
        raise HTTPException(status_code=404, detail=f"The model `{name}` does not exist.")

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    served = SimpleNamespace(
        runtime=SimpleNamespace(ready=True), generation=SimpleNamespace(openai_app=vllm_like_app())
    )
    app = FastAPI()
    install_error_handlers(app, 1, None)
    app.include_router(vllm_openai.build_router(served))  # type: ignore[arg-type]
    app.add_middleware(RequestGuard, api_key=None, max_request_bytes=1 << 20, retry_after_s=1, max_log_len=None)
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/openai/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),  # ValueError handler
        ("POST", "/openai/v1/completions", {"max_tokens": 3}, 400),  # vLLM's validation handler
        ("POST", "/openai/v1/completions", {"prompt": 3, "max_tokens": "many"}, 400),
        ("GET", "/openai/v1/models/nope", None, 404),  # vLLM's HTTPException handler
        ("GET", "/openai/v1/nothing-here", None, 404),  # vLLM's app's own unknown route
    ],
)
def test_vllm_error_bodies_carry_the_request_id(client, method, path, body, status):
    answer = client.request(method, path, json=body, headers={"x-request-id": "vllm-err-1"})
    assert answer.status_code == status, answer.text
    assert answer.headers["x-request-id"] == "vllm-err-1"
    payload = answer.json()
    assert payload["request_id"] == "vllm-err-1", payload
    if status == 400:  # vLLM's OpenAI shape is kept as it was, the id beside it as in our own OpenAI errors
        assert set(payload["error"]) >= {"message", "type", "code"} and payload["error"]["code"] == 400
    assert int(answer.headers["content-length"]) == len(answer.content)


def test_answers_and_streams_pass_through_unchanged(client):
    ok = client.post("/openai/v1/completions", json={"prompt": "x"})
    assert ok.status_code == 200 and ok.json() == {"choices": [{"text": "ok"}]}
    stream = client.post("/openai/v1/completions", json={"prompt": "stream"})
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    first = stream.text.split("\n\n")[0].removeprefix("data: ")
    assert json.loads(first) == {"error": {"message": "in a stream", "code": 400}}


def test_body_with_request_id_keeps_other_bodies():
    assert body_with_request_id(b"not json", "r") == b"not json"
    assert body_with_request_id(b"[1, 2]", "r") == b"[1, 2]"
    assert body_with_request_id(b'{"request_id": "theirs"}', "r") == b'{"request_id": "theirs"}'
    assert json.loads(body_with_request_id(b'{"error": {}}', "r")) == {"error": {}, "request_id": "r"}


def guard_around(app: object) -> RequestGuard:
    return RequestGuard(app, api_key=None, max_request_bytes=1 << 20, retry_after_s=1, max_log_len=None)  # type: ignore[arg-type]


def guarded(app: object) -> TestClient:
    return TestClient(guard_around(app), raise_server_exceptions=False)  # no lifespan: the apps here have none


def test_an_error_that_breaks_off_before_its_body_ends_gets_the_guards_500():
    # The guard holds an error's start until its body is whole; if the app fails before, nothing was sent,
    # so the client gets the guard's 500 in the protocol's shape rather than a half answer.
    async def broken_error(scope: dict[str, object], receive: object, send: object) -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 400, "headers": headers})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b'{"error": ', "more_body": True})  # type: ignore[operator]
        raise RuntimeError("broke off")

    answer = guarded(broken_error).post("/openai/v1/completions", json={}, headers={"x-request-id": "broke-1"})
    assert answer.status_code == 500 and answer.json()["request_id"] == "broke-1", answer.text
    assert answer.json()["error"]["message"].startswith("internal server error")


def test_an_error_body_left_as_it_was_keeps_its_start():
    # A HEAD answer has an empty body, and one with its own request id needs none: the start, Content-Length
    # included, goes out as the app made it.
    async def error_with_id(scope: dict[str, object], receive: object, send: object) -> None:
        body = b"" if scope["method"] == "HEAD" else b'{"error": "gone", "request_id": "theirs"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", b"41")]
        await send({"type": "http.response.start", "status": 404, "headers": headers})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    client = guarded(error_with_id)
    head = client.head("/openai/v1/models/gone")
    assert head.status_code == 404 and head.headers["content-length"] == "41" and head.content == b""
    get = client.get("/openai/v1/models/gone")
    assert get.json() == {"error": "gone", "request_id": "theirs"} and get.headers["content-length"] == "41"


def test_an_app_that_fails_after_its_error_is_whole_gets_no_second_answer():
    async def error_then_bug(scope: dict[str, object], receive: object, send: object) -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 400, "headers": headers})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b'{"error": "bad"}'})  # type: ignore[operator]
        raise RuntimeError("after the answer")

    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    guard = guard_around(error_then_bug)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/openai/v1/completions",
        "headers": [(b"x-request-id", b"late-1")],
    }
    asyncio.run(guard(scope, receive, send))
    assert [m.get("status") for m in sent] == [400, None], sent  # the 400 with its id, no 500 after it
    assert json.loads(sent[1]["body"]) == {"error": "bad", "request_id": "late-1"}  # type: ignore[arg-type]
