"""Streamed generation: vLLM's own OpenAI server beside ours, on the same model and load.

Starts `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with the tiny Llama of
tests/tiny_models.py (or --model), then sends streamed /v1/completions requests of --tokens tokens
each (ignore_eos, greedy) at concurrency 1, 8 and 32 and measures output tokens/s, TTFT (time to the
first token) and TPOT (time per output token after the first). With --ours URL (e.g.
http://127.0.0.1:3000/openai/v1, a server already running, best on the same model folder) the same
load goes to our server too; with --serve-ours this script starts ours (backend vllm, same model). The
servers take turns at each concurrency, `--reps` times, so each is measured alone on the same machine,
and the medians are reported with the issue's target (ours at least 0.95x vLLM's tokens/s, TTFT p50 at
most 1.1x).
"headers" is the time to the response's headers: vLLM's streaming routes send them once the request is
parsed and its prompt tokenized, before it reaches the engine, so it is the share of TTFT spent in the HTTP
layers and the route (with the event loop's queue in front of them), and TTFT minus it the engine's.
TPOT is (last token - first token) / (tokens - 1) per request: a server that delivers tokens in bursts
shows a low TPOT and a higher TTFT, so compare latency p50 as well. Prints a table and writes JSON
to benchmarks/results/.

    .venv/bin/python -m benchmarks.vllm_side_by_side [--serve-ours | --ours http://127.0.0.1:3000/openai/v1]
        [--reps 3] [--rounds 2] [--model DIR] [--dtype float32] [--concurrency 1 8 32] [--tokens 64]
        [--vllm-arg=--enforce-eager ...] [--also-ours engine_nice=5 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.charts import chart_path, concurrency_chart
from benchmarks.report import print_table, write_results
from tests.server_process import ServerProcess, free_port

PROMPTS = [
    "The capital of France is",
    "Hello world! How are you today?",
    "The quick brown fox jumps over",
    "Students learn history, science, music and art",
    "Please write a short story about a cat",
    "The weather today is good, the sun",
    "My friend Peter travels by plane to",
    "Water is wet, fire is hot, ice is",
]


def tiny_llama() -> Path:
    """The tiny Llama of tests/tiny_models.py, built into a temporary folder."""
    from tests.tiny_models import build_llama

    return build_llama(Path(tempfile.mkdtemp(prefix="vllm-bench-")) / "llama")


class VLLMServer:
    """vLLM's OpenAI server in a subprocess (its own session, so stop() ends its engine process too)."""

    def __init__(self, model: Path, name: str, extra: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        command += ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port), *extra]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **os.environ}
        env["HF_HUB_OFFLINE"] = "1"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.start_seconds = float("nan")

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-4000:]
                    raise RuntimeError(f"vLLM server exited with {self.process.returncode}:\n{tail}")
                try:
                    async with session.get(self.url.removesuffix("/v1") + "/health") as response:
                        if response.status == 200:
                            self.start_seconds = time.perf_counter() - self.started
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


