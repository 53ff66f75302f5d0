"""text-embeddings-inference (TEI) and text-generation-inference (TGI) routes, so that
`huggingface_hub.InferenceClient(model=URL)` works unchanged.

TEI: /embed, /embed_all, /predict, /rerank, /tokenize, /decode, /info, /health. TGI: /generate,
/generate_stream. `POST /` dispatches by the served task as TEI and TGI do; bodies with a `parameters`
object (what InferenceClient sends for classification and fill-mask) get the Hugging Face Inference API's
pipeline shapes. GET / stays KServe's liveness answer (routes/kserve.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from engines.encoder_runtime import PredictiveRuntime
from handlers.errors import InvalidInput
from handlers.requests import RequestOptions
from protocols import rerank, tei, tgi
from protocols.errors import invalid_from_validation
from routes.common import ServedModel, json_response, predict, predictive_runtime
from settings.tasks import Task

# The paths whose errors are rendered in TEI's shape {"error", "error_type"} (see service.py).
TEI_PATHS = frozenset(
    {"/", "/embed", "/embed_all", "/predict", "/rerank", "/tokenize", "/decode", "/info", "/health"}
    | {"/generate", "/generate_stream"}
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": tei.ErrorResponse, "description": "Invalid input (error_type validation)"},
    401: {"model": tei.ErrorResponse, "description": "Missing or wrong API key (when api_key is set)"},
    413: {"model": tei.ErrorResponse, "description": "Over a size limit: body, inputs per request, characters"},
    429: {"model": tei.ErrorResponse, "description": "Queue full (error_type overloaded)"},
    503: {"model": tei.ErrorResponse, "description": "Model not ready (error_type unhealthy)"},
}

RootRequest = (
    tei.EmbedRequest | tei.PredictRequest | rerank.TEIRerankRequest | tei.PipelineRequest | tgi.CompatGenerateRequest
)
RootResponse = (
    list[list[float]]
    | list[tei.Prediction]
    | list[list[tei.Prediction]]
    | list[rerank.TEIRank]
    | list[tgi.GenerateResponse]
    | list[dict[str, Any]]
)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise invalid_from_validation(error, "request") from None


def build_router(served: ServedModel) -> APIRouter:
    router = APIRouter(tags=["TEI / TGI"], responses=_ERRORS)
    args = served.args

    def encoder(task: Task | tuple[Task, ...], route: str) -> PredictiveRuntime:
        tasks = task if isinstance(task, tuple) else (task,)
        names = " or ".join(t.value for t in tasks)
        runtime = predictive_runtime(served, f"{route} needs a {names} model")
        if runtime.source.task not in tasks:
            raise InvalidInput(f"model '{args.model_name}' serves {runtime.source.task.value}; {route} needs {names}")
        return runtime

    # --- TEI ---

    async def embed(request: tei.EmbedRequest) -> list[list[float]]:
        runtime = encoder(Task.text_embedding, "/embed")
        rerank.check_truncation_direction(request.truncation_direction)
        texts, _ = tei.texts_of(request.inputs)
        # The folder's prompts (config_sentence_transformers.json), as TEI reads them; normalised below, after cutting.
        request_options = RequestOptions(prompt_name=request.prompt_name) if request.prompt_name else None
        options = dataclasses.replace(runtime.options_for(request_options), normalize=False)
        result = await predict(served, texts, options)
        return tei.embeddings(result.predictions, request.dimensions, request.normalize)

    @router.post("/embed")
    async def embed_route(request: tei.EmbedRequest) -> list[list[float]]:
        """Embeddings, pooled as the model folder says; L2-normalised unless normalize=false."""
        return json_response(await embed(request))  # type: ignore[return-value]

    @router.post("/embed_all")
    async def embed_all(request: tei.EmbedAllRequest) -> list[list[list[float]]]:
        """Every token's last hidden state, per input, without pooling."""
        runtime = encoder(Task.text_embedding, "/embed_all")
        rerank.check_truncation_direction(request.truncation_direction)
        _refuse_prompt_name(request.prompt_name)
        texts, _ = tei.texts_of(request.inputs)
        return json_response(await runtime.token_embeddings(texts))  # type: ignore[return-value]

    async def logits(runtime: PredictiveRuntime, items: list[Any]) -> tuple[list[list[float]], list[str]]:
        """Raw logits per input and the label names, for sequence_classification and rerank models."""
        result = await predict(served, items, runtime.options_for(RequestOptions(return_raw_logits=True)))
        rows = result.outputs["logits"] if "logits" in result.outputs else [[s] for s in result.predictions]
        handler = runtime.handler
        return rows, [handler.label_name(i) for i in range(len(rows[0]))]

    @router.post("/predict")
    async def predict_route(request: tei.PredictRequest) -> list[tei.Prediction] | list[list[tei.Prediction]]:
        """Class scores (softmax; sigmoid for one label; logits with raw_scores), most likely first."""
        runtime = encoder((Task.sequence_classification, Task.rerank), "/predict")
        rerank.check_truncation_direction(request.truncation_direction)
        items, single = tei.predict_inputs(request.inputs)
        rows, labels = await logits(runtime, items)
        function = tei.default_function(len(labels), request.raw_scores)
        predictions = [tei.ranked_predictions(row, labels, function) for row in rows]
        return json_response(predictions[0] if single else predictions)  # type: ignore[return-value]

    async def tei_rerank(request: rerank.TEIRerankRequest) -> list[dict[str, object]]:
        if not request.texts:
            raise InvalidInput("`texts` cannot be empty")
        runtime = encoder(Task.rerank, "/rerank")
        rerank.check_truncation_direction(request.truncation_direction)
        raw = request.raw_scores
        result = await served.timer.run("predict", lambda: runtime.rerank(request.query, request.texts, raw_scores=raw))
        return rerank.tei_rerank_response(request, result)

    @router.post("/rerank")
    async def rerank_route(request: rerank.TEIRerankRequest) -> list[rerank.TEIRank]:
        """The texts ranked by relevance to the query (sigmoid scores; logits with raw_scores)."""
        return json_response(await tei_rerank(request))  # type: ignore[return-value]

    @router.post("/tokenize")
    async def tokenize(request: tei.TokenizeRequest) -> list[list[tei.SimpleToken]]:
        """Tokens with ids, texts and character offsets, per input."""
        _refuse_prompt_name(request.prompt_name)
        texts, _ = tei.texts_of(request.inputs)
        tokenizer = served.runtime.source.tokenizer
        if not tokenizer.is_fast:
            raise InvalidInput("this model's tokenizer gives no offsets (not a fast tokenizer)")

        def run() -> list[list[dict[str, Any]]]:
            encoding = tokenizer(
                texts,
                add_special_tokens=request.add_special_tokens,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
            )
            return [
                tei.tokens(ids, offsets, special, text, tokenizer.convert_ids_to_tokens(ids))
                for ids, offsets, special, text in zip(
                    encoding["input_ids"],
                    encoding["offset_mapping"],
                    encoding["special_tokens_mask"],
                    texts,
                    strict=True,
                )
            ]

        return json_response(await asyncio.to_thread(run))  # type: ignore[return-value]

    @router.post("/decode")
    async def decode(request: tei.DecodeRequest) -> list[str]:
        """Texts of token ids."""
        batch = request.ids if request.ids and isinstance(request.ids[0], list) else [request.ids]
        if not batch or not batch[0]:
            raise InvalidInput("`ids` cannot be empty")
        tokenizer = served.runtime.source.tokenizer
        vocabulary = len(tokenizer)
        for row in batch:
            if any(not 0 <= token < vocabulary for token in row):  # the tokenizer would overflow or panic
                raise InvalidInput(f"`ids` holds a token id outside this model's vocabulary [0, {vocabulary})")
        skip = request.skip_special_tokens
        return await asyncio.to_thread(tokenizer.batch_decode, batch, skip_special_tokens=skip)

    @router.get("/info")
    async def info() -> tei.Info:
        """The served model and limits, in TEI's shape (TGI's fields added for generative models)."""
        return tei.Info.model_validate(_info(served))

    empty_body = {200: {"description": "Healthy; the body is empty", "content": {}}}

    @router.get("/health", response_class=Response, responses=empty_body)  # type: ignore[arg-type]
    async def health() -> Response:
        """200 when the model answers, 503 (error_type unhealthy) while loading or after a failed load."""
        if not served.runtime.ready:
            raise served.runtime.not_ready_error()
        return Response(status_code=200)

    # --- TGI ---

    def generation_backend() -> Any:
        if served.generation is None:
            raise InvalidInput(
                f"model '{args.model_name}' serves {served.runtime.source.task.value}; generation needs a "
                "text_generation or text2text_generation model"
            )
        if not served.runtime.ready:
            raise served.runtime.not_ready_error()
        return served.generation

    @router.post("/generate")
    async def generate(request: tgi.GenerateRequest) -> tgi.GenerateResponse:
        """Generated text, with details (finish reason, tokens, logprobs) unless details=false."""
        return json_response((await tgi.generate(generation_backend(), request)).model_dump())  # type: ignore[return-value]

    @router.post(
        "/generate_stream",
        response_class=StreamingResponse,
        responses={
            200: {"model": tgi.StreamResponse, "description": "Server-sent events: one StreamResponse per token"}
        },
    )
    async def generate_stream(request: tgi.GenerateRequest) -> StreamingResponse:
        """Tokens as server-sent events; the last carries generated_text and details."""
        return _sse(await tgi.generate_stream(generation_backend(), request))

    # --- POST / ---

    @router.post("/", responses={200: {"model": RootResponse}})
    async def root(body: RootRequest, request: Request) -> Response:  # type: ignore[valid-type]
        """By the served task, as TEI and TGI: embed, predict, rerank, generate (stream with `stream`).
        Classification and fill-mask bodies with a `parameters` object get the Inference API's pipeline shapes."""
        raw = await request.body()
        task = served.runtime.source.task
        if task.is_generative:
            compat = _parse(tgi.CompatGenerateRequest, raw)
            if compat.stream:
                return _sse(await tgi.generate_stream(generation_backend(), compat))
            response = await tgi.generate(generation_backend(), compat)
            return json_response([response.model_dump()])  # a list, as TGI answers `/` (the Inference API's shape)
        if task == Task.text_embedding:
            return json_response(await embed(_parse(tei.EmbedRequest, raw)))
        if task == Task.rerank and "parameters" not in orjson.loads(raw):
            return json_response(await tei_rerank(_parse(rerank.TEIRerankRequest, raw)))
        if task in (Task.sequence_classification, Task.rerank):
            if "parameters" not in orjson.loads(raw):
                return await predict_route(_parse(tei.PredictRequest, raw))
            return json_response(await text_classification(_parse(tei.PipelineRequest, raw)))
        if task == Task.token_classification:
            return json_response(await token_classification(_parse(tei.PipelineRequest, raw)))
        return json_response(await fill_mask(_parse(tei.PipelineRequest, raw)))

    async def text_classification(request: tei.PipelineRequest) -> list[list[dict[str, Any]]]:
        parameters = request.parameters or tei.PipelineParameters()
        _refuse_parameters(parameters, "top_k", "function_to_apply")
        runtime = encoder((Task.sequence_classification, Task.rerank), "text classification")
        texts, _ = tei.texts_of(request.inputs)
        rows, labels = await logits(runtime, texts)
        function = parameters.function_to_apply or tei.default_function(len(labels))
        return [tei.ranked_predictions(row, labels, function, parameters.top_k) for row in rows]

    async def token_classification(request: tei.PipelineRequest) -> list[Any]:
        parameters = request.parameters or tei.PipelineParameters()
        _refuse_parameters(parameters, "aggregation_strategy", "ignore_labels")
        runtime = encoder(Task.token_classification, "token classification")
        texts, single = tei.texts_of(request.inputs)
        result = await predict(served, texts, runtime.options_for(RequestOptions(aggregation_strategy="simple")))
        ignored = set(parameters.ignore_labels or ["O"])
        entities = [[e for e in row if e["entity_group"] not in ignored] for row in result.predictions]
        return entities[0] if single else entities

    async def fill_mask(request: tei.PipelineRequest) -> list[Any]:
        parameters = request.parameters or tei.PipelineParameters()
        _refuse_parameters(parameters, "top_k")
        runtime = encoder(Task.fill_mask, "fill mask")
        texts, single = tei.texts_of(request.inputs)
        result = await predict(served, texts, runtime.options_for(RequestOptions(top_k=parameters.top_k or 5)))
        return result.predictions[0] if single else result.predictions

    return router


