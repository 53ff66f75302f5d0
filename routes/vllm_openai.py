"""On the vLLM backend, /openai/* is vLLM's own OpenAI server app, in-process on this service's AsyncLLM.

vLLM builds the app (`build_app`) and its serving classes (`init_app_state`) on the engine the backend
started (engines/generation/vllm_openai.py); this router only hands every /openai/* request to it, the
prefix moved into the ASGI root_path as Starlette's Mount does. Everything vLLM serves is there: chat,
completions, models, tokenize, detokenize, responses, the pooling routes of a pooling model; vLLM's
request models are in its OpenAPI document at /openai/openapi.json. Errors are vLLM's (OpenAI-shaped), given
the request's id as every other error body has it: a top-level `request_id` beside `error` (routes/errors.py).
An encoder model served with `backend=vllm` gets the same forwarding to its pooling engine's app
(engines/vllm_pooling.py).
Before the engine is up the answer is our 503 (NotReady), like every other route.

Under `bentoml serve` these requests take the fast path (routes/fast_path.py), past BentoML's and FastAPI's
layers; the router below serves the same forwarding when the FastAPI app runs alone (tests/service_app.py).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from starlette.types import Message, Receive, Scope, Send

from routes.common import OPENAI_PREFIX, ServedModel
from routes.errors import request_id_of


class VLLMOpenAIApp:
    """An ASGI app forwarding to the backend's vLLM app once it is built."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # An encoder model on vLLM (`backend=vllm`) has its own pooling engine; a generative one the backend's.
        pooling = getattr(self.served, "vllm_pooling", None)
        owner: Any = pooling if pooling is not None else self.served.runtime
        vllm_app: Any = getattr(pooling if pooling is not None else self.served.generation, "openai_app", None)
        if vllm_app is None or not owner.ready:
            raise owner.not_ready_error()
        request_id = request_id_of(scope)
        if request_id:
            send = error_bodies_with_request_id(send, request_id)
        # Starlette routes on the path minus root_path: vLLM's /v1/... routes see /openai/v1/... requests.
        await vllm_app({**scope, "root_path": scope.get("root_path", "") + OPENAI_PREFIX}, receive, send)


def body_with_request_id(body: bytes, request_id: str) -> bytes:
    """A JSON object body with `request_id` added (a value already there is kept); any other body unchanged."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if not isinstance(parsed, dict) or "request_id" in parsed:
        return body
    return json.dumps({**parsed, "request_id": request_id}).encode()


def error_bodies_with_request_id(send: Send, request_id: str) -> Send:
    """`send` for vLLM's app: a JSON answer with a 4xx/5xx status is held whole and its body given the request
    id (error bodies are small); everything else, streams included, passes through at once."""
    held: Message | None = None
    chunks: list[bytes] = []

    async def send_with_id(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            json_type = any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)
            if message["status"] >= 400 and json_type:
                held = message
                return
        if held is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = body_with_request_id(b"".join(chunks), request_id)
        headers = [(k, v) for k, v in held.get("headers", ()) if k.lower() != b"content-length"]
        await send({**held, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return send_with_id


def build_router(served: ServedModel) -> APIRouter:
    router = APIRouter()
    forward = VLLMOpenAIApp(served)
    router.add_route(OPENAI_PREFIX, forward, include_in_schema=False)
    router.add_route(OPENAI_PREFIX + "/{path:path}", forward, include_in_schema=False)
    return router
