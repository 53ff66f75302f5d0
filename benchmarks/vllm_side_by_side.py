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
shows a low TPOT and a higher TTFT, so compare latency p50 as well. For the servers started here, "API CPU"
and "engine CPU" are the CPU seconds their API process and their engine-core process spent per output token
(from /proc, user and system): what each server's layers cost, which moves with the machine's speed too (on
a shared VM the same server's figure can double between runs seconds apart). The turn order flips every
repetition, so neither server always runs first. Besides the ratio of the medians (the issue's target), the
"by pair" row takes ours / vLLM in each repetition, whose two runs are seconds apart, and gives the median
and quartiles; the last lines give each server's spread between repetitions. With --ceiling, a third target
in the same turns is the in-process ceiling: vLLM's app, the one ours serves under /openai, served bare by
our own worker on a port of its own (benchmarks/vllm_ceiling_hook), same process, same engine, nothing of
BentoML's or ours in front; `ours/ceiling` is then the cost of those layers alone, and `ceiling/vllm` what
the rest (BentoML's worker process beside vLLM's own server process, and the machine) makes of the same app
(its CPU figures are the same worker's, during its own turns). Prints a table and writes JSON to
benchmarks/results/.

    .venv/bin/python -m benchmarks.vllm_side_by_side [--serve-ours | --ours http://127.0.0.1:3000/openai/v1]
        [--reps 3] [--rounds 2] [--model DIR] [--dtype float32] [--concurrency 1 8 32] [--tokens 64]
        [--vllm-arg=--enforce-eager ...] [--also-ours engine_nice=5 ...] [--ceiling [--ceiling-serves service]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.charts import chart_path, concurrency_chart
from benchmarks.paired_ratios import median_of, ratio_rows
from benchmarks.report import print_table, server_code, write_results
from benchmarks.vllm_servers import (
    OURS_ARGS,
    ServerCPU,
    VLLMServer,
    ceiling_env,
    start_ours,
    tiny_llama,
    wait_for_ceiling,
)
from tests.server_process import free_port

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


async def run_level(
    base_url: str, model: str, concurrency: int, requests: int, tokens: int, cpu: ServerCPU | None = None
) -> dict[str, Any]:
    """`requests` completions, `concurrency` at a time (closed loop); with `cpu`, the server's CPU per token."""
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

        cpu_before = cpu.seconds() if cpu else (float("nan"), float("nan"))
        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu_after = cpu.seconds() if cpu else (float("nan"), float("nan"))
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
        "api_cpu_us_per_token": 1e6 * (cpu_after[0] - cpu_before[0]) / total_tokens,
        "engine_cpu_us_per_token": 1e6 * (cpu_after[1] - cpu_before[1]) / total_tokens,
    }


# At c=1, rounds x 1 requests is too few for a TTFT median of ~8 ms that moves by a millisecond between runs.
MIN_REQUESTS = 40


async def measure(
    targets: dict[str, tuple[str, str | None]],
    levels: list[int],
    tokens: int,
    rounds: int,
    reps: int = 1,
    cpus: dict[str, ServerCPU] | None = None,
) -> dict:
    """Every level on every target, `reps` times, the targets taking turns per level so both see the same
    machine (and the same drift), in reversed order every other repetition; medians per level."""
    cpus = cpus or {}
    figures: dict[str, Any] = {}
    models: dict[str, str] = {}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {label: {c: [] for c in levels} for label in targets}
    for label, (base_url, model) in targets.items():
        async with aiohttp.ClientSession() as session:
            models[label] = model or await model_name(session, base_url)
        await run_level(base_url, models[label], 2, 4, tokens)  # warm-up
        figures[label] = {"url": base_url, "model": models[label], "levels": {}}
    for rep in range(reps):
        turns = list(targets.items()) if rep % 2 == 0 else list(reversed(targets.items()))
        for concurrency in levels:
            requests = max(rounds * concurrency, MIN_REQUESTS)
            for label, (base_url, _) in turns:
                print(f"{label}: rep {rep + 1}/{reps}, concurrency {concurrency}, {requests} requests ...", flush=True)
                await run_level(base_url, models[label], concurrency, min(concurrency, requests), tokens)  # unmeasured
                run = await run_level(base_url, models[label], concurrency, requests, tokens, cpus.get(label))
                runs[label][concurrency].append(run)
    for label in targets:
        figures[label]["levels"] = {str(c): median_of(runs[label][c]) for c in levels}
    return figures


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
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="with --serve-ours, our worker also serves vLLM's app bare on a port of its own (same process, same "
        "engine, nothing in front: benchmarks/vllm_ceiling_hook), measured in the same turns as `ceiling`",
    )
    parser.add_argument(
        "--ceiling-serves",
        choices=["vllm-app", "service"],
        default="vllm-app",
        help="what the ceiling's port serves: vLLM's app bare, or our whole service app on a plain uvicorn "
        "server (then ours/ceiling is BentoML's worker server against a plain one, the app being the same)",
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
    # A SIGTERM (e.g. `timeout`) ends the run through the `finally` below, so the servers started here stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if options.no_vllm and not (options.ours or options.serve_ours):
        parser.error("--no-vllm needs --ours or --serve-ours")
    if options.ceiling and not options.serve_ours:
        parser.error("--ceiling needs --serve-ours")

    figures: dict[str, Any] = {"tokens": options.tokens, "concurrency": options.concurrency}
    figures["server_code"] = server_code()  # runs of the same server code may be pooled (benchmarks.pooled_ratios)
    urls: dict[str, tuple[str, str | None]] = {}
    started: dict[str, Any] = {}  # label -> our servers started here
    if options.serve_ours:
        options.model = options.model or tiny_llama()
        ceiling_port = free_port() if options.ceiling else 0
        ceiling = ceiling_env(ceiling_port, options.ceiling_serves) if options.ceiling else None
        started["ours"] = start_ours(options, {}, env=ceiling)
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
    if options.ceiling:
        prefix = "/openai" if options.ceiling_serves == "service" else ""
        urls["ceiling"] = (f"http://127.0.0.1:{ceiling_port}{prefix}/v1", "tiny-llama")
        figures["ceiling_serves"] = options.ceiling_serves
    figures["reps"] = options.reps
    try:
        if server is not None:
            asyncio.run(server.wait_ready(options.start_timeout))
            figures["vllm_server"]["start_seconds"] = server.start_seconds
            print(f"vLLM server ready in {server.start_seconds:.1f} s", flush=True)
        cpus = {label: ServerCPU(ours.process.pid) for label, ours in started.items()}
        if options.ceiling:  # the same worker and engine: its CPU during the ceiling's turns
            # Ours is ready once vLLM's app is built, so the hook has started the bare server by then.
            asyncio.run(wait_for_ceiling(urls["ceiling"][0].removesuffix("/v1"), 30))
            cpus["ceiling"] = cpus["ours"]
        if server is not None:
            cpus["vllm"] = ServerCPU(server.process.pid)
        measuring = measure(urls, options.concurrency, options.tokens, options.rounds, options.reps, cpus)
        targets = asyncio.run(measuring)
    finally:
        if server is not None:
            server.stop()
        for ours in started.values():
            ours.stop()
    figures["targets"] = targets
    if server_code() != figures["server_code"]:  # changed while it ran: not one server code, never pooled
        figures["server_code"]["changed"] = True

    header = ["server", "conc.", "requests", "out tok/s", "TTFT p50 ms", "headers p50 ms", "TTFT p99 ms"]
    header += ["TPOT p50 ms", "TPOT p99 ms"]
    header += ["latency p50 ms", "API CPU us/token", "engine CPU us/token"]
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
                    f"{r['api_cpu_us_per_token']:.0f}",
                    f"{r['engine_cpu_us_per_token']:.0f}",
                ]
            )
        levels = {label: target["levels"][str(concurrency)] for label, target in targets.items()}
        baselines = [label for label in ("vllm", "ceiling") if label in targets]
        for label in [label for label in targets if label not in baselines]:
            for baseline in baselines:
                target = baseline == "vllm"
                rows += ratio_rows(label, levels[label], baseline, levels[baseline], concurrency, figures, target)
        if len(baselines) == 2:  # what the process and the machine give vLLM's app, beside vLLM's own server
            rows += ratio_rows("ceiling", levels["ceiling"], "vllm", levels["vllm"], concurrency, figures, False)
    print()
    print_table(header, rows)
    print("\nthe spread between repetitions (min-max), of each server alone on the machine:")
    for label, target in targets.items():
        for concurrency, level in target["levels"].items():
            ranges = {
                key: [run[key] for run in level["runs"]] for key in ("output_tokens_per_s", "api_cpu_us_per_token")
            }
            tokens, api = (f"{min(values):.0f}-{max(values):.0f}" for values in ranges.values())
            print(f"  {label}, c={concurrency}: output tok/s {tokens}, API CPU us/token {api}")
    json_path = write_results("vllm_side_by_side", figures)
    levels = {label: target["levels"] for label, target in targets.items()}
    concurrency_chart(
        chart_path(json_path),
        f"Streamed generation, {options.tokens} tokens per request: vLLM's own server and ours"
        + (", with the in-process ceiling" if options.ceiling else ""),
        {label: {int(c): r["output_tokens_per_s"] for c, r in by_c.items()} for label, by_c in levels.items()},
        latency={label: {int(c): r["ttft_p50_ms"] for c, r in by_c.items()} for label, by_c in levels.items()},
        throughput_label="output tokens/s",
        latency_label="TTFT p50 (ms)",
    )


if __name__ == "__main__":
    main()
