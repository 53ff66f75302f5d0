"""The BentoML service: arguments, the model's lifecycle, and the protocol routers of `routes/` mounted on it.

Serve with `bentoml serve service:HuggingFaceService --arg model_dir=PATH ...` (see README.md).
Routes never touch torch: predictive work goes through the runtime's batcher thread.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import Response

from engines.encoder_runtime import PredictiveRuntime
from engines.generation.backend import GenerationBackend
from engines.generation.select import build_generation_backend, vllm_unavailable_reason
from handlers.errors import ServingError
from protocols import v2_grpc
from protocols.errors import kserve_error_body, openai_error_body
from protocols.kserve_generation import GenerativeRuntime
from routes import kserve as kserve_routes
from routes import openai as openai_routes
from routes import vllm_openai as vllm_openai_routes
from routes.common import OPENAI_PREFIX, Timer, json_response
from settings.arguments import ArgumentError, ServerArguments, parse_arguments
from settings.loading import ModelLoadError, ModelSource, apply_torch_threads, inspect_model
from settings.model_store import stored_model_path
from settings.tasks import TaskError

logger = logging.getLogger("hf_bentoml_server")

SERVER_NAME = "hf-bentoml-server"


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

app = FastAPI(title="Hugging Face model server", version=SERVER_VERSION)


@app.exception_handler(ServingError)
async def _serving_error(request: Request, error: ServingError) -> Response:
    openai_route = request.url.path.startswith(OPENAI_PREFIX)
    body = openai_error_body(error) if openai_route else kserve_error_body(error)
    if error.status_code >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, error.status_code, error.message)
    return json_response(body, status_code=error.status_code)


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
class HuggingFaceService:  # routes are mounted per instance in __init__
    """Serves one Hugging Face model over KServe V1, Open Inference Protocol V2 and OpenAI routes."""

    if ARGS.bento_model:
        # Declared so that `bentoml build --arg bento_model=TAG` packs the model into the Bento.
        baked_model = bentoml.models.BentoModel(ARGS.bento_model)

    def __init__(self) -> None:
        self.args = ARGS
        apply_torch_threads(ARGS)
        self.timer = Timer(ARGS.model_name)
        self.generation: GenerationBackend | None = None
        self.runtime: PredictiveRuntime | GenerativeRuntime
        if SOURCE.task.is_generative:
            self.generation = build_generation_backend(SOURCE, ARGS)
            self.runtime = GenerativeRuntime(self.generation, ARGS, SOURCE)  # started in the event loop below
        else:
            self.runtime = PredictiveRuntime(ARGS, SOURCE)
            self.runtime.start_loading()
        self.grpc_server: Any = None
        self.server_name, self.server_version = SERVER_NAME, SERVER_VERSION
        # Routers close over this instance: no per-request dependency has to find the service (BentoML's
        # class views resolve one in a thread pool for every request, a measurable share of a small request).
        # On the vLLM backend /openai is vLLM's own OpenAI layer on the same engine; else ours.
        openai_router = vllm_openai_routes if getattr(self.generation, "name", None) == "vllm" else openai_routes
        for build_router in (kserve_routes.build_router, openai_router.build_router):
            app.include_router(build_router(self))

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
