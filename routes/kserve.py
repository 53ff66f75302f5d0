"""KServe's root liveness, V1 (`:predict`) and Open Inference Protocol V2 REST routes."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from handlers.requests import PredictOptions
from protocols import v1, v2, v2_binary
from routes.common import (
    ServedModel,
    check_model_name,
    content_type,
    decompress,
    json_response,
    predict,
    require_json,
)
from routes.openapi import errors, request_body
from routes.playground import bentoml_index
from settings.tasks import Task


def build_router(served: ServedModel) -> APIRouter:
    router = APIRouter()
    args = served.args

    @router.get("/", response_model=v1.RootResponse, responses={200: {"content": {"text/html": {}}}})
    async def root(request: Request) -> dict[str, str] | FileResponse:
        """KServe's liveness answer, {"status": "alive"}; a browser (Accept: text/html) gets BentoML's index."""
        if "text/html" in request.headers.get("accept", ""):
            return bentoml_index()
        return {"status": "alive"}

    # --- V1 ---

    @router.get("/v1/models", response_model=v1.V1ModelsResponse, responses=errors("kserve", 401))
    async def v1_models() -> dict[str, Any]:
        return v1.models_response([args.model_name])

    @router.get("/v1/models/{name}", response_model=v1.V1ModelStatus, responses=errors("kserve", 404, 503))
    async def v1_model_status(name: str) -> Response:
        check_model_name(served, name)
        if not served.runtime.ready:
            raise served.runtime.not_ready_error()
        return json_response(v1.model_status_response(name, True))

    @router.post(
        "/v1/models/{name}:predict",
        response_model=v1.V1PredictResponse,
        responses=errors("kserve"),
        openapi_extra=request_body(v1.V1PredictRequest),
    )
    async def v1_predict(name: str, request: Request) -> Response:
        return await answer_v1_predict(served, name, request)

    # --- Open Inference Protocol (V2) ---

    @router.get("/v2", response_model=v2.ServerMetadataResponse, responses=errors("kserve", 401))
    async def v2_server_metadata() -> dict[str, Any]:
        return v2.server_metadata(served.server_name, served.server_version)

    @router.get("/v2/health/live", response_model=v2.LiveResponse)
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready", response_model=v2.ReadyResponse, responses={503: {"model": v2.ReadyResponse}})
    async def v2_ready() -> Response:
        ready = served.runtime.ready
        return json_response({"ready": ready}, status_code=200 if ready else 503)

    metadata = {"response_model": v2.ModelMetadataResponse, "responses": errors("kserve", 401, 404)}

    @router.get("/v2/models/{name}", **metadata)
    @router.get("/v2/models/{name}/versions/{model_version}", **metadata)
    async def v2_model_metadata(name: str, model_version: str | None = None) -> dict[str, Any]:
        check_model_name(served, name)
        handler = served.runtime.handler
        options = PredictOptions.merge(args, None)
        return v2.model_metadata(name, "huggingface", handler.input_specs(), handler.output_specs(options))

    ready = {
        "response_model": v2.ModelReadyResponse,
        "responses": {**errors("kserve", 404), 503: {"model": v2.ModelReadyResponse}},
    }

    @router.get("/v2/models/{name}/ready", **ready)
    @router.get("/v2/models/{name}/versions/{model_version}/ready", **ready)
    async def v2_model_ready(name: str, model_version: str | None = None) -> Response:
        check_model_name(served, name)
        ready = served.runtime.ready
        return json_response({"name": name, "ready": ready}, status_code=200 if ready else 503)

    infer = {
        "response_model": v2.InferenceResponse,
        "responses": {200: {"content": {v2_binary.CONTENT_TYPE: {}}}, **errors("kserve")},
        "openapi_extra": request_body(v2.InferenceRequest, v2_binary.CONTENT_TYPE),
    }

    @router.post("/v2/models/{name}/infer", **infer)
    @router.post("/v2/models/{name}/versions/{model_version}/infer", **infer)
    async def v2_infer(name: str, request: Request, model_version: str | None = None) -> Response:
        return await answer_v2_infer(served, name, request)

    return router


# The two inference routes' work, apart from FastAPI: the routes above call them, and so does the fast path under
# `bentoml serve` (routes/fast_path.py), with the same Starlette request.


async def answer_v1_predict(served: ServedModel, name: str, request: Request) -> Response:
    """KServe V1 `:predict`: {"instances": [...]} in, {"predictions": [...]} out."""
    check_model_name(served, name)
    require_json(request)
    started = time.perf_counter()
    texts, request_options = v1.parse_predict_request(await request.body())
    options = served.runtime.options_for(request_options)
    served.timer.observe("preprocess", started)
    result = await predict(served, texts, options)
    started = time.perf_counter()
    response = json_response(v1.predict_response(result))
    served.timer.observe("postprocess", started)
    return response


async def answer_v2_infer(served: ServedModel, name: str, request: Request) -> Response:
    """Open Inference Protocol `infer`, JSON or binary tensors (the model version in the path is not checked)."""
    check_model_name(served, name)
    kind = content_type(request)
    header_length = request.headers.get(v2_binary.HEADER_LENGTH)
    if kind != v2_binary.CONTENT_TYPE and header_length is None:
        require_json(request)
    started = time.perf_counter()
    body = decompress(
        await request.body(), request.headers.get("content-encoding", ""), served.args.max_decompressed_bytes
    )
    parsed = v2.parse_infer_request(body, kind, header_length)
    options = served.runtime.options_for(parsed.options)
    specs = served.runtime.handler.output_specs(options)
    v2.select_outputs(specs, parsed.requested_outputs)  # unknown output names fail before the model runs
    served.timer.observe("preprocess", started)
    inputs: list[Any] = parsed.text_pairs() if served.runtime.source.task == Task.rerank else parsed.texts
    result = await predict(served, inputs, options)
    started = time.perf_counter()
    body, media_type, header_length = v2.infer_response(name, parsed, result, specs)
    headers = {v2_binary.HEADER_LENGTH: str(header_length)} if header_length is not None else None
    served.timer.observe("postprocess", started)
    return Response(body, media_type=media_type, headers=headers)
