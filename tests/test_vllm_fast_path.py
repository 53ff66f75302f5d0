"""The fast path of routes/vllm_openai.py: under `bentoml serve`, /openai/* goes from the request guard straight to
vLLM's app on the vLLM backend; everything else, and everything on the transformers backend, goes on.

Fast and without an engine: a small ASGI app stands in for vLLM's. Through the real server the same path is
driven by tests/test_http_generation.py (vLLM backend) and tests/test_vllm_openai.py (slow).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from handlers.errors import NotReady
from routes.guard import RequestGuard
from routes.vllm_openai import VLLMOpenAIApp, VLLMOpenAIFastPath, VLLMOpenAIForwarding


async def reply(label: str, scope: dict[str, Any], send: Any) -> None:
    body = f"{label} {scope.get('root_path', '')} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def vllm_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await reply("vllm", scope, send)


async def bentoml_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await reply("bentoml", scope, send)


def request(forwarding: VLLMOpenAIForwarding, method: str, path: str) -> httpx.Response:
    fast_path = VLLMOpenAIFastPath(bentoml_app, forwarding=forwarding, retry_after_s=7)
    guarded = RequestGuard(fast_path, api_key=None, max_request_bytes=1 << 20, retry_after_s=7, max_log_len=None)

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, json={"prompt": "x"} if method == "POST" else None)

    return asyncio.run(send())


def served(ready: bool) -> Any:
    runtime = SimpleNamespace(ready=ready, not_ready_error=lambda: NotReady("the model is still loading"))
    return SimpleNamespace(runtime=runtime, generation=SimpleNamespace(openai_app=vllm_app))


@pytest.mark.parametrize(
    "path, served_by",
    [
        ("/openai/v1/completions", "vllm /openai /openai/v1/completions"),
        ("/openai", "vllm /openai /openai"),
        ("/openaiish/v1/completions", "bentoml  /openaiish/v1/completions"),  # not under the prefix
        ("/v1/models/llama:predict", "bentoml  /v1/models/llama:predict"),
    ],
)
def test_openai_paths_go_straight_to_vllms_app(path, served_by):
    forwarding = VLLMOpenAIForwarding()
    forwarding.target = VLLMOpenAIApp(served(ready=True))
    answer = request(forwarding, "POST", path)
    assert answer.status_code == 200 and answer.text == served_by
    assert answer.headers["x-request-id"]  # the guard still runs first


def test_every_path_goes_on_without_vllm():
    answer = request(VLLMOpenAIForwarding(), "POST", "/openai/v1/completions")
    assert answer.text == "bentoml  /openai/v1/completions"


def test_before_the_engine_is_up_the_answer_is_an_openai_shaped_503():
    forwarding = VLLMOpenAIForwarding()
    forwarding.target = VLLMOpenAIApp(served(ready=False))
    answer = request(forwarding, "GET", "/openai/v1/models")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "7"
    body = answer.json()
    assert body["error"]["message"] == "the model is still loading"
    assert body["request_id"] == answer.headers["x-request-id"]
