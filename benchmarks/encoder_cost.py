"""How an encoder request's cost grows: tokens per input and inputs per request, against the in-process ceiling.

Serves the embedded all-MiniLM-L6-v2 with `bentoml serve` and sends V1 requests of 1, 8 and 32 inputs of
8, 64 and 256 tokens each (exact, checked with the model's tokenizer), closed loop at `--concurrency`
(load from wrk when installed). The in-process ceiling (tokenize + forward + pool at batch 32) of each
length is measured first, in the same run; a cell lasts long enough for each client to finish ~3
requests. Throughput should follow the ceiling's curve (cost ~ tokens, not requests), and p99 should grow
with the work a request carries, not jump. Prints a table, writes JSON and a PNG chart to
benchmarks/results/.

    .venv/bin/python -m benchmarks.encoder_cost [--seconds 8] [--concurrency 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import AutoTokenizer

from benchmarks.charts import chart_path, lines_chart
from benchmarks.encoder_ceiling import inputs_per_second
from benchmarks.encoder_throughput import minilm_dir
from benchmarks.load import closed_loop, generator_name
from benchmarks.report import print_table, write_results
from tests.server_process import ServerProcess

TOKENS = (8, 64, 256)
INPUTS = (1, 8, 32)


def text_of_tokens(tokenizer: Any, tokens: int) -> str:
    """A text that tokenizes to exactly `tokens` ids, special tokens included."""
    text = " ".join(["paris"] * (tokens - 2))
    count = len(tokenizer(text)["input_ids"])
    if count != tokens:
        raise RuntimeError(f"expected {tokens} tokens, the tokenizer gives {count}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per cell")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    options = parser.parse_args()
    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = {tokens: text_of_tokens(tokenizer, tokens) for tokens in TOKENS}
    print(f"load generator: {generator_name()}")

    ceiling = {
        tokens: inputs_per_second(folder, "embed", texts[tokens], [32], options.seconds / 2)[32] for tokens in TOKENS
    }
    logs = Path("/tmp/hf-serve-bench")
    logs.mkdir(parents=True, exist_ok=True)
    server = ServerProcess({}, logs / "encoder-cost.log").wait_ready()
    cells: dict[tuple[int, int], dict[str, float]] = {}
    try:
        url = f"{server.url}/v1/models/model:predict"
        closed_loop(url, {"instances": [texts[64]] * 8}, options.concurrency, 3)  # warm-up
        grid = [(tokens, inputs) for tokens in TOKENS for inputs in INPUTS]
        for tokens, inputs in tqdm(grid, desc=f"at least {options.seconds:g} s per cell", unit="cell"):
            # Long enough for every client to finish ~3 requests at the ceiling's pace, so p99 means something.
            seconds = max(options.seconds, 3 * options.concurrency * inputs / ceiling[tokens])
            result = closed_loop(url, {"instances": [texts[tokens]] * inputs}, options.concurrency, seconds)
            cells[tokens, inputs] = {**result, "inputs_per_s": result["requests_per_s"] * inputs}
    finally:
        server.stop()

    rows = []
    for (tokens, inputs), cell in cells.items():
        rows.append([
            str(tokens), str(inputs), f"{cell['requests_per_s']:.1f}", f"{cell['inputs_per_s']:.0f}",
            f"{cell['inputs_per_s'] * tokens:.0f}", f"{cell['p50_ms']:.0f}", f"{cell['p99_ms']:.0f}",
            f"{cell['inputs_per_s'] / ceiling[tokens]:.2f}x", str(cell["failures"]),
        ])  # fmt: skip
    print_table(
        ["tokens/input", "inputs/request", "requests/s", "inputs/s", "tokens/s", "p50 ms", "p99 ms",
         "of ceiling", "failures"],
        rows,
    )  # fmt: skip
    print("\nin-process ceiling (batch 32): " + ", ".join(f"{t} tokens {r:.0f} inputs/s" for t, r in ceiling.items()))
    json_path = write_results(
        "encoder_cost",
        {
            "generator": generator_name(),
            "concurrency": options.concurrency,
            "seconds": options.seconds,
            "cells": [{"tokens": t, "inputs": i, **cell} for (t, i), cell in cells.items()],
            "in_process_inputs_per_s_batch_32": {str(t): r for t, r in ceiling.items()},
        },
    )
    by_inputs = {f"{i} input(s)/request": {t: cells[t, i]["inputs_per_s"] for t in TOKENS} for i in INPUTS}
    lines_chart(
        chart_path(json_path),
        f"all-MiniLM-L6-v2, V1 predict, {options.concurrency} clients: cost by tokens and inputs",
        [
            ({**by_inputs, "in-process, batch 32": ceiling}, "inputs/s"),
            ({f"{i} input(s)/request": {t: cells[t, i]["p99_ms"] for t in TOKENS} for i in INPUTS}, "p99 latency (ms)"),
        ],
        x_label="tokens per input",
    )


if __name__ == "__main__":
    main()
