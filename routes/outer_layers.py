"""BentoML's request metrics and tracing layers, at a fraction of their cost per request.

BentoML wraps every request in its traffic metrics (`RunnerTrafficMetricsMiddleware`) and OpenTelemetry's ASGI
middleware. In a worker serving vLLM's app, timed at each layer's entry (c=1, 240 streamed requests), the
metrics took 38 µs of every request before it reached the next layer, and the tracing layer 31 µs with tracing
off: five `labels()` lookups, a `receive` wrapper for WebSocket counts, and a URL built from the headers only to
be matched against an exclusion of every route. Our whole stack in front of vLLM's app took 145 µs against 7 µs
for the app served bare, and at 32 streams that CPU is the streams' (README, "Generation on vLLM").

- `CachedTrafficMetrics` records the same series with the same labels (the GPU autoscaler reads
  `bentoml_service_request_in_progress`), but looks each label set up once, and leaves `receive` alone on HTTP.
- `without_tracing` stands in for OpenTelemetry's middleware when tracing is off: BentoML's stack is built
  without the layer, where it would have skipped every route (`tracing={"excluded_urls": ["/"]}`).

`install()` puts them where BentoML's app factory imports its layers from when a worker builds the app; call it
before that (service.py does at import), as routes/response_deadline.py does for the timeout.
"""

from __future__ import annotations

from timeit import default_timer
from typing import Any

from bentoml._internal.context import server_context
from bentoml._internal.server.http import instruments
from opentelemetry.instrumentation import asgi as otel_asgi

Scope = dict[str, Any]
Message = dict[str, Any]

# Label sets looked up once each; a client asking for many random paths gets uncached lookups past this many
# (BentoML labels requests by their raw path, so each such path is a series of its own either way).
MAX_CACHED_ENDPOINTS = 512


class CachedTrafficMetrics(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's traffic metrics for HTTP requests, each label set looked up once (WebSocket, lifespan and
    /metrics take BentoML's own path)."""

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(app, **options)
        self._skipped = tuple(self.skip_paths)
        self._per_endpoint: dict[str, Any] = {}  # endpoint -> its in-progress gauge child
        self._per_result: dict[tuple[str, int], tuple[Any, Any]] = {}  # (endpoint, status) -> (counter, histogram)
        self._last_request: Any = None

    def _service_labels(self) -> dict[str, str]:
        return {
            "service_name": server_context.bento_name,
            "service_version": server_context.bento_version,
            "runner_name": server_context.service_name,
        }

    def _in_progress(self, endpoint: str) -> Any:
        gauge = self._per_endpoint.get(endpoint)
        if gauge is None:
            gauge = self.metrics_request_in_progress.labels(endpoint=endpoint, **self._service_labels())
            if len(self._per_endpoint) < MAX_CACHED_ENDPOINTS:
                self._per_endpoint[endpoint] = gauge
        return gauge

    def _result(self, endpoint: str, status: int) -> tuple[Any, Any]:
        children = self._per_result.get((endpoint, status))
        if children is None:
            labels = {"endpoint": endpoint, "http_response_code": status, **self._service_labels()}
            children = (self.metrics_request_total.labels(**labels), self.metrics_request_duration.labels(**labels))
            if len(self._per_result) < MAX_CACHED_ENDPOINTS:
                self._per_result[(endpoint, status)] = children
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
                total, duration = self._result(endpoint, status)
                total.inc()
                duration.observe(max(default_timer() - start_time, 0))
            await send(message)

        in_progress = self._in_progress(endpoint)
        in_progress.inc()
        try:
            await self.app(scope, receive, recorded_send)
        finally:
            in_progress.dec()


def without_tracing(app: Any, **_options: Any) -> Any:
    """OpenTelemetry's middleware when tracing is off: no layer at all (Starlette builds each layer by calling
    its class with the inner app; this returns the inner app)."""
    return app


def install(*, tracing: bool) -> None:
    """Make BentoML build its stack with CachedTrafficMetrics, and without the tracing layer unless `tracing`
    (BentoML's app factory imports both names from these modules when a worker builds the app)."""
    instruments.RunnerTrafficMetricsMiddleware = CachedTrafficMetrics  # type: ignore[misc]
    if not tracing:
        otel_asgi.OpenTelemetryMiddleware = without_tracing  # type: ignore[assignment,misc]
