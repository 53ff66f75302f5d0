"""BentoML's request metrics and tracing layers as the service installs them (routes/outer_layers.py).

CachedTrafficMetrics is driven over ASGI beside BentoML's own RunnerTrafficMetricsMiddleware, each with the
series BentoML's `_setup` makes on a registry of its own, and must leave the same samples. The service test
checks what BentoML's app factory builds once service.py is imported, with tracing off and on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from routes import outer_layers
from routes.outer_layers import OTHER_ENDPOINT, CachedTrafficMetrics, no_layer

PROJECT_DIR = Path(__file__).resolve().parent.parent
BENTOML_METRICS = CachedTrafficMetrics.__bases__[0]  # BentoML's own, whatever service.py imports replaced


def with_registry(middleware_class: type, app: Any) -> tuple[Any, CollectorRegistry]:
    """The middleware around `app`, its series made by BentoML's own `_setup` on a registry of the test's."""
    registry = CollectorRegistry()
    client = SimpleNamespace(
        **{kind.__name__: functools.partial(kind, registry=registry) for kind in (Counter, Gauge, Histogram, Summary)}
    )
    middleware = middleware_class(app, namespace="test", skip_paths=("/healthz",))
    middleware._setup(metrics_client=client, duration_buckets=(0.5, 5.0))
    return middleware, registry


def answers(registry: CollectorRegistry, label: Any = lambda endpoint: endpoint) -> dict[Any, float]:
    """The answers' counts (total, histogram count and buckets) by name and labels, `endpoint` through `label`."""
    found: dict[Any, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith(("_total", "_count", "_bucket")) and "endpoint" in sample.labels:
                labels = {**sample.labels, "endpoint": label(sample.labels["endpoint"])}
                key = sample.name, tuple(sorted(labels.items()))
                found[key] = found.get(key, 0.0) + sample.value
    return found


def in_progress(registry: CollectorRegistry) -> dict[str, float]:
    return {
        sample.labels["endpoint"]: sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name.endswith("request_in_progress")
    }


def last_request_time(registry: CollectorRegistry) -> float:
    return max(
        (s.value for f in registry.collect() for s in f.samples if s.name.endswith("last_request_timestamp_seconds")),
        default=0.0,
    )


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """200 with one body, a stream of four bodies (/stream...), a 404 (/missing...), a 413 (/refused...), or a
    bug (/bug), by path."""
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/bug":
        raise RuntimeError("route bug")
    status = 404 if path.startswith("/missing") else 413 if path.startswith("/refused") else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    if path.startswith("/stream"):
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
    await send({"type": "http.response.body", "body": b"end"})


async def call(middleware: Any, path: str, kind: str = "http") -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": kind, "path": path, "method": "GET", "headers": []}
    with contextlib.suppress(RuntimeError):  # the route bug, raised through the layer as BentoML's raises it
        await middleware(scope, receive, send)


PATHS = ["/ok", "/stream", "/stream", "/missing", "/bug", "/healthz", "/metrics", "/ok"]


def test_cached_metrics_count_answers_as_bentomls_do_with_unrouted_paths_as_other():
    ours, our_registry = with_registry(CachedTrafficMetrics, app)
    theirs, their_registry = with_registry(BENTOML_METRICS, app)
    for middleware in (ours, theirs):
        asyncio.run(call(middleware, "/", kind="lifespan"))
        for path in PATHS:
            asyncio.run(call(middleware, path))
    routed = {"/ok", "/stream", "/healthz"}  # answered by a route; "/missing" got a 404
    assert answers(our_registry) == answers(their_registry, lambda e: e if e in routed else OTHER_ENDPOINT)
    totals = {
        dict(labels)["endpoint"]: (dict(labels)["http_response_code"], value)
        for (name, labels), value in answers(our_registry).items()
        if name == "test_request_total"
    }
    assert totals == {"/ok": ("200", 2.0), "/stream": ("200", 2.0), "other": ("404", 1.0), "/healthz": ("200", 1.0)}
    # Every request ended, the failed one included; first requests of a path are in progress as "other".
    assert in_progress(our_registry) == {"other": 0.0, "/ok": 0.0, "/stream": 0.0}
    assert last_request_time(our_registry) > 0


def test_random_paths_share_one_label_and_routes_are_bounded(monkeypatch):
    monkeypatch.setattr(outer_layers, "MAX_ENDPOINTS", 3)
    ours, registry = with_registry(CachedTrafficMetrics, app)
    for i in range(50):
        asyncio.run(call(ours, f"/missing/{i}" if i % 2 else f"/refused/{i}"))
    for path in ("/ok", "/ok", "/stream", "/stream/a", "/stream/b", "/stream/c"):
        asyncio.run(call(ours, path))
    endpoints = {dict(labels)["endpoint"] for _, labels in answers(registry)}
    assert endpoints == {"other", "/ok", "/stream", "/stream/a"}  # three routes, then the rest as "other"
    assert set(in_progress(registry)) == {"other", "/ok"}


def test_a_skipped_path_does_not_set_the_last_request_time():
    ours, registry = with_registry(CachedTrafficMetrics, app)
    asyncio.run(call(ours, "/healthz"))
    assert last_request_time(registry) == 0
    asyncio.run(call(ours, "/ok"))
    assert last_request_time(registry) > 0


def test_a_request_counts_as_in_progress_until_it_ends():
    seen: list[dict[str, float]] = []

    async def watched_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(in_progress(registry))
        await app(scope, receive, send)

    ours, registry = with_registry(CachedTrafficMetrics, watched_app)
    asyncio.run(call(ours, "/ok"))  # a path no route has answered yet counts as "other"
    asyncio.run(call(ours, "/ok"))
    assert seen == [{"other": 1.0}, {"other": 0.0, "/ok": 1.0}]
    assert in_progress(registry) == {"other": 0.0, "/ok": 0.0}


def test_no_layer_leaves_no_layer():
    assert BENTOML_METRICS.__name__ == "RunnerTrafficMetricsMiddleware"
    assert no_layer(app, excluded_urls="/", tracer_provider=None) is app


STACK_OF_SERVICE = """
import json, service
app = service.HuggingFaceService.to_asgi(is_main=True)  # what BentoML's worker serves
node, layers = app.build_middleware_stack(), []
while node is not None and type(node).__name__ != "ContextMiddleware":
    layers.append(type(node).__name__)
    node = getattr(node, "app", None)
print(json.dumps(layers))
"""


def service_layers(tiny_models: dict[str, Path], tracing: bool) -> list[str]:
    """The layers in front of BentoML's context middleware, as BentoML builds the service's app (in a process of
    its own: building it sets BentoML's global configuration)."""
    env = {
        **os.environ,
        "HF_SERVE_MODEL_DIR": str(tiny_models["sequence_classification"]),
        "HF_SERVE_TRACING": str(tracing).lower(),
    }
    done = subprocess.run(
        [sys.executable, "-c", STACK_OF_SERVICE], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_service_makes_bentoml_build_cheap_metrics_and_no_tracing_layer(tiny_models):
    layers = service_layers(tiny_models, tracing=False)
    # BentoML's app factory (ServiceAppFactory.middlewares) imports both classes when it builds the app.
    # BentoML's timeout layer is left out too (no_layer): the guard keeps the deadline (routes/response_deadline.py).
    assert layers == ["ServerErrorMiddleware", "CachedTrafficMetrics", "RequestGuard", "FastPath"]


def test_with_tracing_on_bentomls_tracing_layer_stays(tiny_models):
    layers = service_layers(tiny_models, tracing=True)
    assert layers[:3] == ["ServerErrorMiddleware", "CachedTrafficMetrics", "OpenTelemetryMiddleware"], layers
