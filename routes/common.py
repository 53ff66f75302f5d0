"""What every router shares: the served model it routes to, body reading and JSON responses, stage timing."""

from __future__ import annotations

import contextvars
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import bentoml
import orjson
from fastapi import Request
from fastapi.responses import Response

from handlers.errors import InvalidInput, ModelNotFound, PayloadTooLarge, UnsupportedMediaType
from handlers.requests import TaskResult, TextInput

if TYPE_CHECKING:
    from engines.encoder_runtime import PredictiveRuntime
    from engines.generation.backend import GenerationBackend
    from protocols.kserve_generation import GenerativeRuntime
    from settings.arguments import ServerArguments

OPENAI_PREFIX = "/openai"
_T = TypeVar("_T")

# Content types a body may carry. curl's -d default (form-urlencoded) is accepted as KServe does.
_JSON_TYPES = {"", "application/json", "application/x-www-form-urlencoded", "text/plain"}

# KServe's metric names and label, so existing dashboards keep working.
_STAGE_SECONDS = {
    stage: bentoml.metrics.Histogram(
        name=f"request_{stage}_seconds",
        documentation=f"Time spent in the {stage} stage of a request",
        labelnames=["model_name"],
    )
    for stage in ("preprocess", "predict", "postprocess")
}


# Stage durations of the current request (each request runs in its own task, with its own context).
_REQUEST_STAGES: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("stages", default=None)
latency_logger = logging.getLogger("hf_bentoml_server.latency")


class Timer:
    """Observes one stage's duration in KServe's per-model histograms; with latency logging, also logs one
    line per request once its postprocess stage ends (KServe's enable_latency_logging)."""

    def __init__(self, model_name: str, latency_logging: bool = False) -> None:
        self.model_name = model_name
        self.latency_logging = latency_logging
        self._stage_seconds: dict[str, Any] = {}  # each stage's labelled child, looked up once

    async def run(self, stage: str, work: Callable[[], Awaitable[_T]]) -> _T:
        started = time.perf_counter()
        try:
            return await work()
        finally:
            self.observe(stage, started)

    def observe(self, stage: str, started: float) -> None:
        seconds = time.perf_counter() - started
        child = self._stage_seconds.get(stage)
        if child is None:
            child = self._stage_seconds[stage] = _STAGE_SECONDS[stage].labels(model_name=self.model_name)
        child.observe(seconds)
        if not self.latency_logging:
            return
        stages = _REQUEST_STAGES.get()
        if stages is None or stage == "preprocess":  # a new request in this context
            stages = {}
            _REQUEST_STAGES.set(stages)
        stages[stage] = seconds
        if stage == "postprocess":
            latency_logger.info(
                "model=%s preprocess_ms=%.3f predict_ms=%.3f postprocess_ms=%.3f",
                self.model_name,
                *(1000 * stages.get(name, 0.0) for name in ("preprocess", "predict", "postprocess")),
            )


class ServedModel(Protocol):
    """What routes see of the service: its arguments, the model's runtime and the stage timer."""

    args: ServerArguments
    runtime: PredictiveRuntime | GenerativeRuntime
    generation: GenerationBackend | None
    timer: Timer
    server_name: str
    server_version: str


def vllm_serves_openai(served: ServedModel) -> bool:
    """Whether /openai/* is vLLM's own app (routes/vllm_openai.py): a generative model on the vLLM backend, or an
    encoder model with its vLLM pooling engine. Then no router of ours may claim an /openai path."""
    return getattr(served.generation, "name", None) == "vllm" or getattr(served, "vllm_pooling", None) is not None


def check_model_name(served: ServedModel, name: str | None) -> None:
    if name is not None and name != served.args.model_name:
        raise ModelNotFound(name)


async def predict(served: ServedModel, texts: list[TextInput], options: Any) -> TaskResult:
    return await served.timer.run("predict", lambda: served.runtime.predict(texts, options))


def predictive_runtime(served: ServedModel, needs: str) -> PredictiveRuntime:
    """The encoder runtime, or a 400 saying what the route needs when the model is generative."""
    if served.generation is not None:
        raise InvalidInput(f"model '{served.args.model_name}' serves {served.runtime.source.task.value}; {needs}")
    return served.runtime  # type: ignore[return-value]


def json_response(body: Any, status_code: int = 200) -> Response:
    """orjson: several times faster than the standard library on embedding-sized float lists."""
    return Response(orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS), status_code, media_type="application/json")


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_json(request: Request) -> None:
    kind = content_type(request)
    if kind not in _JSON_TYPES and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type '{kind}' is not supported here; send application/json")


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body (tritonclient's request_compression_algorithm), decompressed incrementally:
    past `limit` bytes (max_decompressed_bytes) it stops with a 413, so a small bomb cannot fill memory."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding '{encoding}' is not supported; use gzip, deflate or none")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    parts: list[bytes] = []
    size = 0
    remaining = body
    try:
        while remaining:  # gzip allows several members one after another
            inflater = zlib.decompressobj(wbits)
            chunk = inflater.decompress(remaining, limit - size + 1)
            while True:
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the {encoding} body decompresses to over max_decompressed_bytes={limit}")
                parts.append(chunk)
                if not inflater.unconsumed_tail:
                    break
                chunk = inflater.decompress(inflater.unconsumed_tail, limit - size + 1)
            if not inflater.eof:
                raise InvalidInput(f"the body is not valid {encoding} data: it ends early")
            remaining = inflater.unused_data if encoding == "gzip" else b""
    except zlib.error as error:
        raise InvalidInput(f"the body is not valid {encoding} data: {error}") from None
    return b"".join(parts)


def json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"the body is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput("the body must be a JSON object")
    return parsed
