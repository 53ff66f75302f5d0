"""The request guard's own CPU cost per request, in-process: a trivial ASGI app called directly, and the
same app behind routes.guard.RequestGuard (without and with an API key, and with the response deadline it keeps,
routes/response_deadline.py). CPU time, best of 5 rounds, so the figure holds on a busy
machine where HTTP benchmarks are too noisy to see a few microseconds. With `--chunks N` the app streams its
answer in N body messages (as an SSE stream of N tokens does), so each layer's per-message share shows too.

    .venv/bin/python -m benchmarks.guard_overhead [--requests 20000] [--chunks 0]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from benchmarks.charts import bar_chart, chart_path
from benchmarks.report import print_table, write_results
from routes.guard import RequestGuard
from routes.lifecycle import Lifecycle

HEADERS = [
    (b"host", b"localhost:3000"),
    (b"user-agent", b"python-httpx/0.28"),
    (b"accept", b"*/*"),
    (b"content-type", b"application/json"),
    (b"content-length", b"20"),
    (b"authorization", b"Bearer " + b"k" * 32),
]


def plain_app(chunks: int) -> Any:
    """A trivial ASGI app answering `{}`, or with `chunks` > 0 that many `data: x` messages and an empty last one."""

    async def plain(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        for _ in range(chunks):
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"" if chunks else b"{}"})

    return plain


async def cpu_us_per_request(app: Any, requests: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"instances": ["a"]}', "more_body": False}

    async def send(message: Any) -> None:
        return None

    started = time.process_time()
    for _ in range(requests):
        scope = {"type": "http", "method": "POST", "path": "/v1/models/m:predict", "headers": HEADERS}
        await app(scope, receive, send)
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--chunks", type=int, default=0, help="body messages per answer (0: one body)")
    options = parser.parse_args()
    plain = plain_app(options.chunks)
    common = {"max_request_bytes": 4 << 20, "retry_after_s": 1, "max_log_len": None, "state": Lifecycle()}
    apps = {
        "no guard": plain,
        "guard": RequestGuard(plain, api_key=None, **common),
        "guard + API key": RequestGuard(plain, api_key="k" * 32, **common),
        "guard + response deadline": RequestGuard(plain, api_key=None, response_timeout_s=600, **common),
    }

    async def run() -> dict[str, float]:
        return {
            name: min([await cpu_us_per_request(app, options.requests) for _ in range(5)]) for name, app in apps.items()
        }

    figures = asyncio.run(run())
    print_table(["app", "CPU µs per request"], [[name, f"{value:.2f}"] for name, value in figures.items()])
    figures_out = {"requests": options.requests, "chunks": options.chunks, "cpu_us_per_request": figures}
    path = write_results("guard_overhead", figures_out)
    title = f"CPU per request, in-process ({options.chunks or 1} body message{'s' if options.chunks > 1 else ''})"
    bar_chart(chart_path(path), title, figures, "µs", horizontal=True)


if __name__ == "__main__":
    main()
