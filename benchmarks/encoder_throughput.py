"""Encoder throughput: the served model under concurrent load beside the same model in-process.

Serves the embedded all-MiniLM-L6-v2 with `bentoml serve`, sends one sentence per V1 request at
concurrency 1, 8 and 32, and measures the in-process ceiling (tokenize + forward + pool) at batch
sizes 1 to 64 in the same run. Prints a table and writes JSON to benchmarks/results/.

    .venv/bin/python -m benchmarks.encoder_throughput [--seconds 10] [--arg NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import aiohttp
import torch
from tqdm import tqdm

from benchmarks.charts import chart_path, concurrency_chart
from benchmarks.report import print_table, write_results
from handlers.registry import handler_class_for
from handlers.requests import PredictOptions
from settings.arguments import parse_arguments
from settings.loading import inspect_model
from tests.server_process import ServerProcess

SENTENCES = [f"This is sentence number {i}, about the weather in Paris and the price of bread." for i in range(256)]


def in_process_ceiling(seconds: float, batch_sizes: list[int]) -> dict[int, float]:
    """Inputs per second of the handler called directly, per batch size (no HTTP, no queue)."""
    args = parse_arguments({}, environ={})
    source = inspect_model(args)
    handler = handler_class_for(source.task)(source, args)
    handler.load()
    handler.warm_up()
    options = PredictOptions()
    rates = {}
    for size in tqdm(batch_sizes, desc="in-process batch sizes", unit="size"):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            batch = [SENTENCES[(done + i) % len(SENTENCES)] for i in range(size)]
            handler.predict_many([([text], options) for text in batch])
            done += size
        rates[size] = done / (time.perf_counter() - started)
    return rates


async def load(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def user(index: int) -> None:
            nonlocal errors
            sent = index
            while time.perf_counter() < deadline:
                body = {"instances": [SENTENCES[sent % len(SENTENCES)]]}
                started = time.perf_counter()
                async with session.post(url, json=body) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)
                sent += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(user(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "requests": len(latencies),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per row")
    parser.add_argument("--arg", action="append", default=[], help="server argument NAME=VALUE")
    options = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    server_args = dict(item.split("=", 1) for item in options.arg)
    server = ServerProcess(server_args, Path("/tmp/encoder-benchmark-server.log")).wait_ready()
    try:
        url = f"{server.url}/v1/models/model:predict"
        asyncio.run(load(url, 8, 3))  # warm-up
        levels = tqdm((1, 8, 32), desc=f"served, {options.seconds:.0f} s per level", unit="level")
        served = {c: asyncio.run(load(url, c, options.seconds)) for c in levels}
    finally:
        server.stop()
    ceiling = in_process_ceiling(options.seconds / 2, [1, 8, 32, 64])
    best = max(ceiling.values())

    rows = [
        [
            f"served, c={c}",
            f"{r['requests_per_s']:.0f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['requests_per_s'] / best:.2f}x",
        ]
        for c, r in served.items()
    ]
    rows += [[f"in-process, batch {b}", f"{rate:.0f}", "", "", f"{rate / best:.2f}x"] for b, rate in ceiling.items()]
    print_table(["what", "inputs/s", "p50 ms", "p99 ms", "of ceiling"], rows)
    json_path = write_results(
        "encoder_throughput",
        {
            "server_args": server_args,
            "served": {str(c): r for c, r in served.items()},
            "in_process_inputs_per_s": {str(b): r for b, r in ceiling.items()},
            "ratio_at_c32": served[32]["requests_per_s"] / best,
        },
    )

    concurrency_chart(
        chart_path(json_path),
        "Encoder throughput: one sentence per V1 request",
        {"this server (V1 predict)": {c: r["requests_per_s"] for c, r in served.items()}},
        latency={"this server (V1 predict)": {c: r["p99_ms"] for c, r in served.items()}},
        references={f"in-process, batch {b}": rate for b, rate in ceiling.items() if b in (1, max(ceiling))},
        throughput_label="inputs/s",
    )


if __name__ == "__main__":
    main()
