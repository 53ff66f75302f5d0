"""OpenAI routes under /openai: models, embeddings, completions and chat completions (SSE when streamed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from handlers.errors import InvalidInput, ModelNotFound
from handlers.requests import RequestOptions
from protocols import openai as openai_generation
from protocols import openai_embeddings
from protocols.openai import responses as openai_responses
from protocols.openai import schemas as openai_schemas
from routes.common import OPENAI_PREFIX, ServedModel, json_object, json_response, predict, require_json
from routes.openapi import errors, event_stream, request_body
from settings.tasks import Task

_COMPLETION = "The completion (application/json), or with `stream: true` its chunks as server-sent events"
_CHAT = "The chat completion (application/json), or with `stream: true` its chunks as server-sent events"


def build_router(served: ServedModel) -> APIRouter:
    router = APIRouter(prefix=OPENAI_PREFIX)
    args = served.args

    @router.get("/v1/models", response_model=openai_embeddings.ModelList, responses=errors("openai", 401))
    async def openai_models() -> dict[str, Any]:
        return openai_embeddings.models_response([args.model_name])

    @router.post(
        "/v1/embeddings",
        response_model=openai_embeddings.EmbeddingResponse,
        responses=errors("openai"),
        openapi_extra=request_body(openai_embeddings.EmbeddingRequest),
    )
    async def openai_embeddings_route(request: Request) -> Response:
        require_json(request)
        runtime = served.runtime
        if runtime.source.task != Task.text_embedding:
            raise InvalidInput(
                f"model '{args.model_name}' serves {runtime.source.task.value}; embeddings need a text_embedding model"
            )
        inputs, embedding_request = openai_embeddings.parse_embedding_request(await request.body())
        if embedding_request.model not in (None, args.model_name):
            raise ModelNotFound(embedding_request.model)
        options = runtime.options_for(
            RequestOptions(dimensions=embedding_request.dimensions, prompt_name=embedding_request.prompt_name)
        )
        result = await predict(served, inputs, options)
        return json_response(openai_embeddings.embedding_response(embedding_request, args.model_name, result))

    @router.post(
        "/v1/completions",
        response_model=openai_responses.CompletionResponse,
        responses={**errors("openai"), **event_stream(openai_responses.CompletionStreamResponse, _COMPLETION)},
        openapi_extra=request_body(openai_schemas.CompletionRequest),
    )
    async def openai_completions(request: Request) -> Response:
        return await _generate(request, openai_generation.create_completion)

    @router.post(
        "/v1/chat/completions",
        response_model=openai_responses.ChatCompletionResponse,
        responses={**errors("openai"), **event_stream(openai_responses.ChatCompletionStreamResponse, _CHAT)},
        openapi_extra=request_body(openai_schemas.ChatCompletionRequest),
    )
    async def openai_chat_completions(request: Request) -> Response:
        return await _generate(request, openai_generation.create_chat_completion)

    async def _generate(request: Request, create: Callable[..., Awaitable[Any]]) -> Response:
        require_json(request)
        if served.generation is None:
            raise InvalidInput(
                f"model '{args.model_name}' serves {served.runtime.source.task.value}; "
                "completions need a text_generation or text2text_generation model"
            )
        body = json_object(await request.body())
        if body.get("model") not in (None, args.model_name):
            raise ModelNotFound(str(body.get("model")))
        if not served.runtime.ready:
            raise served.runtime.not_ready_error()
        result = await create(served.generation, body, model_name=args.model_name)
        if isinstance(result, dict):
            return json_response(result)
        # Starlette cancels the stream when the client disconnects, which frees the request's slot.
        return StreamingResponse(result, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return router
