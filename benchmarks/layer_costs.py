"""What each ASGI layer in front of vLLM's app costs per streamed request, timed inside our worker.

    .venv/bin/python -m benchmarks.layer_costs [--requests 60] [--reps 4] [--concurrency 1]

Starts ours on the vLLM backend (the tiny Llama of tests/tiny_models.py) with benchmarks/vllm_ceiling_hook on
its PYTHONPATH and BENCH_LAYER_TIMES set: the worker serves vLLM's app bare too (the ceiling), and notes
when each request enters each layer (layer_times.py). Ours and the ceiling take turns with the same streamed
completions; each layer's cost is the time from its entry to the next layer's, and the stack's is the time
from the first layer to vLLM's app, against the ceiling's from its uvicorn app to vLLM's app. Client-side
times (headers, TTFT) are printed beside them: at c=1 they spread ±10% between runs, where these do not, so
this is the tool to tell layers apart, and benchmarks.vllm_side_by_side the one for the end-to-end targets.
Prints a table, writes JSON to benchmarks/results/ and a bar chart beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import urllib.request
from typing import Any

from benchmarks.charts import bar_chart, chart_path
from benchmarks.report import print_table, write_results
from benchmarks.vllm_servers import OURS_ARGS, ceiling_env, start_ours, tiny_llama, wait_for_ceiling
from benchmarks.vllm_side_by_side import run_level
from tests.server_process import free_port

TIMES_PATH = "/bench/layer-times"  # benchmarks/vllm_ceiling_hook/layer_times.py
VLLM_APP = "vLLM's app"
SEND_PER_MESSAGE = "send wrappers, per message"
SEND_PER_REQUEST = "send wrappers, per request"
AFTER_LAST_MESSAGE = "last message to return"


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {f"p{q}": ordered[int(q / 100 * (len(ordered) - 1))] for q in (10, 50, 90)}


def layer_costs(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """µs from each layer's entry to the next one's, by layer, over the records that reached vLLM's app;
    "whole stack", first layer to vLLM's app; and the layers' `send` wrappers, per message and per request."""
    reached = [record for record in records if record["entries"] and record["entries"][-1][0] == VLLM_APP]
    costs: dict[str, list[float]] = {}
    for record in reached:
        entries = record["entries"]
        for (name, entered), (_, left) in itertools.pairwise(entries):
            costs.setdefault(name, []).append(1e6 * (left - entered))
        costs.setdefault("whole stack", []).append(1e6 * (entries[-1][1] - entries[0][1]))
        passes = [1e6 * (out - sent) for sent, out in zip(record["sent_in"], record["sent_out"], strict=False)]
        costs.setdefault(SEND_PER_MESSAGE, []).extend(passes)
        costs.setdefault(SEND_PER_REQUEST, []).append(sum(passes))
        if "returned" in record and record["sent_out"]:
            costs.setdefault(AFTER_LAST_MESSAGE, []).append(1e6 * (record["returned"] - record["sent_out"][-1]))
    return {name: {**quantiles(values), "samples": len(values)} for name, values in costs.items()}


def fetch_times(ceiling_url: str) -> dict[str, Any]:
    """The records and garbage collections since the last call, from our worker (which then clears them)."""
    with urllib.request.urlopen(ceiling_url + TIMES_PATH) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="streamed completions per turn")
    parser.add_argument("--reps", type=int, default=4, help="turns of each, interleaved")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--start-timeout", type=float, default=600)
    options = parser.parse_args()
    options.model = tiny_llama()

    ceiling_port = free_port()
    ours = start_ours(options, {}, env={**ceiling_env(ceiling_port), "BENCH_LAYER_TIMES": "1"})
    ceiling_url = f"http://127.0.0.1:{ceiling_port}"
    urls = {"ours": f"{ours.url}/openai/v1", "ceiling": f"{ceiling_url}/v1"}
    client: dict[str, list[dict[str, Any]]] = {label: [] for label in urls}
    collections: dict[str, list[dict[str, list[float]]]] = {label: [] for label in urls}
    records: dict[str, list[dict[str, Any]]] = {label: [] for label in urls}
    try:
        asyncio.run(wait_for_ceiling(ceiling_url, 30))
        for url in urls.values():  # warm-up, not timed
            asyncio.run(run_level(url, "tiny-llama", options.concurrency, 8, 16))
        for rep in range(options.reps):
            order = list(urls.items()) if rep % 2 == 0 else list(urls.items())[::-1]
            for label, url in order:
                fetch_times(ceiling_url)  # clears what came between the turns
                level = run_level(url, "tiny-llama", options.concurrency, options.requests, options.tokens)
                client[label].append(asyncio.run(level))
                turn = fetch_times(ceiling_url)  # this turn's alone
                records[label] += turn[label]
                collections[label].append(turn["collections"])
    finally:
        ours.stop()

    costs = {way: layer_costs(records[way]) for way in urls}
    rows = []
    for way, layers in costs.items():
        for name, q in layers.items():
            rows.append([way, name, f"{q['p10']:.1f}", f"{q['p50']:.1f}", f"{q['p90']:.1f}", str(q["samples"])])
    print_table(["way in", "layer (entry to the next)", "p10 µs", "p50 µs", "p90 µs", "samples"], rows)
    client_medians = {
        label: {key: statistics.median(r[key] for r in runs) for key in ("headers_p50_ms", "ttft_p50_ms")}
        for label, runs in client.items()
    }
    gc_per_turn = {
        label: {
            generation: [sum(turn.get(generation, [0, 0.0])[i] for turn in turns) / len(turns) for i in (0, 1)]
            for generation in ("0", "1", "2")
        }
        for label, turns in collections.items()
    }
    for label, generations in gc_per_turn.items():
        counts = ", ".join(f"gen {g}: {n:.1f} ({1000 * t:.1f} ms)" for g, (n, t) in generations.items())
        print(f"{label}: garbage collections per turn of {options.requests} requests: {counts}")
    for label, medians in client_medians.items():
        headers, ttft = medians["headers_p50_ms"], medians["ttft_p50_ms"]
        print(f"{label}: client-side headers p50 {headers:.2f} ms, TTFT p50 {ttft:.2f} ms")
    path = write_results(
        "layer_costs",
        {
            "concurrency": options.concurrency,
            "requests": options.requests,
            "reps": options.reps,
            "tokens": options.tokens,
            "ours_server": {"model": str(options.model), "args": OURS_ARGS},
            "layer_costs_us": costs,
            "client": client,
            "client_medians": client_medians,
            "collections_per_turn": gc_per_turn,
        },
    )
    skipped = ("whole stack", SEND_PER_MESSAGE, AFTER_LAST_MESSAGE)
    bars = {f"ours: {name}": q["p50"] for name, q in costs["ours"].items() if name not in skipped}
    bars["ours: entry to vLLM's app"] = costs["ours"]["whole stack"]["p50"]
    bars["ceiling: entry to vLLM's app"] = costs["ceiling"]["whole stack"]["p50"]
    bars["ceiling: send wrappers (the timer's own)"] = costs["ceiling"][SEND_PER_REQUEST]["p50"]
    title = f"In front of vLLM's app, µs p50 per request (c={options.concurrency})"
    bar_chart(chart_path(path), title, bars, "µs", horizontal=True)


if __name__ == "__main__":
    main()
