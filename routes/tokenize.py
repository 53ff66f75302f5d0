"""vLLM's /openai/tokenize and /openai/detokenize for generative models (the routes vLLM serves them at)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from engines.generation.backend import GenerationBackend
from handlers.errors import InvalidInput
from protocols.openai.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    detokenize,
    tokenize,
)
from routes.common import OPENAI_PREFIX, ServedModel, check_model_name
from routes.openapi import errors


def build_router(served: ServedModel) -> APIRouter:
    router = APIRouter(prefix=OPENAI_PREFIX)

    def backend() -> GenerationBackend:
        if served.generation is None:
            raise InvalidInput(f"model '{served.args.model_name}' is not a generative model; nothing to tokenize")
        return served.generation

    @router.post("/tokenize", response_model=TokenizeResponse, responses=errors("openai"))
    async def tokenize_route(request: TokenizeRequest) -> TokenizeResponse:
        check_model_name(served, request.model)
        return await asyncio.to_thread(tokenize, backend(), request)

    @router.post("/detokenize", response_model=DetokenizeResponse, responses=errors("openai"))
    async def detokenize_route(request: DetokenizeRequest) -> DetokenizeResponse:
        check_model_name(served, request.model)
        return await asyncio.to_thread(detokenize, backend(), request)

    return router
