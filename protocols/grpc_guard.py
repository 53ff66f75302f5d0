"""The gRPC side of the request lifecycle (routes/guard.py and routes/cancellation.py are the HTTP side).

Two server interceptors. The lifecycle's, run before the API key's:
- while the server drains (SIGTERM, routes/lifecycle.py), a new call is refused with UNAVAILABLE, a message
  and `retry-after` metadata, so a client or balancer retries on another replica; liveness stays open;
- calls being answered count in the lifecycle's `in_flight`, so the drain waits for them as for HTTP requests;
- a call its client cancelled (or whose deadline passed) is reported to `on_cancelled`: grpc.aio cancels the
  handler's task then, and the cancellation reaches what it awaits (the batcher skips the request, generation
  aborts its rows).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc

# Open while draining: a live process that is stopping is still live (HTTP's guard refuses even liveness, but
# a gRPC liveness probe that fails would get the pod killed before its calls in flight finish).
DRAIN_OPEN_METHODS = frozenset({"ServerLive"})
# Open without the API key: liveness and readiness, as the REST health routes.
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})

_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


class LifecycleState(Protocol):
    """What routes.lifecycle.Lifecycle offers: `draining` turns True on SIGTERM; `in_flight` counts calls."""

    draining: bool
    in_flight: int


class LifecycleInterceptor(grpc.aio.ServerInterceptor):
    """Refuses new calls while draining, counts calls in flight, reports calls their clients cancelled."""

    def __init__(
        self,
        state: LifecycleState | None,
        *,
        retry_after_s: int = 1,
        on_cancelled: Callable[[str], None] | None = None,
    ) -> None:
        self.state = state
        self.retry_after_s = retry_after_s
        self.on_cancelled = on_cancelled

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        kind, factory = next((kind, factory) for kind, factory in _KINDS if getattr(handler, kind) is not None)
        behaviour = getattr(handler, kind)
        draining = self.state is not None and self.state.draining
        if draining and method.rsplit("/", 1)[-1] not in DRAIN_OPEN_METHODS:
            wrapped = self._refuse_streaming if kind.endswith("_stream") else self._refuse
        elif kind.endswith("_stream"):
            wrapped = self._track_streaming(behaviour, method)
        else:
            wrapped = self._track(behaviour, method)
        return factory(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )

    async def _refuse(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down; retry on another replica",
            (("retry-after", str(self.retry_after_s)),),
        )

    async def _refuse_streaming(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await self._refuse(request, context)
        yield  # pragma: no cover - abort raises; this makes the method an async generator

    def _track(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def tracked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                return await behaviour(request, context)
            except asyncio.CancelledError:
                self._cancelled(context, method)
                raise
            finally:
                self._leave()

        return tracked

    def _track_streaming(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def tracked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            self._enter()
            try:
                async for response in behaviour(request, context):
                    yield response
            except asyncio.CancelledError:
                self._cancelled(context, method)
                raise
            finally:
                self._leave()

        return tracked

    def _enter(self) -> None:
        if self.state is not None:
            self.state.in_flight += 1

    def _leave(self) -> None:
        if self.state is not None:
            self.state.in_flight -= 1

    def _cancelled(self, context: grpc.aio.ServicerContext, method: str) -> None:
        # The client's cancellation or deadline (context.cancelled() is not yet True when the handler hears of
        # it), or rarely the server's stop past its grace period, which cuts calls as well.
        if self.on_cancelled is not None:
            self.on_cancelled(method)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <key>` metadata on every method but liveness and readiness (constant-time)."""

    def __init__(self, api_key: str) -> None:
        self.expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.rsplit("/", 1)[-1] in OPEN_METHODS:
            return handler
        given = next((value for key, value in details.invocation_metadata or () if key == "authorization"), "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self.expected):
            return handler
        message = "the API key is not valid" if given else "this server needs 'authorization: Bearer <key>' metadata"

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        make = next(factory for kind, factory in _KINDS if getattr(handler, kind) is not None)
        return make(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
