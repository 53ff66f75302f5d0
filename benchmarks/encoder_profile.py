"""Where an encoder request's time goes under load: CPU per request by thread, and how full the batches are.

Serves the embedded model (or `--arg NAME=VALUE ...`), loads it with wrk (aiohttp without it) at `--concurrency`
clients, one sentence per request by default, on KServe V1 `:predict` (or `--route embed` for TEI's /embed, `root`
for POST /, `openai` for /openai/v1/embeddings), and reads, over the measured seconds:
- each thread's CPU time from /proc/PID/task/*/stat, grouped by the OS thread name the batcher gives its threads
  (`hf-forward` with the OpenMP threads it starts, `hf-express`, `hf-tokenize-N`; the event loop is the main
  thread; anything else is `other`), per request served;
- the batcher's `encoder_batch_rows` and `encoder_forward_pass_seconds` histograms from /metrics: passes, rows
  per pass and how they spread (passes of 1, 2-4, 5-8, 9-16, 17-32 rows), and the share of the time the
  forward lanes were running a pass.
Prints a table and writes JSON to benchmarks/results/ (no chart: a handful of numbers).

    .venv/bin/python -m benchmarks.encoder_profile [--concurrency 32] [--inputs 1] [--seconds 10] [--route v1]
        [--arg ...]
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.encoder_throughput import SENTENCE
from benchmarks.load import closed_loop, generator_name
from benchmarks.report import print_table, write_results
from tests.server_process import ServerProcess

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Bucket bounds of `encoder_batch_rows` the profile reports passes by: how even the lanes' passes are.
ROWS_BOUNDS = ("1.0", "4.0", "8.0", "16.0", "32.0", "+Inf")
# Each route's path and the body of `inputs` sentences it takes.
ROUTES = {
    "v1": ("/v1/models/model:predict", "instances"),
    "embed": ("/embed", "inputs"),
    "root": ("/", "inputs"),  # where huggingface_hub's InferenceClient posts
    "openai": ("/openai/v1/embeddings", "input"),
}


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread name of process `pid`."""
    totals: dict[str, float] = defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm, open(f"/proc/{pid}/task/{tid}/stat") as stat:
                name, fields = comm.read().strip(), stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        group = "event loop (main thread)" if int(tid) == pid else name if name.startswith("hf-") else "other"
        totals[group] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


def batcher_figures(url: str) -> dict[str, float]:
    """Sums of the forward lane's pass histograms (rows and seconds) in /metrics."""
    figures: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.labels.get("lane") != "forward":
                continue
            if sample.name.endswith(("_count", "_sum")):
                figures[sample.name] += sample.value
            elif sample.name == "encoder_batch_rows_bucket" and sample.labels["le"] in ROWS_BOUNDS:
                figures[f"passes of rows <= {sample.labels['le']}"] += sample.value  # cumulative, as Prometheus's
    return figures


def rows_distribution(passes: dict[str, float]) -> dict[str, float]:
    """Passes per range of rows ("1", "2-4", ..., "over 32") from the cumulative bucket counts."""
    distribution: dict[str, float] = {}
    below, low = 0.0, 1
    for bound in ROWS_BOUNDS:
        upto = passes.get(f"passes of rows <= {bound}", 0.0)
        high = None if bound == "+Inf" else int(float(bound))
        label = f"over {low - 1}" if high is None else str(high) if high == low else f"{low}-{high}"
        distribution[label] = upto - below
        below, low = upto, (high or 0) + 1
    return distribution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=1, help="sentences per request")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--route",
        choices=sorted(ROUTES),
        default="v1",
        help="the route loaded (embed and openai need an embedding model)",
    )
    parser.add_argument("--arg", action="append", default=[], help="server argument NAME=VALUE (repeat)")
    options = parser.parse_args()
    server_args = dict(item.split("=", 1) for item in options.arg)
    logs = Path("/tmp/hf-serve-bench")
    logs.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(server_args, logs / "encoder-profile.log").wait_ready()
    try:
        path, field = ROUTES[options.route]
        url, body = f"{server.url}{path}", {field: [SENTENCE] * options.inputs}
        closed_loop(url, body, options.concurrency, 2)  # warm-up
        # The worker serving requests: the process under `bentoml serve` with torch's threads.
        worker = max(psutil.Process(server.process.pid).children(recursive=True), key=lambda p: p.num_threads())
        cpu_before, passes_before = thread_cpu_seconds(worker.pid), batcher_figures(server.url)
        load = closed_loop(url, body, options.concurrency, options.seconds)
        cpu_after, passes_after = thread_cpu_seconds(worker.pid), batcher_figures(server.url)
    finally:
        server.stop()

    requests = load["requests"]
    cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    passes = {name: passes_after[name] - passes_before.get(name, 0.0) for name in passes_after}
    count = passes.get("encoder_batch_rows_count", 0.0)
    figures = {
        "generator": generator_name(),
        "concurrency": options.concurrency,
        "inputs_per_request": options.inputs,
        "route": options.route,
        "seconds": options.seconds,
        "server_args": server_args,
        "load": load,
        "cpu_ms_per_request": {name: 1000 * seconds / requests for name, seconds in cpu.items() if seconds > 0},
        "cpu_cores_used": sum(cpu.values()) / options.seconds,
        "passes": count,
        "rows_per_pass": passes.get("encoder_batch_rows_sum", 0.0) / count if count else 0.0,
        "forward_busy_share": passes.get("encoder_forward_pass_seconds_sum", 0.0) / options.seconds,
        "passes_by_rows": rows_distribution(passes),
    }
    rows = [[name, f"{ms:.2f}"] for name, ms in sorted(figures["cpu_ms_per_request"].items(), key=lambda kv: -kv[1])]
    rows += [
        ["all threads: cores used", f"{figures['cpu_cores_used']:.2f}"],
        ["requests/s", f"{load['requests_per_s']:.0f}"],
        ["forward passes", f"{count:.0f}"],
        ["rows per pass", f"{figures['rows_per_pass']:.1f}"],
        # Summed over the lanes: 200% is two lanes each always in a pass.
        ["forward lanes busy (sum)", f"{100 * figures['forward_busy_share']:.0f}%"],
        *([f"passes of {rows} row(s)", f"{count:.0f}"] for rows, count in figures["passes_by_rows"].items()),
    ]
    print_table(["thread (CPU ms per request) / figure", "value"], rows)
    write_results("encoder_profile", figures)


if __name__ == "__main__":
    main()
