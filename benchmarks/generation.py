"""Generation throughput: the continuously batched transformers backend beside a one-at-a-time baseline.

Both run the same model in the same process and run: the baseline is the same backend limited to one
sequence at a time (max_num_seqs=1), which is how KServe's transformers backend serves (a queue in
front of one generate() at a time). At concurrency 1, 8 and 32 each client sends `--rounds`
requests one after another, at least `--min-requests` per level (greedy, `--max-tokens` tokens,
eos ignored so every request generates the same number of tokens), and the script reports:

- output tokens/s: all generated tokens / wall time of the level;
- TTFT: time from submitting a request to its first token (queueing included), median and p90;
- TPOT: (last token time - first token time) / (tokens - 1) per request, median.

With `--structured`, the batched backend runs each level again with every row constrained by an
xgrammar regex that never completes, so the difference is the cost of structured outputs.

Prints a table and writes JSON to benchmarks/results/.

    .venv/bin/python -m benchmarks.generation                    # the tiny Llama of tests/tiny_models.py
    .venv/bin/python -m benchmarks.generation --model-dir /models/x --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.charts import chart_path, concurrency_chart
from benchmarks.report import print_table, write_results
from engines.generation.backend import GenerationRequest, SamplingOptions, StructuredOutput
from engines.generation.transformers import TransformersBackend
from settings.arguments import parse_arguments
from settings.loading import inspect_model

PROMPTS = [
    "Paris is the capital of France and",
    "The quick brown fox jumps over the lazy dog near the old house, and then",
    "Hello world! How are you today?",
    "Machine learning models read text and predict labels for every token. The model answers",
    "Please write a short story about a cat who lives in a small town.",
    "The children play football in the park after school every day, while",
    "Water is wet, fire is hot, ice is cold and",
    "My friend Peter travels by plane to Tokyo and by boat to Lisbon because",
]


def tiny_llama() -> Path:
    from tests.conftest import build_cached_tiny_models

    return build_cached_tiny_models()["llama"]


# A constraint that never completes (so every request still generates max_tokens tokens): every row pays
# xgrammar's bitmask fill and apply at every step, which is the overhead of structured outputs.
STRUCTURED = StructuredOutput("regex", r"[^\n]*")


async def run_level(
    backend: TransformersBackend,
    prompts: list[list[int]],
    concurrency: int,
    rounds: int,
    max_tokens: int,
    structured: StructuredOutput | None = None,
) -> dict[str, Any]:
    ttfts: list[float] = []
    tpots: list[float] = []
    tokens = 0
    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, structured=structured)

    async def client(index: int) -> None:
        nonlocal tokens
        for round_ in range(rounds):
            ids = prompts[(index * rounds + round_) % len(prompts)]
            submitted = time.perf_counter()
            first = last = None
            count = 0
            async for output in backend.generate(GenerationRequest(f"b{index}-{round_}", ids, sampling)):
                now = time.perf_counter()
                new = sum(len(c.token_ids) for c in output.choices)
                if new and first is None:
                    first = now
                if new:
                    last = now
                count += new
            assert first is not None and last is not None
            ttfts.append(first - submitted)
            if count > 1:
                tpots.append((last - first) / (count - 1))
            tokens += count

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    ttfts.sort()
    return {
        "concurrency": concurrency,
        "requests": concurrency * rounds,
        "output_tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_ms": statistics.median(ttfts) * 1000,
        "ttft_p90_ms": ttfts[int(0.9 * (len(ttfts) - 1))] * 1000,
        "tpot_median_ms": statistics.median(tpots) * 1000 if tpots else 0.0,
    }


async def main_async(options: argparse.Namespace) -> dict[str, Any]:
    model_dir = Path(options.model_dir) if options.model_dir else tiny_llama()
    args = parse_arguments({"model_dir": str(model_dir), "backend": "huggingface"}, environ={})
    source = inspect_model(args)
    batched = TransformersBackend(source, args, max_num_seqs=max(options.concurrency))
    await batched.start()
    baseline = TransformersBackend(source, args, model=batched.model, max_num_seqs=1)
    await baseline.start()
    prompts = [list(source.tokenizer(p)["input_ids"]) for p in PROMPTS]
    # Warm-up (first forward passes allocate and pick kernels).
    await run_level(batched, prompts, 2, 1, 8)
    await run_level(baseline, prompts, 1, 1, 8)
    results: dict[str, list[dict[str, Any]]] = {"baseline": [], "batched": [], "batched_structured": []}
    runs: list[tuple[str, TransformersBackend, StructuredOutput | None]] = [
        ("batched", batched, None),
        ("baseline", baseline, None),
    ]
    if options.structured:
        runs.append(("batched_structured", batched, STRUCTURED))
    progress = tqdm([(c, *run) for c in options.concurrency for run in runs], unit="level")
    for concurrency, name, backend, structured in progress:
        rounds = max(options.rounds, -(-options.min_requests // concurrency))
        level = await run_level(backend, prompts, concurrency, rounds, options.max_tokens, structured)
        results[name].append(level)
        progress.write(
            f"{name:18} c={concurrency:<3} {level['tokens_per_s']:8.1f} tok/s  "
            f"TTFT {level['ttft_median_ms']:7.1f} ms  TPOT {level['tpot_median_ms']:6.2f} ms"
        )
    await baseline.stop()
    await batched.stop()
    return {
        "model_dir": str(model_dir),
        "max_tokens": options.max_tokens,
        "rounds": options.rounds,
        "torch_threads": torch.get_num_threads(),
        **results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a causal LM folder (default: the tiny Llama of the tests)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends one after another")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's); 1 suits tiny models on busy CPUs"
    )
    parser.add_argument(
        "--structured", action="store_true", help="also run the batched backend with every row grammar-constrained"
    )
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    figures = asyncio.run(main_async(options))
    rows = []
    structured = figures["batched_structured"] or [None] * len(figures["batched"])
    for base, batch, constrained in zip(figures["baseline"], figures["batched"], structured, strict=True):
        levels = [("one at a time", base), ("batched", batch)]
        if constrained is not None:
            levels.append(("batched, every row constrained", constrained))
        for name, level in levels:
            rows.append(
                [
                    name,
                    str(level["concurrency"]),
                    f"{level['tokens_per_s']:.0f}",
                    f"{level['ttft_median_ms']:.1f}",
                    f"{level['ttft_p90_ms']:.1f}",
                    f"{level['tpot_median_ms']:.2f}",
                    f"{level['tokens_per_s'] / base['tokens_per_s']:.1f}x" if level is not base else "",
                ]
            )
    print()
    print_table(
        ["backend", "concurrency", "output tok/s", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "speed-up"], rows
    )
    json_path = write_results("generation", figures)
    labels = {"batched": "continuous batching", "baseline": "one at a time (KServe's way)"}
    concurrency_chart(
        chart_path(json_path),
        f"Generation, transformers backend: {figures['max_tokens']} tokens per request",
        {labels[k]: {level["concurrency"]: level["tokens_per_s"] for level in figures[k]} for k in labels},
        latency={labels[k]: {level["concurrency"]: level["ttft_p90_ms"] for level in figures[k]} for k in labels},
        throughput_label="output tokens/s",
        latency_label="TTFT p90 (ms)",
    )


if __name__ == "__main__":
    main()
