"""Closed-loop HTTP load: N clients posting one body again and again; requests/s, p50, p99, failures.

From wrk (a compiled load generator, Debian's `wrk`) when it is installed: on a 2-core machine a Python
client takes CPU from the server it measures, and wrk with one thread costs little. Latency percentiles
come from `wrk --latency`. Without wrk, an aiohttp client does the same (and says so: `generator`).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def generator_name() -> str:
    return "wrk -t1" if wrk_available() else "aiohttp (wrk not installed: the client shares the server's CPU)"


def closed_loop(url: str, body: dict[str, Any], concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` clients posting `body` to `url` for `seconds`, by wrk when present."""
    if wrk_available():
        return run_wrk(url, body, concurrency, seconds)
    return asyncio.run(_aiohttp_loop(url, body, concurrency, seconds))


def run_wrk(url: str, body: dict[str, Any], concurrency: int, seconds: float) -> dict[str, float]:
    """Requests/s, p50/p99 (ms) and failures of `concurrency` connections posting `body` for `seconds`."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "post.lua"
        # A Lua long string holds the JSON verbatim; its level is chosen so the body cannot close it.
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [==[{json.dumps(body)}]==]\n"
        )
        command = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{math.ceil(seconds)}s",  # wrk takes whole seconds
            "--timeout",
            "60s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return parse_wrk(output)


def parse_wrk(output: str) -> dict[str, float]:
    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        if match is None:
            raise ValueError(f"no {percent}% latency in wrk's output:\n{output}")
        return float(match.group(1)) * _UNITS[match.group(2)]

    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    done = re.search(r"(\d+) requests in", output)
    if rate is None or done is None:
        raise ValueError(f"no request rate in wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    failures = int(non_2xx.group(1)) if non_2xx else 0
    failures += sum(int(n) for n in socket.groups()) if socket else 0
    return {
        "requests_per_s": float(rate.group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "requests": int(done.group(1)),
        "failures": failures,
    }


async def _aiohttp_loop(url: str, body: dict[str, Any], concurrency: int, seconds: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def client() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, json=body) as response:
                    await response.read()
                    failures += response.status != 200
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "requests": len(latencies),
        "failures": failures,
    }
