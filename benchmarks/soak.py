"""Soak: mixed good, bad and hostile traffic for a bounded time, and how the server's memory grows.

Serves the embedded embedding model (any `--arg` may be added) and sends, at a fixed concurrency, a mix of
V1 predict, V2 infer (JSON and gzip), OpenAI embeddings, and the careless or hostile requests the server must
refuse (malformed JSON, unknown routes and models, bodies over max_request_bytes, a gzip bomb, a wrong API
key). The resident memory of the server's processes is sampled throughout; growth is measured from the end
of a warm-up (the first 10% of the run) to the end. Prints a table and writes JSON to benchmarks/results/.

    .venv/bin/python -m benchmarks.soak [--seconds 600] [--concurrency 16] [--arg NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psutil

from benchmarks.report import print_table, write_results
from tests.server_process import ServerProcess

API_KEY = "soak-key"
LIMIT = 256 * 1024


def _v2(texts: list[str]) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    ).encode()


def requests(model: str) -> list[tuple[str, str, dict[str, str], bytes | None]]:
    """(method, path, headers, body): the mix, good requests first and then the ones to refuse."""
    auth = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    sentence = "The weather in Paris is mild in spring and the bread is cheap."
    return [
        ("POST", f"/v1/models/{model}:predict", auth, json.dumps({"instances": [sentence]}).encode()),
        ("POST", f"/v1/models/{model}:predict", auth, json.dumps({"instances": [sentence] * 8}).encode()),
        ("POST", f"/v2/models/{model}/infer", auth, _v2([sentence, "hello"])),
        ("POST", f"/v2/models/{model}/infer", {**auth, "content-encoding": "gzip"}, gzip.compress(_v2([sentence]))),
        ("POST", "/openai/v1/embeddings", auth, json.dumps({"model": model, "input": [sentence, "hi"]}).encode()),
        ("GET", "/v2/health/ready", {}, None),
        ("GET", "/openai/v1/models", auth, None),
        ("POST", f"/v1/models/{model}:predict", auth, b'{"instances": ['),
        ("POST", "/v1/models/nope:predict", auth, b'{"instances": ["a"]}'),
        ("GET", "/no/such/route", auth, None),
        ("POST", f"/v1/models/{model}:predict", auth, json.dumps({"instances": ["a" * LIMIT]}).encode()),
        (
            "POST",
            f"/v2/models/{model}/infer",
            {**auth, "content-encoding": "gzip"},
            gzip.compress(_v2(["a" * LIMIT * 4])),
        ),
        ("POST", f"/v1/models/{model}:predict", {"authorization": "Bearer wrong"}, b'{"instances": ["a"]}'),
    ]


def rss_bytes(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(process.memory_info().rss for process in [root, *root.children(recursive=True)])


async def soak(url: str, pid: int, model: str, seconds: float, concurrency: int) -> dict[str, object]:
    mix = requests(model)
    statuses: Counter[str] = Counter()
    samples: list[tuple[float, int]] = []
    started = time.perf_counter()
    deadline = started + seconds
    order = itertools.cycle(range(len(mix)))

    async def user(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            method, path, headers, body = mix[next(order)]
            async with session.request(method, url + path, headers=headers, data=body) as response:
                await response.read()
                statuses[f"{response.status}"] += 1

    async def sampler() -> None:
        while time.perf_counter() < deadline:
            samples.append((time.perf_counter() - started, rss_bytes(pid)))
            await asyncio.sleep(max(1.0, seconds / 120))

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        await asyncio.gather(sampler(), *(user(session) for _ in range(concurrency)))
    samples.append((time.perf_counter() - started, rss_bytes(pid)))
    after_warmup = next(rss for at, rss in samples if at >= seconds * 0.1)
    final = samples[-1][1]
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "rss_after_warmup_mb": after_warmup / 2**20,
        "rss_end_mb": final / 2**20,
        "growth_percent": 100 * (final - after_warmup) / after_warmup,
        "samples": [(round(at, 1), rss) for at, rss in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--arg", action="append", default=[], help="server argument NAME=VALUE")
    options = parser.parse_args()
    server_args = {"api_key": API_KEY, "max_request_bytes": str(LIMIT), "max_decompressed_bytes": str(LIMIT)}
    server_args.update(dict(item.split("=", 1) for item in options.arg))
    model = server_args.setdefault("model_name", "model")
    server = ServerProcess(server_args, Path("/tmp/soak-server.log")).wait_ready()
    try:
        figures = asyncio.run(soak(server.url, server.process.pid, model, options.seconds, options.concurrency))
    finally:
        server.stop()
    print_table(
        ["seconds", "requests", "statuses", "RSS after warm-up MB", "RSS at end MB", "growth"],
        [
            [
                f"{figures['seconds']:.0f}",
                str(figures["requests"]),
                " ".join(f"{k}:{v}" for k, v in figures["statuses"].items()),  # type: ignore[union-attr]
                f"{figures['rss_after_warmup_mb']:.0f}",
                f"{figures['rss_end_mb']:.0f}",
                f"{figures['growth_percent']:+.1f}%",
            ]
        ],
    )
    write_results("soak", {"server_args": {k: v for k, v in server_args.items() if k != "api_key"}, **figures})


if __name__ == "__main__":
    main()
