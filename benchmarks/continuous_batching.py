"""transformers' own continuous batching (paged attention) against this project's scheduler, engine
against engine, with equal outputs checked token by token.

Both run in this process on the same model folder, without HTTP:

- this project: `TransformersBackend` (engines/generation/transformers: one engine thread, left-padded
  KV batch), driven through `generate()` by concurrent asyncio clients, the calls the OpenAI layer makes;
- transformers: the `ContinuousBatchingManager` of `model.init_continuous_batching(...)` (the manager that
  `generate_batch` wraps), driven by the same clients through `add_request` + `register_result_handler`.
  Its attention is paged; `--cb-attn` picks the implementation the installed transformers accepts on
  this device (`sdpa` or `paged|eager`; flash kernels on GPU).

Workload at each concurrency c: c clients, each sending `--rounds` requests one after another (a closed
loop, at least `--min-requests` per level), prompts cycled from benchmarks/generation.py, greedy, eos
ignored so every request generates exactly `--max-tokens` tokens. Each engine gets its own copy of the
model. transformers' prefix sharing (block reuse across requests with a common prompt prefix) is off
unless `--prefix-sharing`: the prompts repeat, and this scheduler has no prefix cache, so sharing would
measure cache hits rather than batching.

Reported per level and engine: output tokens/s (all generated tokens / wall time), wall time, median
request latency (submission to last token). Every request's generated token ids must be equal between
the two engines; mismatches are listed, and the exit status is 1 when there are any. Prints a table,
writes JSON to benchmarks/results/ and a PNG chart beside it.

    nice -n 19 .venv/bin/python -m benchmarks.continuous_batching                 # the tiny Llama
    nice -n 19 .venv/bin/python -m benchmarks.continuous_batching --smollm2 --max-tokens 64
    nice -n 19 .venv/bin/python -m benchmarks.continuous_batching --concurrency 8 --max-tokens 4 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.utils import WorkloadHints

from benchmarks.charts import chart_path, concurrency_chart
from benchmarks.generation import PROMPTS, tiny_llama
from benchmarks.report import print_table, write_results
from engines.generation.backend import GenerationRequest, SamplingOptions
from engines.generation.transformers import TransformersBackend
from settings.arguments import parse_arguments
from settings.loading import ModelSource, inspect_model

OURS, THEIRS = "scheduler", "transformers_cb"


def workload(prompts: list[list[int]], concurrency: int, rounds: int) -> list[list[list[int]]]:
    """Each client's prompts, in the order it sends them."""
    return [[prompts[(c * rounds + r) % len(prompts)] for r in range(rounds)] for c in range(concurrency)]


async def closed_loop(clients: list[list[list[int]]], send: Any) -> tuple[list[list[list[int]]], float, list[float]]:
    """Run every client's requests one after another, clients concurrently: (token ids per client and
    request, wall seconds, each request's latency)."""
    latencies: list[float] = []

    async def client(index: int, prompts: list[list[int]]) -> list[list[int]]:
        outputs = []
        for round_, ids in enumerate(prompts):
            submitted = time.perf_counter()
            outputs.append(await send(f"c{index}-r{round_}-{time.monotonic_ns()}", ids))
            latencies.append(time.perf_counter() - submitted)
        return outputs

    started = time.perf_counter()
    results = await asyncio.gather(*(client(i, p) for i, p in enumerate(clients)))
    return list(results), time.perf_counter() - started, latencies


async def run_ours(backend: TransformersBackend, clients: list[list[list[int]]], max_tokens: int) -> Any:
    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def send(request_id: str, ids: list[int]) -> list[int]:
        tokens: list[int] = []
        async for output in backend.generate(GenerationRequest(request_id, tuple(ids), sampling)):
            for delta in output.choices:
                tokens += delta.token_ids
        return tokens

    return await closed_loop(clients, send)


