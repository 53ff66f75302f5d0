"""What the OpenAPI document says of routes that read their body themselves.

The V1/V2/OpenAI routes parse their raw body (V2 may be binary or gzip, and re-validating through FastAPI
would cost on the hot path), so FastAPI cannot see their request model. `request_body(Model)` names it in
the route's `openapi_extra`, `errors(kind)` lists the error answers in the protocol's shape, and
`install_openapi(app)` adds the named models to the document's components. Response models are declared
with `response_model=`; routes that return a ready `Response` are not re-validated by FastAPI.
`event_stream(Model)` documents a streamed 200 (`text/event-stream`, one `data:` event per `Model`).
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
_STREAM_MODELS: dict[str, type[BaseModel]] = {}
# FastAPI's 422 models: this server answers validation errors with 400 in the protocol's shape.
_UNUSED = ("HTTPValidationError", "ValidationError")

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


def event_stream(model: type[BaseModel], description: str = "") -> dict[int | str, dict[str, Any]]:
    """`responses=` entry for a 200 that may also be server-sent events (`stream: true`), each `data:` event
    one `model` as JSON and the last `data: [DONE]`. OpenAPI has no schema for an event stream's frames, so
    the event's model is given beside the text schema (`x-sse-event`) and in the document's components."""
    _STREAM_MODELS[model.__name__] = model
    event = {"$ref": _REF.format(model=model.__name__)}
    text = {"type": "string", "description": f"`data: <{model.__name__} JSON>` events, then `data: [DONE]`"}
    stream = {"schema": text, "x-sse-event": event}
    return {200: {"description": description or "The answer", "content": {"text/event-stream": stream}}}


def errors(kind: str, *statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status (all when none given) with the protocol's error body."""
    model = OpenAIErrorBody if kind == "openai" else KServeErrorBody
    return {status: {"model": model, "description": _ERRORS[status]} for status in statuses or _ERRORS}


def _named_schemas() -> dict[str, Any]:
    """JSON schemas of the models named by request_body() and event_stream(), with the models they use."""
    wanted = [(model, "validation") for model in _BODY_MODELS.values()]
    wanted += [(model, "serialization") for model in _STREAM_MODELS.values()]
    _, schemas = models_json_schema(wanted, ref_template=_REF)  # type: ignore[arg-type]
    return dict(schemas.get("$defs", {}))


def install_openapi(app: FastAPI) -> None:
    """Generate the document once, with the request-body models in components and no 422 (this server
    answers validation errors with 400 in the protocol's shape)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = document.setdefault("components", {}).setdefault("schemas", {})
        components.update(_named_schemas())
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for unused in _UNUSED:
            components.pop(unused, None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def install_bentoml_openapi(service: Any) -> None:
    """The same for BentoML's document (/docs.json, what /docs shows): BentoML merges the mounted routes
    through FastAPI's `get_openapi`, not `app.openapi()`, so the models named here would be dangling
    references there and every route would list FastAPI's 422. The service object gets a subclass whose
    `openapi_spec` completes BentoML's (the only hook: BentoML builds the spec in that property)."""
    base = type(service)

    class DocumentedService(base):  # type: ignore[misc, valid-type]
        __slots__ = ()  # BentoML's Service is a slotted attrs class: the same layout, so __class__ can change

        @property
        def openapi_spec(self) -> Any:
            spec = base.openapi_spec.fget(self)  # type: ignore[attr-defined]
            components = spec.components  # BentoML keeps the merged components as a plain dict
            if isinstance(components, dict):
                schemas = components.setdefault("schemas", {})
                schemas.update(_named_schemas())
                for unused in _UNUSED:
                    schemas.pop(unused, None)
            for item in spec.paths.values():
                for method in ("get", "put", "post", "delete", "options", "head", "patch", "trace"):
                    operation = item.get(method) if isinstance(item, dict) else getattr(item, method, None)
                    responses = operation.get("responses") if isinstance(operation, dict) else None
                    responses = getattr(operation, "responses", responses)
                    if isinstance(responses, dict):
                        responses.pop("422", None)
            return spec

    DocumentedService.__name__ = DocumentedService.__qualname__ = base.__name__
    service.__class__ = DocumentedService
