"""The request lifecycle every HTTP route passes through, as one pure ASGI middleware.

In order, for each request: a request id (the client's `X-Request-ID` when it is short and plain, else a
new one), echoed in the `x-request-id` response header and in every error body; 503 while the server
stops; the API key (`Authorization: Bearer <key>`, compared in constant time) on every route but health,
readiness and docs; the body size, from Content-Length before any byte is read and counted as a chunked
body streams in; the response deadline (a 504 when no response starts in time, routes/response_deadline.py).
An exception no handler knew is logged once with its traceback and answered with a 500 in the protocol's
shape, and never reaches uvicorn, so the keep-alive connection stays usable.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware, which runs every request through an
extra task and memory streams (a large share of a small request's cost) and buffers streamed responses.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import re
import traceback
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from handlers.errors import (
    InvalidInput,
    NotReady,
    PayloadTooLarge,
    ResponseTimeout,
    ServingError,
    Unauthorized,
)
from routes.common import json_response
from routes.errors import REQUEST_ID_HEADER, body_with_request_id, clip, error_body, error_headers
from routes.response_deadline import ResponseDeadline

logger = logging.getLogger("hf_bentoml_server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._~:+=/-]{1,128}")
_REQUEST_ID_NAME = REQUEST_ID_HEADER.encode()


def request_id_source() -> Callable[[], bytes]:
    """New request ids: 32 hex digits, a random prefix per process and a counter. Unique across workers and
    replicas like uuid4's, without its `os.urandom` per request, which drops the GIL on the event loop and
    waits to get it back behind the forward lanes (a py-spy probe, classifier at 32 clients: ~4% of the loop's
    samples)."""
    prefix = uuid.uuid4().hex[:16]
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter) & 0xFFFFFFFFFFFFFFFF:016x}".encode()


new_request_id = request_id_source()

# GET routes open without the API key: liveness, readiness (whole server and per model), metrics, the API docs
# and the pages (BentoML's index and schema, the playground page; its calls to the model need the key).
_OPEN_PATHS = frozenset(
    {"/", "/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
    | {"/livez", "/readyz", "/healthz", "/metrics", "/schema.json", "/docs.json", "/playground"}
)
_OPEN_PATTERNS = re.compile(
    r"/v2/models/[^/]+(/versions/[^/]+)?/ready|/v1/models/[^/:]+|/static_content/.+|/playground/[\w.]+\.(js|css)"
)


def is_open_route(method: str, path: str) -> bool:
    """Whether a route answers without the API key: GET health, readiness and docs only."""
    if method not in ("GET", "HEAD"):
        return False
    return path in _OPEN_PATHS or _OPEN_PATTERNS.fullmatch(path) is not None


def headers_with_id(start: Message, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """A response start's headers with the request id; a 413 also closes the connection, since the rest of its
    body was never read."""
    headers = [*start.get("headers", ()), (_REQUEST_ID_NAME, request_id)]
    if start["status"] == 413:
        headers.append((b"connection", b"close"))
    return headers


def _is_json(start: Message) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in start.get("headers", ()))


def with_request_id(send: Send, request_id: bytes) -> Send:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = headers_with_id(message, request_id)
        await send(message)

    return send_with_id


class RequestGuard:
    """Request id, API key, body limit, draining and the last-resort 500, for every HTTP request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_request_bytes: int,
        retry_after_s: int,
        max_log_len: int | None,
        state: Any = None,
        response_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_request_bytes = max_request_bytes
        self.retry_after_s = retry_after_s
        self.max_log_len = max_log_len
        self.response_timeout_s = response_timeout_s  # BentoML's traffic.timeout, kept here (response_deadline.py)
        # routes.lifecycle.Lifecycle: `draining` turns True on SIGTERM; `in_flight` counts requests being answered.
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        known = scope.get("state", {}).get("request_id")
        if known is not None:  # the guard around BentoML's outer app checked this request already
            await self._answer_bugs(scope, receive, send, known)
            return
        request_id = b""
        content_length = b""
        authorization = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name == b"content-length":
                content_length = value
            elif name == b"authorization":
                authorization = value
        if not _REQUEST_ID.fullmatch(request_id):
            request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id.decode()
        refusal = self._refusal(scope, content_length, authorization)
        if refusal is not None:
            await self._answer(scope, with_request_id(send, request_id), refusal)
            return
        limit, received = self.max_request_bytes, 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"the request body is over max_request_bytes={limit} bytes")
            return message

        state = self.state
        if state is not None:
            state.in_flight += 1
        try:
            await self._answer_bugs(scope, counted_receive, send, request_id.decode(), id_header=request_id)
        finally:
            if state is not None:
                state.in_flight -= 1

    async def _answer_bugs(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, id_header: bytes | None = None
    ) -> None:
        """Run the app; a bug is logged once and answered in the protocol's shape, keeping the connection.
        With `id_header` (the outer guard), also: the request id in the response's header, and in its body when
        it is a JSON error without one (vLLM's own errors under /openai; error bodies are small, so one is held
        whole); and the response deadline, a 504 when no response starts within `response_timeout_s`. One
        wrapper of `send` does it all, since every streamed message passes through it."""
        started = False
        held: Message | None = None  # an error's start, until its body has the request id
        chunks: list[bytes] = []
        deadline = ResponseDeadline(self.response_timeout_s if id_header is not None else None)

        async def tracked_send(message: Message) -> None:
            nonlocal started, held
            kind = message["type"]
            if held is not None and kind == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    started = True
                    await self._send_with_id_in_body(send, held, b"".join(chunks), request_id)
                return
            if kind == "http.response.start":
                if id_header is not None:
                    deadline.lift()
                    message["headers"] = headers_with_id(message, id_header)
                    if message["status"] >= 400 and _is_json(message):
                        held = message
                        chunks.clear()  # from an error that broke off, if the last-resort 500 follows it
                        return
                started = True
            await send(message)

        try:
            async with deadline:
                await self.app(scope, receive, tracked_send)
        except Exception as error:
            self._log_exception(scope, error)
            if not started:
                failure = ServingError(
                    f"internal server error; the server log has the details under request id {request_id}"
                )
                await self._answer(scope, tracked_send, failure)
            return
        if deadline.expired and not started:  # also when the handler swallowed its cancellation
            logger.warning(
                "%s %s [%s]: no response within %s s; answered 504",
                scope["method"],
                clip(scope["path"], 200),
                request_id,
                deadline.seconds,
            )
            message = f"the response did not start within {deadline.seconds:g} seconds (the server's timeout)"
            await self._answer(scope, tracked_send, ResponseTimeout(message))

    @staticmethod
    async def _send_with_id_in_body(send: Send, start: Message, body: bytes, request_id: str) -> None:
        """A held error, its body given the request id; a body left as it was (not a JSON object, an id already
        in it, a HEAD answer's empty body) keeps its start, Content-Length included."""
        with_id = body_with_request_id(body, request_id)
        if with_id is not body:
            headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
            start = {**start, "headers": [*headers, (b"content-length", str(len(with_id)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": with_id})

    def _refusal(self, scope: Scope, content_length: bytes, authorization: bytes) -> ServingError | None:
        if self.state is not None and getattr(self.state, "draining", False):
            return NotReady("the server is shutting down; retry on another replica")
        if self.expected is not None and not is_open_route(scope["method"], scope["path"]):
            if not authorization:
                return Unauthorized("this server needs an API key: send the header 'Authorization: Bearer <key>'")
            if not hmac.compare_digest(authorization, self.expected):
                return Unauthorized("the API key is not valid")
        if content_length:
            try:
                length = int(content_length)
            except ValueError:
                return InvalidInput("the Content-Length header is not a number")
            if length > self.max_request_bytes:
                return PayloadTooLarge(
                    f"the request body of {length} bytes is over max_request_bytes={self.max_request_bytes}"
                )
        return None

    async def _answer(self, scope: Scope, send: Send, error: ServingError) -> None:
        path = scope["path"]
        body = error_body(path, error, scope["state"]["request_id"])
        response = json_response(body, status_code=error.status_code)
        response.headers.update(error_headers(error, self.retry_after_s))

        async def no_body() -> Message:  # the answer never reads the request
            return {"type": "http.disconnect"}

        await response(scope, no_body, send)

    def _log_exception(self, scope: Scope, error: Exception) -> None:
        """The traceback, once; each part clipped to max_log_len, since an exception may quote the input."""
        parts = traceback.format_exception(type(error), error, error.__traceback__)
        limit = max(self.max_log_len or 0, 2000)
        logger.error(
            "%s %s [%s] failed:\n%s",
            scope["method"],
            clip(scope["path"], 200),
            scope["state"]["request_id"],
            "".join(clip(part, limit) for part in parts),
        )