def start_manager(model: Any, concurrency: int, longest_prompt: int, options: argparse.Namespace) -> Any:
    """transformers' manager sized for this level, as `generate_batch` sizes it (workload hints)."""
    generation_config = GenerationConfig(
        max_new_tokens=options.max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    # Sized for this workload: left to itself on a CPU, transformers sizes the cache from the machine's whole
    # memory (0.9 of it) and gets the process killed. Blocks for every in-flight request at full length, and
    # a batch that prefills every client's prompt at once (as our scheduler can).
    page_size = ContinuousBatchingConfig.page_size
    blocks_per_request = -(-(longest_prompt + options.max_tokens) // page_size) + 1
    cb_config = ContinuousBatchingConfig(
        allow_block_sharing=options.prefix_sharing,
        num_blocks=concurrency * blocks_per_request,
        max_batch_tokens=max(64, concurrency * longest_prompt),
        max_requests_per_batch=concurrency,
    )
    manager = model.init_continuous_batching(
        generation_config=generation_config,
        continuous_batching_config=cb_config,
        workload_hints=WorkloadHints(
            max_prompt_length=longest_prompt,
            max_generated_length=options.max_tokens,
            num_requests=concurrency * options.rounds,
        ),
    )
    manager.warmup()
    manager.start()
    return manager


async def run_theirs(manager: Any, clients: list[list[list[int]]], max_tokens: int) -> Any:
    async def send(request_id: str, ids: list[int]) -> list[int]:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        manager.register_result_handler(request_id, lambda out: out.is_finished() and done.set_result(out))
        # add_request may block while its input queue is full: off the event loop.
        await asyncio.to_thread(manager.add_request, ids, request_id=request_id, max_new_tokens=max_tokens)
        output = await done
        if output.error:
            raise RuntimeError(f"transformers' continuous batching failed request {request_id}: {output.error}")
        return list(output.generated_tokens)

    return await closed_loop(clients, send)


def level_figures(concurrency: int, results: Any) -> dict[str, Any]:
    outputs, wall, latencies = results
    tokens = sum(len(ids) for client in outputs for ids in client)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "output_tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "latency_median_ms": statistics.median(latencies) * 1000,
    }


def mismatches(ours: list[list[list[int]]], theirs: list[list[list[int]]], concurrency: int) -> list[dict[str, Any]]:
    found = []
    for client, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
        for round_, (a, b) in enumerate(zip(mine, other, strict=True)):
            if a != b:
                first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                found.append(
                    {
                        "concurrency": concurrency,
                        "client": client,
                        "round": round_,
                        "first_difference": first,
                        "scheduler": a,
                        "transformers_cb": b,
                    }
                )
    return found


def model_folder(options: argparse.Namespace) -> Path:
    if options.smollm2:
        from tests.real_models import smollm2_folder

        return smollm2_folder()
    return Path(options.model_dir) if options.model_dir else tiny_llama()


async def main_async(options: argparse.Namespace) -> dict[str, Any]:
    folder = model_folder(options)
    args = parse_arguments({"model_dir": str(folder), "backend": "huggingface"}, environ={})
    source: ModelSource = inspect_model(args)
    ours = TransformersBackend(source, args, max_num_seqs=max(options.concurrency))
    await ours.start()  # loads its model and runs its warm-up generation
    theirs_model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=source.dtype, attn_implementation=options.cb_attn
    ).to(source.device)
    theirs_model.eval()
    prompts = [list(source.tokenizer(p)["input_ids"]) for p in PROMPTS]
    longest = max(len(p) for p in prompts)
    await run_ours(ours, workload(prompts, 2, 1), 4)  # first batched steps allocate and pick kernels
    figures: dict[str, Any] = {OURS: [], THEIRS: [], "mismatches": []}
    for concurrency in options.concurrency:
        rounds = max(options.rounds, -(-options.min_requests // concurrency))
        clients = workload(prompts, concurrency, rounds)
        mine = await run_ours(ours, clients, options.max_tokens)
        manager = await asyncio.to_thread(start_manager, theirs_model, concurrency, longest, options)
        try:
            other = await run_theirs(manager, clients, options.max_tokens)
        finally:
            await asyncio.to_thread(manager.stop, True, 30)
            manager.destroy()
        figures[OURS].append(level_figures(concurrency, mine))
        figures[THEIRS].append(level_figures(concurrency, other))
        figures["mismatches"] += mismatches(mine[0], other[0], concurrency)
        print(
            f"c={concurrency:<3} scheduler {figures[OURS][-1]['tokens_per_s']:8.1f} tok/s   "
            f"transformers CB {figures[THEIRS][-1]['tokens_per_s']:8.1f} tok/s",
            flush=True,
        )
    await ours.stop()
    return {
        "model_dir": str(folder),
        "max_tokens": options.max_tokens,
        "rounds": options.rounds,
        "cb_attn_implementation": options.cb_attn,
        "prefix_sharing": options.prefix_sharing,
        "device": str(source.device),
        "dtype": str(source.dtype),
        "torch_threads": torch.get_num_threads(),
        "outputs_equal": not figures["mismatches"],
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model-dir", help="a causal LM folder (default: the tiny Llama of the tests)")
    model.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct (tests/real_models.py)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends one after another")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--cb-attn", default="sdpa", help="transformers' attention for continuous batching: sdpa or paged|eager"
    )
    parser.add_argument("--prefix-sharing", action="store_true", help="let transformers share prompt-prefix blocks")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's); 1 suits tiny models on busy CPUs"
    )
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # its per-level warm-up and sizing chatter
    figures = asyncio.run(main_async(options))
    labels = {OURS: "this project's scheduler", THEIRS: f"transformers continuous batching (paged, {options.cb_attn})"}
    rows = []
    for mine, other in zip(figures[OURS], figures[THEIRS], strict=True):
        for name, level in ((labels[OURS], mine), (labels[THEIRS], other)):
            rows.append(
                [
                    name,
                    str(level["concurrency"]),
                    str(level["requests"]),
                    f"{level['tokens_per_s']:.0f}",
                    f"{level['seconds']:.2f}",
                    f"{level['latency_median_ms']:.0f}",
                    f"{level['tokens_per_s'] / other['tokens_per_s']:.2f}x",
                ]
            )
    print()
    print_table(
        ["engine", "concurrency", "requests", "output tok/s", "time s", "latency p50 ms", "vs transformers CB"],
        rows,
    )
    json_path = write_results("continuous_batching", figures)
    concurrency_chart(
        chart_path(json_path),
        f"Continuous batching, {Path(figures['model_dir']).name}: {figures['max_tokens']} greedy tokens per request",
        {labels[k]: {level["concurrency"]: level["tokens_per_s"] for level in figures[k]} for k in (OURS, THEIRS)},
        latency={
            labels[k]: {level["concurrency"]: level["latency_median_ms"] for level in figures[k]}
            for k in (OURS, THEIRS)
        },
        throughput_label="output tokens/s",
        latency_label="request latency p50 (ms)",
    )
    if figures["mismatches"]:
        first = figures["mismatches"][0]
        print(
            f"\nOUTPUTS DIFFER in {len(figures['mismatches'])} requests; first: c={first['concurrency']} "
            f"client {first['client']} round {first['round']} at token {first['first_difference']}",
            file=sys.stderr,
        )
        raise SystemExit(1)
    print("\noutputs equal: every request's token ids are the same on both engines")


if __name__ == "__main__":
    main()