def _sse(events: Any) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _refuse_prompt_name(prompt_name: str | None) -> None:
    if prompt_name is not None:
        raise InvalidInput("prompt_name is taken by /embed; this route does not put the model's prompts before texts")


def _refuse_parameters(parameters: tei.PipelineParameters, *allowed: str) -> None:
    unserved = sorted(name for name in ("stride", "targets") if getattr(parameters, name) is not None)
    if unserved:
        raise InvalidInput(f"parameters {', '.join(unserved)} are not supported by this server")
    misplaced = sorted(name for name in parameters.model_fields_set if name not in allowed)
    if misplaced:
        raise InvalidInput(f"parameters {', '.join(misplaced)} do not apply to this model's task")


def _info(served: ServedModel) -> dict[str, Any]:
    source, args = served.runtime.source, served.args
    labels = {
        "id2label": {str(k): v for k, v in (getattr(source.config, "id2label", None) or {}).items()},
        "label2id": dict(getattr(source.config, "label2id", None) or {}),
    }
    model_type: dict[str, Any] = {
        Task.text_embedding: {"embedding": {"pooling": getattr(served.runtime.handler, "pooling", "mean")}},
        Task.rerank: {"reranker": labels},
    }.get(source.task, {"classifier": labels} if not source.task.is_generative else {"generator": {}})
    info: dict[str, Any] = {
        "model_id": args.model_id or str(source.path),
        "model_sha": args.model_revision,
        "model_dtype": str(source.dtype).removeprefix("torch."),
        "served_model_name": args.model_name,
        "model_type": model_type,
        "max_concurrent_requests": args.max_queue_size,
        "max_input_length": source.max_model_len,
        "max_batch_tokens": args.max_batch_tokens,
        "max_batch_requests": args.max_batch_size,
        "max_client_batch_size": args.max_queue_size,
        "version": served.server_version,
        "router": served.server_name,
    }
    if source.task.is_generative:  # TGI's Info fields
        info.update(
            model_pipeline_tag=source.task.value.replace("_", "-"),
            max_best_of=1,
            max_stop_sequences=None,
            max_input_tokens=source.max_model_len - 1,
            max_total_tokens=source.max_model_len,
            validation_workers=1,
        )
    return info
