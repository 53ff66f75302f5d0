"""The hot routes served past the ASGI layers they do not need, under `bentoml serve`.

A middleware just inside the request guard (`add_asgi_middleware`) hands two kinds of request straight to their
handler, past BentoML's context and CORS layers, its router's scan of every route, and FastAPI's middleware stack,
router and request handling:

- `/openai` and `/openai/*` on the vLLM backend, to vLLM's own app (routes/vllm_openai.py). Those layers gave it
  nothing it lacks (its routes abort a request whose client leaves, answer their own errors and add their own
  CORS headers), and cost 0.7-0.9 ms of the API process's CPU per streamed request (a probe); at 32 concurrent
  streams on 2 cores, TTFT was 1.22-1.38x vLLM's own server before this path (README, "Generation on vLLM").
- KServe V1 `POST /v1/models/{name}:predict` and Open Inference Protocol `POST /v2/models/{name}[/versions/{v}]/infer`,
  to the same functions the FastAPI routes call (routes/kserve.py), wrapped in the same cancellation on
  disconnect, with errors in the same KServe shape. On a small encoder the event loop's CPU per request fell
  from 0.60-0.66 to 0.36-0.37 ms, which the forward passes use instead: classifier, 32 clients, 2 cores,
  305-306 against 276-289 requests/s (README, "Encoders side by side").
- TEI's `POST /embed`, `/predict` and `/rerank`, `POST /` (where huggingface_hub's InferenceClient posts), and ours
  for OpenAI's `POST /openai/v1/embeddings` (DIRECT_POST_PATHS), to the FastAPI route's own endpoint (DirectRoute):
  called with the request and or the JSON body parsed by the endpoint's one pydantic parameter as FastAPI parses
  it. A body that does not parse goes on to the FastAPI route, replayed, so a validation error reads exactly as it
  always has; only valid requests take the short way.

What stays around every request: BentoML's concurrency limit, traffic metrics, tracing and access log when on,
and the request guard (id, API key, body limit, draining, response deadline, last-resort 500). The FastAPI
routes stay too: they serve the same requests when the app runs alone (tests/service_app.py), and document them
in the OpenAPI schema. Any other method or path goes on unchanged, so a GET on `:predict` is answered as before.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from fastapi._compat import ModelField
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handlers.errors import ServingError
from routes.cancellation import CLIENT_CLOSED_REQUEST, CancelOnDisconnect
from routes.common import OPENAI_PREFIX, ServedModel
from routes.errors import error_responder, request_id_of
from routes.kserve import answer_v1_predict, answer_v2_infer

Answer = Callable[[ServedModel, str, Request], Awaitable[Response]]

_OPENAI_UNDER = OPENAI_PREFIX + "/"
_V1_MODELS, _V1_PREDICT = "/v1/models/", ":predict"
_V2_MODELS, _V2_INFER = "/v2/models/", "/infer"
# The FastAPI routes' templates, the cancellation counter's label (a versioned V2 path counts as the plain one).
V1_PREDICT_ROUTE = "/v1/models/{name}:predict"
V2_INFER_ROUTE = "/v2/models/{name}/infer"
# POST routes served by their endpoint directly (on the vLLM backend /openai/* is vLLM's app, served above).
DIRECT_POST_PATHS = ("/", "/embed", "/predict", "/rerank", OPENAI_PREFIX + "/v1/embeddings")


def kserve_inference(method: str, path: str) -> tuple[str, str] | None:
    """(route template, model name) of a V1 predict or V2 infer request, matched as the FastAPI routes match
    (a name is one path segment); None for any other request."""
    if method != "POST":
        return None
    if path.startswith(_V1_MODELS) and path.endswith(_V1_PREDICT):
        name = path[len(_V1_MODELS) : -len(_V1_PREDICT)]
        return (V1_PREDICT_ROUTE, name) if name and "/" not in name else None
    if path.startswith(_V2_MODELS) and path.endswith(_V2_INFER):
        parts = path[len(_V2_MODELS) : -len(_V2_INFER)].split("/")
        named = len(parts) == 1 or (len(parts) == 3 and parts[1] == "versions" and parts[2])
        return (V2_INFER_ROUTE, parts[0]) if parts[0] and named else None
    return None


class FastPathTargets:
    """What the fast path serves, set by the service instance once it has built them (the middleware is
    declared with the service class, before any instance exists)."""

    def __init__(self) -> None:
        self.openai: ASGIApp | None = None  # vLLM's app (routes.vllm_openai.VLLMOpenAIApp) on the vLLM backend
        self.kserve: ServedModel | None = None
        self.direct: dict[str, DirectRoute] = {}  # by path: direct_routes() of the service's FastAPI app


def _is_json(content_type: str | None, strict: bool) -> bool:
    """FastAPI's rule for reading a body as JSON: application/json or application/*+json, or no content type
    when the route's `strict_content_type` is off."""
    if not content_type:
        return not strict
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` with the body, already read, given once more first."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class DirectRoute:
    """A FastAPI POST route's endpoint, called without FastAPI, with what it takes: the request, and or the JSON
    body validated by its one body parameter's own field (`ModelField.validate`, what FastAPI's handler calls).
    A body that is not JSON or not valid goes to `fallback` (the FastAPI route), replayed. Raises ValueError
    for an endpoint with any other input (path, query or header parameters, dependencies, several bodies) or
    that is not a coroutine function."""

    def __init__(self, route: APIRoute) -> None:
        dependant = route.dependant
        other_inputs = (dependant.path_params, dependant.query_params, dependant.header_params, dependant.cookie_params)
        other_names = (dependant.response_param_name, dependant.background_tasks_param_name)
        bodies = dependant.body_params
        embedded = any(getattr(body.field_info, "embed", False) for body in bodies)
        takes_request = dependant.request_param_name is not None
        if any(other_inputs) or any(other_names) or dependant.dependencies or len(bodies) > 1 or embedded:
            raise ValueError(f"POST {route.path}: a direct route takes the request and or one JSON body, no more")
        if not (bodies or takes_request):
            raise ValueError(f"POST {route.path}: a direct route takes the request and or one JSON body, not nothing")
        if not inspect.iscoroutinefunction(route.endpoint):  # FastAPI runs a plain function on its thread pool
            raise ValueError(f"POST {route.path}: a direct route's endpoint is a coroutine function")
        self.path = route.path
        self.endpoint: Callable[..., Awaitable[Any]] = route.endpoint
        self.request_param = dependant.request_param_name
        self.body_field: ModelField | None = bodies[0] if bodies else None  # validates as the FastAPI route does
        strict = route.strict_content_type
        self.strict_content_type = bool(strict.value if isinstance(strict, DefaultPlaceholder) else strict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, fallback: ASGIApp) -> None:
        request = Request(scope, receive)
        arguments: dict[str, Any] = {} if self.request_param is None else {self.request_param: request}
        try:
            if self.body_field is not None:
                body = await request.body()  # kept by the request, for an endpoint that reads it again
                parsed, refused = self._parse(request.headers.get("content-type"), body)
                if refused:
                    await fallback(scope, _replaying(body, receive), send)
                    return
                arguments[self.body_field.name] = parsed
            response = await self.endpoint(**arguments)
        except ClientDisconnect:  # left while its body was being read: nobody reads an answer
            response = Response(status_code=CLIENT_CLOSED_REQUEST)
        if not isinstance(response, Response):
            raise TypeError(f"POST {self.path}: a direct route's endpoint returns a Response, not {type(response)}")
        await response(scope, receive, send)

    def _parse(self, content_type: str | None, body: bytes) -> tuple[Any, bool]:
        """(the body as the endpoint's parameter, whether FastAPI would refuse it)."""
        assert self.body_field is not None
        if not _is_json(content_type, self.strict_content_type):
            return None, True
        try:
            decoded = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None, True
        parsed, errors = self.body_field.validate(decoded)
        return parsed, bool(errors)


def direct_routes(routes: Iterable[Any], paths: Iterable[str] = DIRECT_POST_PATHS) -> dict[str, DirectRoute]:
    """The DirectRoutes of `paths` among an app's routes (those it has: each depends on the backend and task)."""
    wanted = set(paths)
    return {
        route.path: DirectRoute(route)
        for route in routes
        if isinstance(route, APIRoute) and route.path in wanted and route.methods == {"POST"}
    }


class KServeInference:
    """V1 predict or V2 infer as an ASGI app, over the FastAPI routes' own functions."""

    def __init__(self, targets: FastPathTargets, answer: Answer, route: str) -> None:
        self.targets = targets
        self.answer = answer
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        served, name = self.targets.kserve, scope["path_params"]["name"]
        assert served is not None
        request = Request(scope, receive)
        try:
            response = await self.answer(served, name, request)
        except ClientDisconnect:  # left while its body was being read: nobody reads an answer
            response = Response(status_code=CLIENT_CLOSED_REQUEST)
        await response(scope, receive, send)


class FastPath:
    """ASGI middleware (`add_asgi_middleware`, inside RequestGuard); see the module's docstring."""

    def __init__(self, app: ASGIApp, *, targets: FastPathTargets, retry_after_s: int, max_log_len: int | None) -> None:
        self.app = app
        self.targets = targets
        self.respond_error = error_responder(retry_after_s, max_log_len)
        self.kserve: dict[str, ASGIApp] = {
            route: CancelOnDisconnect(KServeInference(targets, answer, route), route=route)
            for route, answer in ((V1_PREDICT_ROUTE, answer_v1_predict), (V2_INFER_ROUTE, answer_v2_infer))
        }
        self.direct: dict[DirectRoute, ASGIApp] = {}  # built on first use: targets are set after this middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = self._target(scope) if scope["type"] == "http" else None
        if target is None:
            await self.app(scope, receive, send)
            return
        try:
            await target(scope, receive, send)
        except ServingError as error:  # raised before anything was sent: a route's errors come before its answer
            path = scope["path"]
            response = self.respond_error(scope["method"], path, error, request_id_of(scope), None)
            await response(scope, receive, send)

    def _target(self, scope: Scope) -> ASGIApp | None:
        path: str = scope["path"]
        if self.targets.openai is not None and (path == OPENAI_PREFIX or path.startswith(_OPENAI_UNDER)):
            return self.targets.openai
        direct = self.targets.direct.get(path) if scope["method"] == "POST" else None
        if direct is not None:
            app = self.direct.get(direct)
            if app is None:
                serve = functools.partial(direct, fallback=self.app)
                app = self.direct[direct] = CancelOnDisconnect(serve, route=path)
            return app
        if self.targets.kserve is None:
            return None
        matched = kserve_inference(scope["method"], path)
        if matched is None:
            return None
        route, name = matched
        scope["path_params"] = {"name": name}
        return self.kserve[route]