async def model_name(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(f"{base_url}/models") as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


async def one_request(
    session: aiohttp.ClientSession, base_url: str, model: str, prompt: str, tokens: int
) -> dict[str, float]:
    """One streamed completion: its TTFT, its token count (from usage) and the time of its last token."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = None
    chunks = 0
    completion_tokens = None
    async with session.post(f"{base_url}/completions", json=body) as response:
        headers = time.perf_counter()  # the route answered: what remains to the first token is the engine's
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                completion_tokens = event["usage"].get("completion_tokens")
            if any(choice.get("text") for choice in event.get("choices") or []):
                now = time.perf_counter()
                first = first or now
                last = now
                chunks += 1
    if first is None or last is None:
        raise RuntimeError("the stream had no text")
    count = completion_tokens if completion_tokens is not None else chunks
    return {
        "ttft": first - started,
        "headers": headers - started,
        "tokens": count,
        "decode": last - first,
        "latency": last - started,
    }


async def run_level(base_url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict[str, Any]:
    """`requests` completions, `concurrency` at a time (closed loop)."""
    results: list[dict[str, float]] = []
    errors: list[str] = []
    queue = list(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def user() -> None:
            while queue:
                i = queue.pop()
                try:
                    results.append(await one_request(session, base_url, model, PROMPTS[i % len(PROMPTS)], tokens))
                except (TimeoutError, RuntimeError, aiohttp.ClientError) as error:
                    errors.append(str(error))

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if not results:
        raise RuntimeError(f"every request failed, e.g. {errors[:1]}")
    ttfts = sorted(r["ttft"] for r in results)
    tpots = sorted(r["decode"] / (r["tokens"] - 1) for r in results if r["tokens"] > 1)
    total_tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "output_tokens": total_tokens,
        "seconds": elapsed,
        "output_tokens_per_s": total_tokens / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "headers_p50_ms": 1000 * statistics.median(r["headers"] for r in results),
        "ttft_p99_ms": 1000 * ttfts[int(0.99 * (len(ttfts) - 1))],
        "tpot_p50_ms": 1000 * statistics.median(tpots) if tpots else float("nan"),
        "tpot_p99_ms": 1000 * tpots[int(0.99 * (len(tpots) - 1))] if tpots else float("nan"),
        "latency_p50_ms": 1000 * statistics.median(r["latency"] for r in results),
    }


# At c=1, rounds x 1 requests is too few for a TTFT median of ~8 ms that moves by a millisecond between runs.
MIN_REQUESTS = 40
MEDIAN_KEYS = (
    "output_tokens_per_s",
    "ttft_p50_ms",
    "headers_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "latency_p50_ms",
)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's figures over repetitions: the median of each, with every run kept."""
    merged: dict[str, Any] = {key: statistics.median(run[key] for run in runs) for key in MEDIAN_KEYS}
    merged["requests"] = sum(run["requests"] for run in runs)
    merged["errors"] = sum(run["errors"] for run in runs)
    return {**merged, "runs": runs}


async def measure(
    targets: dict[str, tuple[str, str | None]], levels: list[int], tokens: int, rounds: int, reps: int = 1
) -> dict:
    """Every level on every target, `reps` times, the targets taking turns per level so both see the same
    machine (and the same drift); medians per level."""
    figures: dict[str, Any] = {}
    models: dict[str, str] = {}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {label: {c: [] for c in levels} for label in targets}
    for label, (base_url, model) in targets.items():
        async with aiohttp.ClientSession() as session:
            models[label] = model or await model_name(session, base_url)
        await run_level(base_url, models[label], 2, 4, tokens)  # warm-up
        figures[label] = {"url": base_url, "model": models[label], "levels": {}}
    for rep in range(reps):
        for concurrency in levels:
            requests = max(rounds * concurrency, MIN_REQUESTS)
            for label, (base_url, _) in targets.items():
                print(f"{label}: rep {rep + 1}/{reps}, concurrency {concurrency}, {requests} requests ...", flush=True)
                await run_level(base_url, models[label], concurrency, min(concurrency, requests), tokens)  # unmeasured
                runs[label][concurrency].append(await run_level(base_url, models[label], concurrency, requests, tokens))
    for label in targets:
        figures[label]["levels"] = {str(c): median_of(runs[label][c]) for c in levels}
    return figures


OURS_ARGS = {"backend": "vllm", "model_name": "tiny-llama", "disable_log_stats": "true"}


def start_ours(options: argparse.Namespace, extra: dict[str, str], log_name: str = "ours") -> Any:
    """Our server (`bentoml serve`, backend vllm) on the same model, dtype and max_model_len, ready."""
    arguments = {
        **OURS_ARGS,
        "model_dir": str(options.model),
        "max_model_len": str(options.max_model_len),
        "dtype": options.dtype,
        **extra,
    }
    print(f"starting ours: bentoml serve {arguments} ...", flush=True)
    log = Path(f"/tmp/vllm-side-by-side-{log_name}.log")
    return ServerProcess(arguments, log).wait_ready(options.start_timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: the tiny Llama of tests/tiny_models.py)")
    parser.add_argument("--ours", help="our server's OpenAI base URL, e.g. http://127.0.0.1:3000/openai/v1")
    parser.add_argument(
        "--serve-ours",
        action="store_true",
        help="start ours too (`bentoml serve`, backend=vllm, same model and max_model_len, engine stats off); "
        "both stay up and take turns, so each is measured alone on the machine",
    )
    parser.add_argument("--ours-model", help="model name on our server (default: the first of GET /models)")
    parser.add_argument(
        "--also-ours",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --serve-ours, a second copy of ours with these arguments too (repeat), e.g. engine_nice=5, "
        "measured in the same turns",
    )
    parser.add_argument("--vllm-url", help="a vLLM server already running (its /v1 base URL) instead of starting one")
    parser.add_argument("--no-vllm", action="store_true", help="measure only --ours")
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra flag for vLLM's server (repeat)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64, help="streamed output tokens per request")
    parser.add_argument(
        "--rounds", type=int, default=2, help=f"requests per level = rounds x concurrency (>= {MIN_REQUESTS})"
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions, interleaved; medians are reported")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument(
        "--dtype",
        default="float32",
        help="the model's dtype on both servers: left to themselves, vLLM's server picks bfloat16 on a CPU with "
        "bf16 support and ours (KServe's rule) float32",
    )
    parser.add_argument("--start-timeout", type=float, default=600)
    options = parser.parse_args()
    if options.no_vllm and not (options.ours or options.serve_ours):
        parser.error("--no-vllm needs --ours or --serve-ours")

    figures: dict[str, Any] = {"tokens": options.tokens, "concurrency": options.concurrency}
    urls: dict[str, tuple[str, str | None]] = {}
    started: dict[str, Any] = {}  # label -> our servers started here
    if options.serve_ours:
        options.model = options.model or tiny_llama()
        started["ours"] = start_ours(options, {})
        figures["ours_server"] = {"model": str(options.model), "args": OURS_ARGS}
        if options.also_ours:
            also = dict(pair.split("=", 1) for pair in options.also_ours)
            started["ours, " + " ".join(options.also_ours)] = start_ours(options, also, "ours-also")
            figures["also_ours_args"] = also
    server = None
    if not options.no_vllm:
        if options.vllm_url:
            urls["vllm"] = (options.vllm_url, None)
        else:
            model = options.model or tiny_llama()
            extra = ["--max-model-len", str(options.max_model_len), "--dtype", options.dtype, "--disable-log-stats"]
            extra += options.vllm_arg
            server = VLLMServer(model, "tiny-llama", extra, Path("/tmp/vllm-side-by-side-server.log"))
            figures["vllm_server"] = {"model": str(model), "args": extra}
            print(f"starting vLLM's server on {server.url} (log {server.log_path}) ...", flush=True)
            urls["vllm"] = (server.url, None)
    if options.ours:
        urls["ours"] = (options.ours, options.ours_model)
    for label, ours in started.items():
        urls[label] = (f"{ours.url}/openai/v1", "tiny-llama")
    figures["reps"] = options.reps
    try:
        if server is not None:
            asyncio.run(server.wait_ready(options.start_timeout))
            figures["vllm_server"]["start_seconds"] = server.start_seconds
            print(f"vLLM server ready in {server.start_seconds:.1f} s", flush=True)
        targets = asyncio.run(measure(urls, options.concurrency, options.tokens, options.rounds, options.reps))
    finally:
        if server is not None:
            server.stop()
        for ours in started.values():
            ours.stop()
    figures["targets"] = targets

    header = ["server", "conc.", "requests", "out tok/s", "TTFT p50 ms", "headers p50 ms", "TTFT p99 ms"]
    header += ["TPOT p50 ms", "TPOT p99 ms"]
    header.append("latency p50 ms")
    rows = []
    for concurrency in options.concurrency:
        for label, target in targets.items():
            r = target["levels"][str(concurrency)]
            rows.append(
                [
                    label,
                    str(concurrency),
                    f"{r['requests']}" + (f" ({r['errors']} failed)" if r["errors"] else ""),
                    f"{r['output_tokens_per_s']:.1f}",
                    f"{r['ttft_p50_ms']:.1f}",
                    f"{r['headers_p50_ms']:.1f}",
                    f"{r['ttft_p99_ms']:.1f}",
                    f"{r['tpot_p50_ms']:.2f}",
                    f"{r['tpot_p99_ms']:.2f}",
                    f"{r['latency_p50_ms']:.0f}",
                ]
            )
        for label in [label for label in targets if label != "vllm" and "vllm" in targets]:
            ours_level, vllm_level = (targets[name]["levels"][str(concurrency)] for name in (label, "vllm"))
            ratio = ours_level["output_tokens_per_s"] / vllm_level["output_tokens_per_s"]
            ttft_ratio = ours_level["ttft_p50_ms"] / vllm_level["ttft_p50_ms"]
            figures.setdefault(f"{label}_over_vllm_tokens_per_s", {})[str(concurrency)] = ratio
            figures.setdefault(f"{label}_over_vllm_ttft_p50", {})[str(concurrency)] = ttft_ratio
            # The target: at least 0.95x vLLM's output tokens/s, TTFT p50 at most 1.1x.
            met = "met" if ratio >= 0.95 and ttft_ratio <= 1.1 else "MISSED"
            headers_ratio = ours_level["headers_p50_ms"] / vllm_level["headers_p50_ms"]
            ratios = [f"{ratio:.2f}x", f"{ttft_ratio:.2f}x", f"{headers_ratio:.2f}x"]
            rows.append([f"{label}/vllm", str(concurrency), met, *ratios, "", "", "", ""])
    print()
    print_table(header, rows)
    json_path = write_results("vllm_side_by_side", figures)
    levels = {label: target["levels"] for label, target in targets.items()}
    concurrency_chart(
        chart_path(json_path),
        f"Streamed generation, {options.tokens} tokens per request: vLLM's own server and ours",
        {label: {int(c): r["output_tokens_per_s"] for c, r in by_c.items()} for label, by_c in levels.items()},
        latency={label: {int(c): r["ttft_p50_ms"] for c, r in by_c.items()} for label, by_c in levels.items()},
        throughput_label="output tokens/s",
        latency_label="TTFT p50 (ms)",
    )


if __name__ == "__main__":
    main()
