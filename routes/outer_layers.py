"""BentoML's outer layers: its request metrics and tracing at a fraction of their cost per request, and its
timeout layer left out (the request guard keeps the deadline, routes/response_deadline.py).

BentoML wraps every request in its traffic metrics (`RunnerTrafficMetricsMiddleware`) and OpenTelemetry's ASGI
middleware. In a worker serving vLLM's app, timed at each layer's entry (c=1, 240 streamed requests), the
metrics took 38 µs of every request before it reached the next layer, and the tracing layer 31 µs with tracing
off: five `labels()` lookups, a `receive` wrapper for WebSocket counts, and a URL built from the headers only to
be matched against an exclusion of every route. Our whole stack in front of vLLM's app took 145 µs against 7 µs
for the app served bare, and at 32 streams that CPU is the streams' (README, "Generation on vLLM").

- `CachedTrafficMetrics` records the same series with the same labels (the GPU autoscaler reads
  `bentoml_service_request_in_progress`), but looks each label set up once, and leaves `receive` alone on HTTP.
  One change: BentoML labels a request by its raw path, so a client asking for random paths made a new series
  per path in every worker's metric files and in /metrics, without bound. Here a path gets its own `endpoint`
  label once a route has answered it with success (a status under 400: refusals such as 401 and 413 come
  before any route, and a 404 from none), up to MAX_ENDPOINTS paths; every other request is labelled
  `endpoint="other"`.
- `no_layer` stands in for OpenTelemetry's middleware when tracing is off, where it would have skipped every
  route (`tracing={"excluded_urls": ["/"]}`), and for BentoML's `TimeoutMiddleware` always.

`install()` puts them where BentoML's app factory imports its layers from when a worker builds the app; call it
before that (service.py does at import).
"""

from __future__ import annotations

from timeit import default_timer
from typing import Any

from bentoml._internal.context import server_context
from bentoml._internal.server.http import instruments, traffic
from opentelemetry.instrumentation import asgi as otel_asgi

Scope = dict[str, Any]
Message = dict[str, Any]

# Paths with an `endpoint` label of their own, at most; the rest share OTHER_ENDPOINT.
MAX_ENDPOINTS = 256
OTHER_ENDPOINT = "other"


class CachedTrafficMetrics(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's traffic metrics for HTTP requests, each label set looked up once, and a bounded set of
    `endpoint` labels (WebSocket, lifespan and /metrics take BentoML's own path)."""

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(app, **options)
        self._skipped = tuple(self.skip_paths)
        self._routes: set[str] = set()  # paths a route has answered: their own `endpoint` label
        self._in_progress: dict[str, Any] = {}  # endpoint label -> its gauge child
        self._results: dict[tuple[str, int], tuple[Any, Any]] = {}  # (endpoint, status) -> (counter, histogram)
        self._last_request: Any = None

    def _service_labels(self) -> dict[str, str]:
        return {
            "service_name": server_context.bento_name,
            "service_version": server_context.bento_version,
            "runner_name": server_context.service_name,
        }

    def _gauge(self, endpoint: str) -> Any:
        gauge = self._in_progress.get(endpoint)
        if gauge is None:
            labels = {"endpoint": endpoint, **self._service_labels()}
            gauge = self._in_progress[endpoint] = self.metrics_request_in_progress.labels(**labels)
        return gauge

    def _answered(self, path: str, status: int) -> tuple[Any, Any]:
        """The counter and histogram of an answer; a path a route answered with success takes a label of its own."""
        if path not in self._routes and status < 400 and len(self._routes) < MAX_ENDPOINTS:
            self._routes.add(path)
        endpoint = path if path in self._routes else OTHER_ENDPOINT
        children = self._results.get((endpoint, status))
        if children is None:
            labels = {"endpoint": endpoint, "http_response_code": status, **self._service_labels()}
            children = (self.metrics_request_total.labels(**labels), self.metrics_request_duration.labels(**labels))
            self._results[endpoint, status] = children
        return children

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await super().__call__(scope, receive, send)
            return
        if not self._is_setup:
            self._setup()
        endpoint: str = scope["path"]
        if not endpoint.startswith(self._skipped):
            if self._last_request is None:
                self._last_request = self.metrics_last_request_timestamp.labels(**self._service_labels())
            self._last_request.set_to_current_time()
        start_time = default_timer()
        status = 0

        async def recorded_send(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body" and not message.get("more_body", False):
                total, duration = self._answered(endpoint, status)
                total.inc()
                duration.observe(max(default_timer() - start_time, 0))
            await send(message)

        in_progress = self._gauge(endpoint if endpoint in self._routes else OTHER_ENDPOINT)
        in_progress.inc()
        try:
            await self.app(scope, receive, recorded_send)
        finally:
            in_progress.dec()


def no_layer(app: Any, **_options: Any) -> Any:
    """A layer left out: Starlette builds each layer by calling its class with the inner app and the layer's
    options; this returns the inner app."""
    return app


def install(*, tracing: bool) -> None:
    """Make BentoML build its stack with CachedTrafficMetrics, without its timeout layer (the request guard
    keeps the deadline), and without the tracing layer unless `tracing` (BentoML's app factories look these
    names up in these modules when a worker builds the app)."""
    instruments.RunnerTrafficMetricsMiddleware = CachedTrafficMetrics  # type: ignore[misc]
    traffic.TimeoutMiddleware = no_layer  # type: ignore[misc,assignment]
    if not tracing:
        otel_asgi.OpenTelemetryMiddleware = no_layer  # type: ignore[assignment,misc]
