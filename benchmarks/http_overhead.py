"""The server's own HTTP cost: requests/s on routes that never touch the model.

Serves the embedded model (any `--arg` may be added, e.g. `--arg access_log=true` or
`--arg tracing=true` to see what each costs) and sends `GET /` and `GET /v1/models` at concurrency
32 from a load generator on the same machine. Prints a table and writes JSON to benchmarks/results/.

    .venv/bin/python -m benchmarks.http_overhead [--seconds 5] [--arg NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import aiohttp
from tqdm import tqdm

from benchmarks.charts import bar_chart, chart_path
from benchmarks.report import print_table, write_results
from tests.server_process import ServerProcess

ROUTES = ["/", "/v1/models"]


async def rate(url: str, concurrency: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def user() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with session.get(url) as response:
                    await response.read()
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--arg", action="append", default=[], help="server argument NAME=VALUE")
    options = parser.parse_args()
    server_args = dict(item.split("=", 1) for item in options.arg)
    server = ServerProcess(server_args, Path("/tmp/http-overhead-server.log")).wait_ready()
    try:
        asyncio.run(rate(server.url + "/", options.concurrency, 1))  # warm-up
        routes = tqdm(ROUTES, desc=f"routes, {options.seconds:.0f} s each", unit="route")
        rates = {route: asyncio.run(rate(server.url + route, options.concurrency, options.seconds)) for route in routes}
    finally:
        server.stop()
    print_table(["route", f"requests/s at c={options.concurrency}"], [[r, f"{v:.0f}"] for r, v in rates.items()])
    figures = {"server_args": server_args, "concurrency": options.concurrency, "rates": rates}
    json_path = write_results("http_overhead", figures)
    title = f"HTTP cost: routes that never touch the model, c={options.concurrency}"
    bar_chart(chart_path(json_path), title, {f"GET {route}": value for route, value in rates.items()}, "requests/s")


if __name__ == "__main__":
    main()
