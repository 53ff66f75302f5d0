"""The BentoML service: arguments, the model's lifecycle, and the protocol routers of `routes/` mounted on it.

Serve with `bentoml serve service:HuggingFaceService --arg model_dir=PATH ...` (see README.md).
Routes never touch torch: predictive work goes through the runtime's batcher thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import bentoml
from fastapi import FastAPI

from engines.encoder_runtime import PredictiveRuntime
from engines.generation.backend import GenerationBackend
from engines.generation.select import build_generation_backend, transformers_refusal, vllm_unavailable_reason
from engines.vllm_pooling import VLLMPoolingEngine, pooling_unavailable_reason
from engines.worker_readiness import WorkerReadiness
from protocols import v2_grpc
from protocols.kserve_generation import GenerativeRuntime
from routes import fallback as fallback_routes
from routes import kserve as kserve_routes
from routes import openai as openai_routes
from routes import outer_layers
from routes import playground as playground_routes
from routes import rerank as rerank_routes
from routes import tei as tei_routes
from routes import tokenize as tokenize_routes
from routes import vllm_openai as vllm_openai_routes
from routes.bentoml_api import TypedApis
from routes.cancellation import CANCELLED, CancelOnDisconnect
from routes.common import Timer, vllm_serves_openai
from routes.errors import install_error_handlers
from routes.fast_path import FastPath, FastPathTargets, direct_routes
from routes.guard import RequestGuard
from routes.lifecycle import Lifecycle
from routes.openapi import install_bentoml_openapi, install_openapi
from settings.arguments import ArgumentError, ServerArguments, parse_arguments
from settings.loading import ModelLoadError, ModelSource, apply_log_config, apply_torch_threads, inspect_model
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
        if args.configure_logging and args.log_config_file:
            apply_log_config(args.log_config_file)  # after BentoML's own set-up, which runs before this import
        source = inspect_model(args)
        if source.task.is_generative and args.predictor_host:
            raise ModelLoadError("predictor_host serves encoder tasks; generative models run in this server")
        if args.backend == "vllm":
            unavailable = vllm_unavailable_reason if source.task.is_generative else pooling_unavailable_reason
            reason = unavailable(source)
            if reason:
                raise ModelLoadError(f"backend 'vllm' was asked for but cannot serve this model: {reason}")
        if source.task.is_generative:
            refused = transformers_refusal(source, args)  # hybrid (Mamba/SSM) models: before the weights load
            if refused:
                raise ModelLoadError(refused)
        return args, source
    except (ArgumentError, ModelLoadError, TaskError) as error:
        print(f"hf-bentoml-server cannot start: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


ARGS, SOURCE = _settle_model()

try:
    SERVER_VERSION = version(SERVER_NAME)
except PackageNotFoundError:
    SERVER_VERSION = "0.1.0"

# /docs is BentoML's OpenAPI document (these routes merged with the typed endpoints), not FastAPI's page.
app = FastAPI(title="Hugging Face model server", version=SERVER_VERSION, docs_url=None, redoc_url=None)
app.add_middleware(CancelOnDisconnect)  # a client that leaves cancels its handler, on every route
# BentoML's request metrics, cheaper; no tracing layer unless asked; no timeout layer: traffic.timeout below is
# kept by the request guard (routes/response_deadline.py), with no BentoML timer left per request for 600 s.
outer_layers.install(tracing=ARGS.tracing)
RESPONSE_TIMEOUT_S = 600


# Every error on every route in its protocol's shape with a request id; limits, API key and draining first.
install_error_handlers(app, ARGS.retry_after_s, ARGS.max_log_len)
install_openapi(app)
LIFECYCLE = Lifecycle()
FAST_PATH = FastPathTargets()  # filled by the service instance: what the fast path below serves


def _resources() -> dict[str, Any]:
    """BentoML resources from the arguments: GPUs only when asked for, so a plain start serves on CPU."""
    if ARGS.gpus == 0:
        return {}
    return {"gpu": ARGS.gpus, **({"gpu_type": ARGS.gpu_type} if ARGS.gpu_type else {})}


@bentoml.service(
    name="huggingface-service",
    workers=ARGS.workers,
    resources=_resources(),
    traffic={"timeout": RESPONSE_TIMEOUT_S},
    # Per-request access lines cost about a quarter of the server's HTTP throughput on small models.
    logging={"access": {"enabled": ARGS.access_log}},
    # OpenTelemetry's ASGI middleware opens a span for every body message, i.e. every SSE chunk:
    # without an exporter to send them to, that is pure cost, so routes are traced only on request.
    tracing={} if ARGS.tracing else {"excluded_urls": ["/"]},
)
@bentoml.asgi_app(app, path="/")
class HuggingFaceService(TypedApis):  # routes are mounted per instance in __init__
    """Serves one Hugging Face model: typed BentoML endpoints (TypedApis), KServe V1, Open Inference Protocol V2
    and OpenAI routes, and a playground page."""

    if ARGS.bento_model:
        # Declared so that `bentoml build --arg bento_model=TAG` packs the model into the Bento.
        baked_model = bentoml.models.BentoModel(ARGS.bento_model)

    def __init__(self) -> None:
        self.args = ARGS
        apply_torch_threads(ARGS)
        self.timer = Timer(ARGS.model_name, latency_logging=ARGS.enable_latency_logging)
        self.generation: GenerationBackend | None = None
        # An encoder model with backend=vllm: vLLM's pooling engine serves /openai, our runtime the rest.
        self.vllm_pooling: VLLMPoolingEngine | None = None
        self.runtime: PredictiveRuntime | GenerativeRuntime
        if SOURCE.task.is_generative:
            self.generation = build_generation_backend(SOURCE, ARGS)
            self.runtime = GenerativeRuntime(self.generation, ARGS, SOURCE)  # started in the event loop below
        else:
            if ARGS.backend == "vllm":
                self.vllm_pooling = VLLMPoolingEngine(SOURCE, ARGS)  # started in the event loop below
            self.runtime = PredictiveRuntime(ARGS, SOURCE, requests_in_flight=lambda: LIFECYCLE.in_flight)
            self.runtime.start_loading()
        self.grpc_server: Any = None
        # Several workers share the port: each says ready only once all have loaded (engines/worker_readiness.py).
        self.worker_readiness = WorkerReadiness(ARGS.workers)
        self._marking: asyncio.Task[None] | None = None
        self.server_name, self.server_version = SERVER_NAME, SERVER_VERSION
        # Routers close over this instance: no per-request dependency has to find the service (BentoML's
        # class views resolve one in a thread pool for every request, a measurable share of a small request).
        # On the vLLM backend /openai is vLLM's own OpenAI layer on the same engine (tokenize included); else ours.
        # The fallback router answers unknown paths in their protocol's shape, so it comes last.
        if vllm_serves_openai(self):
            openai_layer: tuple[Any, ...] = (vllm_openai_routes,)
            FAST_PATH.openai = vllm_openai_routes.VLLMOpenAIApp(self)
        else:
            openai_layer = (openai_routes, tokenize_routes)
        FAST_PATH.kserve = self
        routers = (kserve_routes, *openai_layer, rerank_routes, tei_routes, playground_routes, fallback_routes)
        for build_router in (module.build_router for module in routers):
            app.include_router(build_router(self))
        FAST_PATH.direct = direct_routes(app.routes)

    @bentoml.on_startup
    async def _start(self) -> None:
        """The generation engine and the gRPC service (KServe's port 8081) live in this worker's event loop."""
        if isinstance(self.runtime, GenerativeRuntime):
            self.runtime.start_loading()
        if self.vllm_pooling is not None:
            self.vllm_pooling.start_loading()
        self._marking = asyncio.create_task(self._mark_when_loaded())
        if self.args.max_asyncio_workers is not None:
            executor = concurrent.futures.ThreadPoolExecutor(self.args.max_asyncio_workers, "asyncio-worker")
            asyncio.get_running_loop().set_default_executor(executor)
        LIFECYCLE.drain_on_sigterm(self.args.shutdown_grace_s)
        if self.args.grpc_port is not None and self.args.enable_grpc:
            self.grpc_server = await v2_grpc.start_grpc_server(
                self.runtime,
                self.args.grpc_port,
                server_name=SERVER_NAME,
                server_version=SERVER_VERSION,
                timer=self.timer,
                max_send_message_length=self.args.grpc_max_send_message_length,
                # KServe's flag, within the body limit every protocol shares.
                max_receive_message_length=min(self.args.grpc_max_receive_message_length, self.args.max_request_bytes),
                api_key=self.args.api_key.get_secret_value() if self.args.api_key else None,
                retry_after_s=self.args.retry_after_s,
                lifecycle=LIFECYCLE,  # draining refuses new calls; the drain waits for calls in flight
                on_cancelled=lambda method: CANCELLED.labels(route=method).inc(),
            )

    async def _mark_when_loaded(self) -> None:
        while not self._loaded():
            await asyncio.sleep(0.1)
        self.worker_readiness.mark_loaded()

    @bentoml.on_shutdown
    async def _stop(self) -> None:
        self.worker_readiness.unmark()
        if self._marking is not None:
            self._marking.cancel()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=5)
        if isinstance(self.runtime, GenerativeRuntime):
            await self.runtime.stop()
        if self.vllm_pooling is not None:
            await self.vllm_pooling.stop()

    def _loaded(self) -> bool:
        return self.runtime.ready and (self.vllm_pooling is None or self.vllm_pooling.ready)

    def __is_ready__(self) -> bool:
        return self._loaded() and not LIFECYCLE.draining and self.worker_readiness.all_loaded()


# The guard wraps BentoML's outer app, so the typed @bentoml.api endpoints and the mounted routes alike pass
# through the API key, the body limit and the drain (BentoML's health and metrics routes stay open); inside the
# FastAPI app a second guard only turns a route's bug into a protocol-shaped 500 (or does it all when the app is
# served alone).
_GUARD_OPTIONS: dict[str, Any] = {
    "api_key": ARGS.api_key.get_secret_value() if ARGS.api_key else None,
    "max_request_bytes": ARGS.max_request_bytes,
    "retry_after_s": ARGS.retry_after_s,
    "max_log_len": ARGS.max_log_len,
    "state": LIFECYCLE,
    "response_timeout_s": RESPONSE_TIMEOUT_S,
}
app.add_middleware(RequestGuard, **_GUARD_OPTIONS)
HuggingFaceService.add_asgi_middleware(RequestGuard, **_GUARD_OPTIONS)
# Inside the guard: KServe inference, and /openai/* on the vLLM backend, go straight to their handlers
# (routes/fast_path.py says why).
HuggingFaceService.add_asgi_middleware(
    FastPath, targets=FAST_PATH, retry_after_s=ARGS.retry_after_s, max_log_len=ARGS.max_log_len
)
install_bentoml_openapi(HuggingFaceService)  # /docs: the models our routes name, in BentoML's document too
