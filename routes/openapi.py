"""What the OpenAPI document says of routes that read their body themselves.

The V1/V2/OpenAI routes parse their raw body (V2 may be binary or gzip, and re-validating through FastAPI
would cost on the hot path), so FastAPI cannot see their request model. `request_body(Model)` names it in
the route's `openapi_extra`, `errors(kind)` lists the error answers in the protocol's shape, and
`install_openapi(app)` adds the named models to the document's components. Response models are declared
with `response_model=`; routes that return a ready `Response` are not re-validated by FastAPI.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from protocols.errors import KServeErrorBody, OpenAIErrorBody

_REF = "#/components/schemas/{model}"
_BODY_MODELS: dict[str, type[BaseModel]] = {}

# Every status a model route may answer with besides 200, and why.
_ERRORS = {
    400: "Malformed request: the message names the field",
    401: "Missing or wrong API key (when api_key is set)",
    404: "Unknown model",
    413: "Over a size limit: body (max_request_bytes, max_decompressed_bytes), inputs per request "
    "(max_client_batch_size) or characters per input (max_input_characters)",
    415: "Unsupported Content-Type or Content-Encoding",
    429: "Queue full (max_queue_size); retry after Retry-After seconds",
    500: "Unexpected server error; the log has the traceback under the request id",
    503: "Model loading or failed to load, engine down, or server stopping; Retry-After given",
}


def request_body(model: type[BaseModel], *media_types: str) -> dict[str, Any]:
    """openapi_extra declaring `model` as the JSON request body (and `media_types` as opaque alternatives)."""
    _BODY_MODELS[model.__name__] = model
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}
    for media_type in media_types:
        content[media_type] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def errors(kind: str, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status (all when none given) with the protocol's error body."""
    model = OpenAIErrorBody if kind == "openai" else KServeErrorBody
    return {status: {"model": model, "description": _ERRORS[status]} for status in statuses or _ERRORS}


def install_openapi(app: FastAPI) -> None:
    """Generate the document once, with the request-body models in components and no 422 (this server
    answers validation errors with 400 in the protocol's shape)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = document.setdefault("components", {}).setdefault("schemas", {})
        _, schemas = models_json_schema([(model, "validation") for model in _BODY_MODELS.values()], ref_template=_REF)
        components.update(schemas.get("$defs", {}))
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
