"""The BentoML service: routes that parse the wire format, call the model's runtime, and format.

Serve with `bentoml serve service:HuggingFaceService --arg model_dir=PATH ...` (see README.md).
Routes never touch torch: predictive work goes through the runtime's batcher thread.
"""

from __future__ import annotations

import gzip
import json
import logging
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import bentoml
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from handlers.arguments import ArgumentError, ServerArguments, parse_arguments
from handlers.errors import InvalidInput, ModelNotFound, ServingError, UnsupportedMediaType
from handlers.generation.backend import GenerationBackend
from handlers.generation.select import build_generation_backend, vllm_unavailable_reason
from handlers.loading import ModelLoadError, ModelSource, apply_torch_threads, inspect_model
from handlers.model_store import stored_model_path
from handlers.requests import PredictOptions, TaskResult
from handlers.runtime import PredictiveRuntime
from handlers.tasks import Task, TaskError
from protocols import openai_embeddings, openai_generation, v1, v2, v2_binary, v2_grpc
from protocols.errors import kserve_error_body, openai_error_body
from protocols.kserve_generation import GenerativeRuntime

logger = logging.getLogger("hf_bentoml_server")
_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])

SERVER_NAME = "hf-bentoml-server"
OPENAI_PREFIX = "/openai"


def _settle_model() -> tuple[ServerArguments, ModelSource]:
    """Arguments and model, read when `bentoml serve` imports the service: a wrong name, folder, config,
    task or tokenizer stops the start with its reason instead of a worker that restarts forever."""
    try:
        args = parse_arguments(vars(bentoml.use_arguments()))
        if args.bento_model:
            try:
                baked = stored_model_path(args.bento_model)
            except bentoml.exceptions.NotFound as error:
                raise ModelLoadError(
                    f"bento_model '{args.bento_model}' is not in BentoML's model store: {error}"
                ) from None
            args = args.model_copy(update={"model_dir": str(baked), "model_id": None})
        source = inspect_model(args)
        if source.task.is_generative and args.predictor_host:
            raise ModelLoadError("predictor_host serves encoder tasks; generative models run in this server")
        if source.task.is_generative and args.backend == "vllm":
            reason = vllm_unavailable_reason(source)
            if reason:
                raise ModelLoadError(f"backend 'vllm' was asked for but cannot serve this model: {reason}")
        return args, source
    except (ArgumentError, ModelLoadError, TaskError) as error:
        print(f"hf-bentoml-server cannot start: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


ARGS, SOURCE = _settle_model()

try:
    SERVER_VERSION = version(SERVER_NAME)
except PackageNotFoundError:
    SERVER_VERSION = "0.1.0"

# KServe's metric names and label, so existing dashboards keep working.
_STAGE_SECONDS = {
    stage: bentoml.metrics.Histogram(
        name=f"request_{stage}_seconds",
        documentation=f"Time spent in the {stage} stage of a request",
        labelnames=["model_name"],
    )
    for stage in ("preprocess", "predict", "postprocess")
}

# Content types a body may carry. curl's -d default (form-urlencoded) is accepted as KServe does.
_JSON_TYPES = {"", "application/json", "application/x-www-form-urlencoded", "text/plain"}

app = FastAPI(title="Hugging Face model server", version=SERVER_VERSION)


def _json_response(body: Any, status_code: int = 200) -> Response:
    """orjson: several times faster than the standard library on embedding-sized float lists."""
    return Response(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), status_code, media_type="application/json")


def _route(method: str, *paths: str) -> Callable[[_Endpoint], _Endpoint]:
    """Marks a service method as the endpoint of `paths`; __init__ mounts it bound to the instance.

    Bound methods need no per-request dependency to find the service (BentoML's class views resolve
    one in a thread pool for every request), which is a measurable share of a small model's request.
    """

    def mark(endpoint: _Endpoint) -> _Endpoint:
        routes = [*getattr(endpoint, "__routes__", []), *((method, path) for path in paths)]
        endpoint.__routes__ = routes  # type: ignore[attr-defined]
        return endpoint

    return mark


def _mount_routes(service: object) -> None:
    for name, member in vars(type(service)).items():
        for method, path in getattr(member, "__routes__", []):
            app.add_api_route(path, getattr(service, name), methods=[method], response_model=None)


@app.exception_handler(ServingError)
async def _serving_error(request: Request, error: ServingError) -> Response:
    openai_route = request.url.path.startswith(OPENAI_PREFIX)
    body = openai_error_body(error) if openai_route else kserve_error_body(error)
    if error.status_code >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, error.status_code, error.message)
    return _json_response(body, status_code=error.status_code)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _require_json(request: Request) -> None:
    kind = _content_type(request)
    if kind not in _JSON_TYPES and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type '{kind}' is not supported here; send application/json")


