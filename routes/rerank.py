"""The rerank API of Cohere, Jina and vLLM: `POST /v1/rerank` and `POST /openai/v1/rerank`.

On the vLLM backend /openai/* is vLLM's app, so /openai/v1/rerank is vLLM's there; /v1/rerank stays ours."""

from __future__ import annotations

from fastapi import APIRouter

from handlers.errors import ModelNotFound
from protocols import rerank
from routes.common import OPENAI_PREFIX, ServedModel, predictive_runtime, vllm_serves_openai


def build_router(served: ServedModel) -> APIRouter:
    errors = {
        status: {"model": rerank.OpenAIErrorResponse, "description": meaning}
        for status, meaning in ((400, "Invalid input"), (404, "Unknown model"), (429, "Queue full"), (503, "Not ready"))
    }
    router = APIRouter(tags=["Rerank"], responses=errors)  # type: ignore[arg-type]
    args = served.args

    async def _rerank(request: rerank.RerankRequest) -> rerank.RerankResponse:
        if request.model not in (None, args.model_name):
            raise ModelNotFound(request.model)
        runtime = predictive_runtime(served, "reranking needs a cross-encoder (task rerank)")
        texts = request.texts()
        result = await served.timer.run(
            "predict", lambda: runtime.rerank(request.query, texts, raw_scores=request.raw_scores)
        )
        return rerank.rerank_response(request, args.model_name, result)

    @router.post("/v1/rerank", response_model_exclude_none=True)
    async def rerank_v1(request: rerank.RerankRequest) -> rerank.RerankResponse:
        """Rank documents by relevance to the query (Cohere, Jina and vLLM's rerank API)."""
        return await _rerank(request)

    if vllm_serves_openai(served):
        # vLLM's app owns /openai/* and answers /openai/v1/rerank on its own engine (tests/test_vllm_pooling.py
        # checks it is vLLM's answer); a route here would only be a wrong entry in the OpenAPI document.
        return router

    @router.post(OPENAI_PREFIX + "/v1/rerank", response_model_exclude_none=True)
    async def rerank_openai(request: rerank.RerankRequest) -> rerank.RerankResponse:
        """The same rerank API under the OpenAI prefix, where vLLM's clients look for it."""
        return await _rerank(request)

    return router
