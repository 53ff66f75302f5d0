"""Graceful stop on SIGTERM: requests in flight finish, new ones get 503, then the server exits normally.

BentoML's `bentoml serve` forwards SIGTERM to its worker, where uvicorn stops accepting at once while the
arbiter keeps the listening socket open, so a request arriving during the stop hangs in the backlog until
the process is gone. Instead, the worker keeps answering: new requests (readiness included) get a 503 with
Retry-After, so a load balancer moves them elsewhere, while the requests in flight finish. When none is
left, or after `shutdown_grace_s`, uvicorn's own shutdown runs (on_shutdown hooks, exit code 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

logger = logging.getLogger("hf_bentoml_server")


class Lifecycle:
    """What the request guard reads and counts: `draining` and the requests `in_flight`."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def drain_on_sigterm(self, grace_s: float) -> None:
        """Take over SIGTERM from uvicorn (call from the worker's running event loop, main thread)."""
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):  # not under uvicorn (e.g. a test app): leave the default alone
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if self.draining:  # a second SIGTERM: stop now
                previous(signum, frame)
                return
            self.draining = True
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(previous, signum, grace_s)))

        signal.signal(signal.SIGTERM, on_sigterm)

    async def _drain(self, stop: object, signum: int, grace_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        logger.info(
            "SIGTERM: draining %d request(s) in flight for up to %.0f s; new requests get 503", self.in_flight, grace_s
        )
        while self.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning("shutdown grace period over with %d request(s) still in flight", self.in_flight)
        assert callable(stop)
        stop(signum, None)