def _decompress(body: bytes, encoding: str) -> bytes:
    """tritonclient may compress request bodies (request_compression_algorithm)."""
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error) as error:
        raise InvalidInput(f"the body is not valid {encoding} data: {error}") from None
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding '{encoding}' is not supported; use gzip, deflate or none")
    return body


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"the body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput("the body must be a JSON object")
    return parsed


class _Timer:
    """Observes one stage's duration in KServe's per-model histograms."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    async def run(self, stage: str, work: Callable[[], Awaitable[TaskResult]]) -> TaskResult:
        started = time.perf_counter()
        try:
            return await work()
        finally:
            _STAGE_SECONDS[stage].labels(model_name=self.model_name).observe(time.perf_counter() - started)

    def observe(self, stage: str, started: float) -> None:
        _STAGE_SECONDS[stage].labels(model_name=self.model_name).observe(time.perf_counter() - started)


def _resources() -> dict[str, Any]:
    """BentoML resources from the arguments: GPUs only when asked for, so a plain start serves on CPU."""
    if ARGS.gpus == 0:
        return {}
    return {"gpu": ARGS.gpus, **({"gpu_type": ARGS.gpu_type} if ARGS.gpu_type else {})}


@bentoml.service(
    name="huggingface-service",
    workers=ARGS.workers,
    resources=_resources(),
    traffic={"timeout": 600},
    # Per-request access lines cost about a quarter of the server's HTTP throughput on small models.
    logging={"access": {"enabled": ARGS.access_log}},
    # OpenTelemetry's ASGI middleware opens a span for every body message, i.e. every SSE chunk:
    # without an exporter to send them to, that is pure cost, so routes are traced only on request.
    tracing={} if ARGS.tracing else {"excluded_urls": ["/"]},
)
@bentoml.asgi_app(app, path="/")
class HuggingFaceService:  # routes are mounted per instance by _mount_routes
    """Serves one Hugging Face model over KServe V1, Open Inference Protocol V2 and OpenAI routes."""

    if ARGS.bento_model:
        # Declared so that `bentoml build --arg bento_model=TAG` packs the model into the Bento.
        baked_model = bentoml.models.BentoModel(ARGS.bento_model)

    def __init__(self) -> None:
        self.args = ARGS
        apply_torch_threads(ARGS)
        self.timer = _Timer(ARGS.model_name)
        self.generation: GenerationBackend | None = None
        self.runtime: PredictiveRuntime | GenerativeRuntime
        if SOURCE.task.is_generative:
            self.generation = build_generation_backend(SOURCE, ARGS)
            self.runtime = GenerativeRuntime(self.generation, ARGS, SOURCE)  # started in the event loop below
        else:
            self.runtime = PredictiveRuntime(ARGS, SOURCE)
            self.runtime.start_loading()
        self.grpc_server: Any = None
        _mount_routes(self)

    @bentoml.on_startup
    async def _start(self) -> None:
        """The generation engine and the gRPC service (KServe's port 8081) live in this worker's event loop."""
        if isinstance(self.runtime, GenerativeRuntime):
            self.runtime.start_loading()
        if self.args.grpc_port is not None:
            self.grpc_server = await v2_grpc.start_grpc_server(
                self.runtime,
                self.args.grpc_port,
                server_name=SERVER_NAME,
                server_version=SERVER_VERSION,
                timer=self.timer,
            )

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        if isinstance(self.runtime, GenerativeRuntime):
            await self.runtime.stop()

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    # --- shared steps ---

    def _check_name(self, name: str) -> None:
        if name != self.args.model_name:
            raise ModelNotFound(name)

    async def _predict(self, texts: list[str], options: Any) -> TaskResult:
        return await self.timer.run("predict", lambda: self.runtime.predict(texts, options))

    # --- KServe root and V1 ---

    @_route("GET", "/")
    async def root(self) -> dict[str, str]:
        return {"status": "alive"}

    @_route("GET", "/v1/models")
    async def v1_models(self) -> dict[str, Any]:
        return v1.models_response([self.args.model_name])

    @_route("GET", "/v1/models/{name}")
    async def v1_model_status(self, name: str) -> Response:
        self._check_name(name)
        if not self.runtime.ready:
            raise self.runtime.not_ready_error()
        return _json_response(v1.model_status_response(name, True))

    @_route("POST", "/v1/models/{name}:predict")
    async def v1_predict(self, name: str, request: Request) -> Response:
        self._check_name(name)
        _require_json(request)
        started = time.perf_counter()
        texts, request_options = v1.parse_predict_request(await request.body())
        options = self.runtime.options_for(request_options)
        self.timer.observe("preprocess", started)
        result = await self._predict(texts, options)
        started = time.perf_counter()
        response = _json_response(v1.predict_response(result))
        self.timer.observe("postprocess", started)
        return response

    # --- Open Inference Protocol (V2) ---

    @_route("GET", "/v2")
    async def v2_server_metadata(self) -> dict[str, Any]:
        return v2.server_metadata(SERVER_NAME, SERVER_VERSION)

    @_route("GET", "/v2/health/live")
    async def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @_route("GET", "/v2/health/ready")
    async def v2_ready(self) -> Response:
        ready = self.runtime.ready
        return _json_response({"ready": ready}, status_code=200 if ready else 503)

    @_route("GET", "/v2/models/{name}", "/v2/models/{name}/versions/{model_version}")
    async def v2_model_metadata(self, name: str, model_version: str | None = None) -> dict[str, Any]:
        self._check_name(name)
        handler = self.runtime.handler
        options = PredictOptions.merge(self.args, None)
        return v2.model_metadata(name, "huggingface", handler.input_specs(), handler.output_specs(options))

    @_route("GET", "/v2/models/{name}/ready", "/v2/models/{name}/versions/{model_version}/ready")
    async def v2_model_ready(self, name: str, model_version: str | None = None) -> Response:
        self._check_name(name)
        ready = self.runtime.ready
        return _json_response({"name": name, "ready": ready}, status_code=200 if ready else 503)

    @_route("POST", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{model_version}/infer")
    async def v2_infer(self, name: str, request: Request, model_version: str | None = None) -> Response:
        self._check_name(name)
        kind = _content_type(request)
        header_length = request.headers.get(v2_binary.HEADER_LENGTH)
        if kind != v2_binary.CONTENT_TYPE and header_length is None:
            _require_json(request)
        started = time.perf_counter()
        body = _decompress(await request.body(), request.headers.get("content-encoding", ""))
        parsed = v2.parse_infer_request(body, kind, header_length)
        options = self.runtime.options_for(parsed.options)
        specs = self.runtime.handler.output_specs(options)
        v2.select_outputs(specs, parsed.requested_outputs)  # unknown output names fail before the model runs
        self.timer.observe("preprocess", started)
        result = await self._predict(parsed.texts, options)
        started = time.perf_counter()
        body, content_type, header_length = v2.infer_response(name, parsed, result, specs)
        headers = {v2_binary.HEADER_LENGTH: str(header_length)} if header_length is not None else None
        self.timer.observe("postprocess", started)
        return Response(body, media_type=content_type, headers=headers)

    # --- OpenAI ---

    @_route("GET", OPENAI_PREFIX + "/v1/models")
    async def openai_models(self) -> dict[str, Any]:
        return openai_embeddings.models_response([self.args.model_name])

    @_route("POST", OPENAI_PREFIX + "/v1/embeddings")
    async def openai_embeddings(self, request: Request) -> Response:
        _require_json(request)
        if self.runtime.source.task != Task.text_embedding:
            raise InvalidInput(
                f"model '{self.args.model_name}' serves {self.runtime.source.task.value}; "
                "embeddings need a text_embedding model"
            )
        texts, embedding_request = openai_embeddings.parse_embedding_request(
            await request.body(), self.runtime.handler.source.config.hidden_size
        )
        if embedding_request.model not in (None, self.args.model_name):
            raise ModelNotFound(embedding_request.model)
        result = await self._predict(texts, self.runtime.options_for(None))
        return _json_response(openai_embeddings.embedding_response(embedding_request, self.args.model_name, result))

    @_route("POST", OPENAI_PREFIX + "/v1/completions")
    async def openai_completions(self, request: Request) -> Response:
        return await self._generate(request, openai_generation.create_completion)

    @_route("POST", OPENAI_PREFIX + "/v1/chat/completions")
    async def openai_chat_completions(self, request: Request) -> Response:
        return await self._generate(request, openai_generation.create_chat_completion)

    async def _generate(self, request: Request, create: Callable[..., Awaitable[Any]]) -> Response:
        _require_json(request)
        if self.generation is None:
            raise InvalidInput(
                f"model '{self.args.model_name}' serves {self.runtime.source.task.value}; "
                "completions need a text_generation or text2text_generation model"
            )
        body = _json_object(await request.body())
        if body.get("model") not in (None, self.args.model_name):
            raise ModelNotFound(str(body.get("model")))
        if not self.runtime.ready:
            raise self.runtime.not_ready_error()
        result = await create(self.generation, body, model_name=self.args.model_name)
        if isinstance(result, dict):
            return _json_response(result)
        # Starlette cancels the stream when the client disconnects, which frees the request's slot.
        return StreamingResponse(result, media_type="text/event-stream", headers={"cache-control": "no-cache"})
