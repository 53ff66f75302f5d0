"""One error shape per protocol on every route, with the request's id: KServe's `{"error": "..."}` on V1/V2
and the root, OpenAI's `{"error": {message, type, param, code}}` under /openai. The exception handlers here
turn ServingErrors, FastAPI's request validation errors and Starlette's 404/405 into those shapes; the
request guard (routes/guard.py) answers unexpected exceptions the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from handlers.errors import InvalidInput, ServingError
from protocols.errors import kserve_error_body, openai_error_body, tei_error_body
from routes.common import OPENAI_PREFIX, json_response
from routes.tei import TEI_PATHS

logger = logging.getLogger("hf_bentoml_server")

REQUEST_ID_HEADER = "x-request-id"
# Statuses a client should retry later, and so carry Retry-After.
_RETRYABLE = {429, 503}
_HTTP_ERRORS: dict[int, type[ServingError]] = {}
ErrorResponder = Callable[[str, str, ServingError, str, "dict[str, str] | None"], Response]


def request_id_of(scope: dict[str, Any]) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


def body_with_request_id(body: bytes, request_id: str) -> bytes:
    """A JSON object body with `request_id` added; any other body, or one with a `request_id` already, is
    returned as it is (the same object)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if not isinstance(parsed, dict) or "request_id" in parsed:
        return body
    return json.dumps({**parsed, "request_id": request_id}).encode()


def error_body(path: str, error: ServingError, request_id: str) -> dict[str, Any]:
    """The error in the shape of the protocol `path` belongs to: OpenAI (and the Cohere/Jina rerank route,
    whose clients read OpenAI's shape), TEI/TGI, else KServe V1/V2."""
    if path.startswith(OPENAI_PREFIX) or path == "/v1/rerank":
        body = openai_error_body(error)
    elif path in TEI_PATHS:
        body = tei_error_body(error)
    else:
        body = kserve_error_body(error)
    body["request_id"] = request_id
    return body


def error_headers(error: ServingError, retry_after_s: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    if error.status_code in _RETRYABLE:
        headers["retry-after"] = str(retry_after_s)
    if error.status_code == 401:
        headers["www-authenticate"] = "Bearer"
    return headers


def error_response(
    path: str, error: ServingError, request_id: str, retry_after_s: int, headers: dict[str, str] | None = None
) -> Response:
    response = json_response(error_body(path, error, request_id), status_code=error.status_code)
    response.headers.update(error_headers(error, retry_after_s, headers))
    return response


def clip(text: str, limit: int | None) -> str:
    """At most `limit` characters of a client-influenced text for the log (500 when no max_log_len is set)."""
    limit = 500 if limit is None else limit
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _http_error(status_code: int, message: str) -> ServingError:
    """A ServingError with the status of a Starlette HTTPException (404 route, 405 method, ...)."""
    kind = _HTTP_ERRORS.get(status_code)
    if kind is None:
        error_type = "not_found_error" if status_code == 404 else "invalid_request_error"
        if status_code >= 500:
            error_type = "server_error"
        kind = type(f"HTTPError{status_code}", (ServingError,), {"status_code": status_code, "error_type": error_type})
        _HTTP_ERRORS[status_code] = kind
    return kind(message)


def error_responder(retry_after_s: int, max_log_len: int | None) -> ErrorResponder:
    """`(method, path, error, request_id, headers)` -> the error's response, a server error (5xx) logged first."""

    def respond(
        method: str, path: str, error: ServingError, request_id: str, headers: dict[str, str] | None = None
    ) -> Response:
        if error.status_code >= 500:
            message = clip(error.message, max_log_len)
            logger.warning("%s %s -> %d [%s]: %s", method, path, error.status_code, request_id, message)
        return error_response(path, error, request_id, retry_after_s, headers)

    return respond


def install_error_handlers(app: FastAPI, retry_after_s: int, max_log_len: int | None) -> None:
    """Register the handlers that render every error in its protocol's shape."""
    logged_error_response = error_responder(retry_after_s, max_log_len)

    def render(request: Request, error: ServingError, headers: dict[str, str] | None = None) -> Response:
        request_id = request_id_of(request.scope)
        return logged_error_response(request.method, request.url.path, error, request_id, headers)

    async def serving_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServingError)
        return render(request, error)

    async def validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()))
            problems.append(f"{where}: {item.get('msg', 'invalid')}" if where else str(item.get("msg", "invalid")))
        return render(request, InvalidInput(f"invalid request: {'; '.join(problems)}"))

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 404:
            message = f"no route {request.url.path}"
        elif error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return render(request, _http_error(error.status_code, message), dict(error.headers or {}))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
