"""The fast path of routes/fast_path.py: under `bentoml serve`, KServe inference, TEI's /embed, /predict and
/rerank, POST /, OpenAI embeddings and (on the vLLM backend) /openai/* go from the request guard straight to
their handlers; everything else goes on.

Fast and in-process. For KServe and the direct routes the real service is loaded with a tiny classifier or
embedder (tests/service_app.py) and every request is answered both ways, by the fast path (whose fall-through
app fails the test if reached, or, for the direct routes, counts whether it was) and by the FastAPI routes, and
the answers must be the same. For vLLM a small ASGI app stands in for vLLM's; through
the real server that path is driven by tests/test_http_generation.py and tests/test_vllm_openai.py (slow).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi import FastAPI, Request
from pydantic import BaseModel

from handlers.errors import NotReady
from routes.fast_path import (
    DIRECT_POST_PATHS,
    V1_PREDICT_ROUTE,
    V2_INFER_ROUTE,
    DirectRoute,
    FastPath,
    FastPathTargets,
    direct_routes,
    kserve_inference,
)
from routes.guard import RequestGuard
from routes.vllm_openai import VLLMOpenAIApp
from tests.service_app import load_service, stop_service


async def reply(label: str, scope: dict[str, Any], send: Any) -> None:
    body = f"{label} {scope.get('root_path', '')} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


async def vllm_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await reply("vllm", scope, send)


async def bentoml_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await reply("bentoml", scope, send)


def guarded(app: Any, targets: FastPathTargets) -> Any:
    fast_path = FastPath(app, targets=targets, retry_after_s=7, max_log_len=None)
    return RequestGuard(fast_path, api_key=None, max_request_bytes=1 << 20, retry_after_s=7, max_log_len=None)


def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


@pytest.mark.parametrize(
    "method, path, matched",
    [
        ("POST", "/v1/models/sst:predict", (V1_PREDICT_ROUTE, "sst")),
        ("POST", "/v1/models/a:b:predict", (V1_PREDICT_ROUTE, "a:b")),  # as FastAPI's {name} matches it
        ("POST", "/v2/models/sst/infer", (V2_INFER_ROUTE, "sst")),
        ("POST", "/v2/models/sst/versions/3/infer", (V2_INFER_ROUTE, "sst")),
        ("GET", "/v1/models/sst:predict", None),  # the FastAPI app answers it
        ("POST", "/v1/models/:predict", None),
        ("POST", "/v1/models/a/b:predict", None),
        ("POST", "/v2/models//infer", None),
        ("POST", "/v2/models/sst/versions//infer", None),
        ("POST", "/v2/models/sst/other/3/infer", None),
        ("POST", "/v2/models/sst/ready", None),
        ("POST", "/v1/models/sst:explain", None),
    ],
)
def test_kserve_inference_paths_match_as_the_fastapi_routes_do(method, path, matched):
    assert kserve_inference(method, path) == matched


# --- KServe: the fast path answers exactly as the FastAPI routes -----------------------------------------------


@pytest.fixture(scope="module")
def service(tiny_models: dict[str, Path]) -> Iterator[Any]:
    module, instance = load_service({"model_dir": str(tiny_models["sequence_classification"]), "model_name": "sst"})
    yield module
    stop_service(instance)


async def must_not_be_reached(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise AssertionError(f"{scope['method']} {scope['path']} left the fast path")


def binary_infer_body() -> tuple[bytes, int]:
    texts = triton.InferInput("input-0", [2], "BYTES")
    texts.set_data_from_numpy(np.array([b"a good film", b"a bad film"], dtype=np.object_), binary_data=True)
    output = triton.InferRequestedOutput("output-0", binary_data=True)
    return triton.InferenceServerClient.generate_request_body([texts], outputs=[output])


V2_JSON = {"inputs": [{"name": "input-0", "shape": [2], "datatype": "BYTES", "data": ["a good film", "a bad film"]}]}
BINARY_BODY, BINARY_JSON_SIZE = binary_infer_body()
JSON = {"content-type": "application/json"}

REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "v1": ("/v1/models/sst:predict", {"json": {"instances": ["a good film", "a bad film"]}}),
    "v1 probabilities": (
        "/v1/models/sst:predict",
        {"json": {"instances": ["a good film"], "parameters": {"return_probabilities": True}}},
    ),
    "v1 unknown model": ("/v1/models/other:predict", {"json": {"instances": ["a"]}}),
    "v1 not JSON": ("/v1/models/sst:predict", {"content": b"{not json", "headers": JSON}),
    "v1 no instances": ("/v1/models/sst:predict", {"json": {"inputs": 3}}),
    "v1 wrong content type": ("/v1/models/sst:predict", {"content": b"x", "headers": {"content-type": "image/png"}}),
    "v2": ("/v2/models/sst/infer", {"json": V2_JSON}),
    "v2 versioned": ("/v2/models/sst/versions/1/infer", {"json": V2_JSON}),
    "v2 gzip": (
        "/v2/models/sst/infer",
        {"content": gzip.compress(json.dumps(V2_JSON).encode()), "headers": {**JSON, "content-encoding": "gzip"}},
    ),
    "v2 binary": (
        "/v2/models/sst/infer",
        {"content": BINARY_BODY, "headers": {"inference-header-content-length": str(BINARY_JSON_SIZE)}},
    ),
    "v2 unknown output": ("/v2/models/sst/infer", {"json": {**V2_JSON, "outputs": [{"name": "nope"}]}}),
    "v2 unknown model": ("/v2/models/other/infer", {"json": V2_JSON}),
}


def assert_same_answer(fast: httpx.Response, routed: httpx.Response) -> None:
    assert fast.status_code == routed.status_code
    for header in ("content-type", "inference-header-content-length", "retry-after"):
        assert fast.headers.get(header) == routed.headers.get(header)
    if fast.headers["content-type"] == "application/json":
        fast_body, routed_body = fast.json(), routed.json()
        if fast.status_code >= 400:  # an error body names the request's id, which differs between the two
            assert fast_body.pop("request_id") == fast.headers["x-request-id"]
            assert routed_body.pop("request_id") == routed.headers["x-request-id"]
        assert fast_body == routed_body
    else:
        assert fast.content == routed.content


@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_kserve_inference_answers_as_the_fastapi_routes(service, case):
    path, kwargs = REQUESTS[case]
    targets = FastPathTargets()
    targets.kserve = service.FAST_PATH.kserve  # the instance load_service started
    fast = call(guarded(must_not_be_reached, targets), "POST", path, **kwargs)
    routed = call(service.app, "POST", path, **kwargs)
    assert_same_answer(fast, routed)
    if case == "v1":
        assert fast.status_code == 200 and len(fast.json()["predictions"]) == 2


def test_other_kserve_requests_go_on(service):
    targets = FastPathTargets()
    targets.kserve = service.FAST_PATH.kserve
    answer = call(guarded(service.app, targets), "GET", "/v1/models/sst:predict")
    routed = call(service.app, "GET", "/v1/models/sst:predict")
    assert answer.status_code == routed.status_code >= 400 and answer.json()["error"] == routed.json()["error"]
    assert call(guarded(bentoml_app, targets), "GET", "/v2/models/sst").text == "bentoml  /v2/models/sst"


# --- TEI and OpenAI embeddings: the FastAPI route's own endpoint, without FastAPI -----------------------------


@pytest.fixture(scope="module")
def embedder(tiny_models: dict[str, Path]) -> Iterator[Any]:
    module, instance = load_service({"model_dir": str(tiny_models["sentence_transformers"]), "model_name": "emb"})
    yield module
    stop_service(instance)


TEXT = {"content-type": "text/plain"}
# case: (service fixture, path, request, outcome): "answered" (200) or "refused" (an error) by the fast path, or
# "fastapi" for a body that does not parse, which the FastAPI route answers
DIRECT_REQUESTS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "embed": ("embedder", "/embed", {"json": {"inputs": ["a good film", "a bad film"]}}, "answered"),
    "embed one, not normalized": ("embedder", "/embed", {"json": {"inputs": "a film", "normalize": False}}, "answered"),
    "embed, no content type": ("embedder", "/embed", {"content": b'{"inputs": "a film"}'}, "fastapi"),  # strict
    "embed, JSON with a charset": (
        "embedder",
        "/embed",
        {"content": b'{"inputs": "a"}', "headers": {"content-type": "application/json; charset=utf-8"}},
        "answered",
    ),
    "embed, unknown prompt": ("embedder", "/embed", {"json": {"inputs": "a", "prompt_name": "nope"}}, "refused"),
    "embed, inputs not text": ("embedder", "/embed", {"json": {"inputs": 3}}, "fastapi"),
    "embed, not JSON": ("embedder", "/embed", {"content": b"{not json", "headers": JSON}, "fastapi"),
    "embed, text/plain": ("embedder", "/embed", {"content": b'{"inputs": "a"}', "headers": TEXT}, "fastapi"),
    "embed, empty body": ("embedder", "/embed", {"content": b""}, "fastapi"),
    "embed, on a classifier": ("service", "/embed", {"json": {"inputs": "a film"}}, "refused"),
    "predict": ("service", "/predict", {"json": {"inputs": "a good film"}}, "answered"),
    "predict, raw scores, two": (
        "service",
        "/predict",
        {"json": {"inputs": ["a", "b"], "raw_scores": True}},
        "answered",
    ),
    "predict, on an embedder": ("embedder", "/predict", {"json": {"inputs": "a film"}}, "refused"),
    "rerank, on an embedder": ("embedder", "/rerank", {"json": {"query": "q", "texts": ["a"]}}, "refused"),
    "rerank, no texts": ("embedder", "/rerank", {"json": {"query": "q", "texts": []}}, "refused"),
    "root, embed": ("embedder", "/", {"json": {"inputs": ["a", "b"]}}, "answered"),
    "root, classify": ("service", "/", {"json": {"inputs": "a good film"}}, "answered"),
    "root, pipeline shape": (
        "service",
        "/",
        {"json": {"inputs": "a good film", "parameters": {"top_k": 1}}},
        "answered",
    ),
    "root, no inputs": ("embedder", "/", {"json": {"texts": ["a"]}}, "fastapi"),
    "openai embeddings": (
        "embedder",
        "/openai/v1/embeddings",
        {"json": {"input": ["a", "b"], "model": "emb"}},
        "answered",
    ),
    "openai, unknown model": ("embedder", "/openai/v1/embeddings", {"json": {"input": "a", "model": "x"}}, "refused"),
    "openai, not JSON": ("embedder", "/openai/v1/embeddings", {"content": b"{x", "headers": JSON}, "refused"),
    "openai, text/csv": (
        "embedder",
        "/openai/v1/embeddings",
        {"content": b"a", "headers": {"content-type": "text/csv"}},
        "refused",
    ),
    "openai, on a classifier": ("service", "/openai/v1/embeddings", {"json": {"input": "a"}}, "refused"),
}


class Counted:
    """An ASGI app that counts the requests it is given."""

    def __init__(self, app: Any) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        await self.app(scope, receive, send)


@pytest.mark.parametrize("case", sorted(DIRECT_REQUESTS))
def test_direct_routes_answer_as_the_fastapi_routes(request, case):
    fixture, path, kwargs, outcome = DIRECT_REQUESTS[case]
    module = request.getfixturevalue(fixture)
    targets = FastPathTargets()
    targets.direct = module.FAST_PATH.direct
    rest = Counted(module.app)
    fast = call(guarded(rest, targets), "POST", path, **kwargs)
    routed = call(module.app, "POST", path, **kwargs)
    assert_same_answer(fast, routed)
    assert rest.calls == int(outcome == "fastapi")
    if outcome == "answered":
        assert fast.status_code == 200
    elif outcome == "refused":
        assert fast.status_code >= 400


def test_the_service_serves_every_direct_path_it_has(embedder, service):
    assert sorted(embedder.FAST_PATH.direct) == sorted(DIRECT_POST_PATHS)
    assert sorted(service.FAST_PATH.direct) == sorted(DIRECT_POST_PATHS)


def test_other_methods_and_paths_go_on(embedder):
    targets = FastPathTargets()
    targets.direct = embedder.FAST_PATH.direct
    rest = Counted(embedder.app)
    assert call(guarded(rest, targets), "GET", "/embed").status_code == 405
    assert call(guarded(rest, targets), "POST", "/embed_all", json={"inputs": "a"}).status_code == 200
    assert rest.calls == 2


class Body(BaseModel):
    text: str


def test_a_direct_route_takes_only_a_body_or_the_request():
    app = FastAPI()

    @app.post("/body")
    async def body(item: Body) -> None: ...

    @app.post("/with-query")
    async def with_query(item: Body, limit: int = 3) -> None: ...

    @app.post("/two-bodies")
    async def two_bodies(first: Body, second: Body) -> None: ...

    @app.post("/nothing")
    async def nothing() -> None: ...

    @app.post("/sync")
    def sync(item: Body) -> None: ...

    @app.post("/body-and-request")
    async def body_and_request(item: Body, request: Request) -> None: ...

    routes = {route.path: route for route in app.routes}
    body_field = DirectRoute(routes["/body"]).body_field
    assert body_field is not None and body_field.name == "item"
    both = DirectRoute(routes["/body-and-request"])
    assert both.body_field is not None and (both.body_field.name, both.request_param) == ("item", "request")
    for path in ("/with-query", "/two-bodies", "/nothing", "/sync"):
        with pytest.raises(ValueError, match=path):
            DirectRoute(routes[path])
    assert list(direct_routes(app.routes, ["/body", "/elsewhere"])) == ["/body"]


# --- vLLM: /openai/* straight to vLLM's app ---------------------------------------------------------------------


def served(ready: bool) -> Any:
    runtime = SimpleNamespace(ready=ready, not_ready_error=lambda: NotReady("the model is still loading"))
    return SimpleNamespace(runtime=runtime, generation=SimpleNamespace(openai_app=vllm_app))


def vllm_targets(ready: bool = True) -> FastPathTargets:
    targets = FastPathTargets()
    targets.openai = VLLMOpenAIApp(served(ready))
    return targets


@pytest.mark.parametrize(
    "path, served_by",
    [
        ("/openai/v1/completions", "vllm /openai /openai/v1/completions"),
        ("/openai", "vllm /openai /openai"),
        ("/openaiish/v1/completions", "bentoml  /openaiish/v1/completions"),  # not under the prefix
        ("/v1/models/llama:predict", "bentoml  /v1/models/llama:predict"),  # no KServe target set
    ],
)
def test_openai_paths_go_straight_to_vllms_app(path, served_by):
    answer = call(guarded(bentoml_app, vllm_targets()), "POST", path, json={"prompt": "x"})
    assert answer.status_code == 200 and answer.text == served_by
    assert answer.headers["x-request-id"]  # the guard still runs first


def test_every_path_goes_on_without_vllm():
    answer = call(guarded(bentoml_app, FastPathTargets()), "POST", "/openai/v1/completions", json={"prompt": "x"})
    assert answer.text == "bentoml  /openai/v1/completions"


def test_before_the_engine_is_up_the_answer_is_an_openai_shaped_503():
    answer = call(guarded(bentoml_app, vllm_targets(ready=False)), "GET", "/openai/v1/models")
    assert answer.status_code == 503 and answer.headers["retry-after"] == "7"
    body = answer.json()
    assert body["error"]["message"] == "the model is still loading"
    assert body["request_id"] == answer.headers["x-request-id"]
