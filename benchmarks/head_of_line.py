"""Head-of-line blocking: small requests' latency alone, then beside requests at the size limits.

Serves the embedded all-MiniLM-L6-v2 with `bentoml serve`. Small clients send one short sentence per V1
request (closed loop, concurrency 4). Measured three times in one run: alone; beside one client that sends
one input of max_input_characters again and again (the issue's "8 MB text", at the cap); and beside one that
sends max_client_batch_size inputs of long prose (a ~1.9 MB body) again and again. Prints a table and writes
JSON to benchmarks/results/.

    .venv/bin/python -m benchmarks.head_of_line [--seconds 10] [--arg NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import aiohttp

from benchmarks.report import print_table, write_results
from tests.server_process import ServerProcess

SMALL = "This is a short sentence about the weather in Paris."
PROSE = "Paris is the capital of France, and John Smith lives there with a parisian xylophone. "


async def _small_clients(session: aiohttp.ClientSession, url: str, concurrency: int, deadline: float) -> list[float]:
    latencies: list[float] = []

    async def user() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(url, json={"instances": [SMALL]}) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return latencies


async def _large_client(session: aiohttp.ClientSession, url: str, body: bytes, deadline: float) -> list[float]:
    latencies: list[float] = []
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            await response.read()
            assert response.status == 200, (response.status, (await response.read())[:200])
        latencies.append(time.perf_counter() - started)
    return latencies


async def measure(url: str, seconds: float, large_body: bytes | None) -> dict[str, float]:
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
        tasks = [_small_clients(session, url, 4, deadline)]
        if large_body is not None:
            tasks.append(_large_client(session, url, large_body, deadline))
        results = await asyncio.gather(*tasks)
    small = sorted(results[0])
    figures = {
        "small_requests": len(small),
        "small_p50_ms": 1000 * statistics.median(small),
        "small_p99_ms": 1000 * small[int(0.99 * (len(small) - 1))],
        "small_max_ms": 1000 * small[-1],
    }
    if large_body is not None:
        figures["large_requests"] = len(results[1])
        figures["large_p50_ms"] = 1000 * statistics.median(results[1]) if results[1] else 0.0
    return figures


def _body(texts: list[str]) -> bytes:
    import json

    return json.dumps({"instances": texts}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per row")
    parser.add_argument("--arg", action="append", default=[], help="server argument NAME=VALUE")
    options = parser.parse_args()
    server_args = dict(item.split("=", 1) for item in options.arg)
    max_chars = int(server_args.get("max_input_characters", 100_000))
    max_inputs = int(server_args.get("max_client_batch_size", 32))
    one_at_cap = _body([(PROSE * (max_chars // len(PROSE) + 1))[:max_chars]])
    per_input = min(max_chars, 1_900_000 // max_inputs)
    many_long = _body([(PROSE * (per_input // len(PROSE) + 1))[:per_input]] * max_inputs)

    server = ServerProcess(server_args, Path("/tmp/head-of-line-server.log")).wait_ready()
    try:
        url = f"{server.url}/v1/models/model:predict"
        asyncio.run(measure(url, 2, None))  # warm-up
        cases = {
            "small alone": asyncio.run(measure(url, options.seconds, None)),
            f"beside 1 input x {max_chars} chars, repeated": asyncio.run(measure(url, options.seconds, one_at_cap)),
            f"beside {max_inputs} inputs x {per_input} chars, repeated": asyncio.run(
                measure(url, options.seconds, many_long)
            ),
        }
    finally:
        server.stop()
    alone = cases["small alone"]["small_p99_ms"]
    rows = [
        [
            name,
            f"{r['small_requests']}",
            f"{r['small_p50_ms']:.1f}",
            f"{r['small_p99_ms']:.1f}",
            f"{r['small_p99_ms'] / alone:.2f}x",
            f"{r.get('large_requests', '')}",
            f"{r['large_p50_ms']:.0f}" if "large_p50_ms" in r else "",
        ]
        for name, r in cases.items()
    ]
    header = ["small requests (c=4)", "n", "p50 ms", "p99 ms", "p99 vs alone", "large n", "large p50 ms"]
    print_table(header, rows)
    write_results("head_of_line", {"server_args": server_args, "cases": cases})


if __name__ == "__main__":
    main()
