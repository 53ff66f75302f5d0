"""On the vLLM backend, /openai/* is vLLM's own OpenAI server app, in-process on this service's AsyncLLM.

vLLM builds the app (`build_app`) and its serving classes (`init_app_state`) on the engine the backend
started (engines/generation/vllm_openai.py); this router only hands every /openai/* request to it, the
prefix moved into the ASGI root_path as Starlette's Mount does. Everything vLLM serves is there: chat,
completions, models, tokenize, detokenize, responses, the pooling routes of a pooling model; vLLM's
request models are in its OpenAPI document at /openai/openapi.json. Errors are vLLM's (OpenAI-shaped); the
request guard gives them the request's id as every other error body has it, a top-level `request_id` beside
`error` (routes/guard.py).
An encoder model served with `backend=vllm` gets the same forwarding to its pooling engine's app
(engines/vllm_pooling.py).
Before the engine is up the answer is our 503 (NotReady), like every other route.

Under `bentoml serve` these requests take the fast path (routes/fast_path.py), past BentoML's and FastAPI's
layers; the router below serves the same forwarding when the FastAPI app runs alone (tests/service_app.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.types import Receive, Scope, Send

from routes.common import OPENAI_PREFIX, ServedModel


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
        # Starlette routes on the path minus root_path: vLLM's /v1/... routes see /openai/v1/... requests.
        await vllm_app({**scope, "root_path": scope.get("root_path", "") + OPENAI_PREFIX}, receive, send)


def build_router(served: ServedModel) -> APIRouter:
    router = APIRouter()
    forward = VLLMOpenAIApp(served)
    router.add_route(OPENAI_PREFIX, forward, include_in_schema=False)
    router.add_route(OPENAI_PREFIX + "/{path:path}", forward, include_in_schema=False)
    return router
