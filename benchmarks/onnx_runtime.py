"""ONNX Runtime against torch eager for the encoder tasks, in-process, same run (issue 11, point 4).

The question it answers: would serving encoders through ONNX Runtime pay on this CPU? The bar is
at least 1.3× torch's inputs/s with outputs equal to torch's within 1e-4; below it, a `runtime=onnx`
argument is not worth its export step and second code path.

For the embedded all-MiniLM-L6-v2 (`embed`: mean pooled and normalized) and the same encoder under a
seeded 2-label head (`classify`: softmax), the model is exported once to ONNX into a cache folder
(dynamic batch and sequence axes), also fused by onnxruntime's BERT optimizer when the wheel has it,
and then, per batch size, torch eager and each ONNX session run tokenize + forward + pool on the same
sentence, `--reps` times interleaved so drift hits all alike; medians are reported. Tokenization and
pooling are the same code for all, so the ratio is the forward pass's plus what it costs to cross
from numpy to torch. The max abs difference of the outputs against torch's is measured per batch size.

onnxruntime is not a dependency of the server; install it outside the project's venv, without the
dependencies the venv already has (newer copies would shadow its numpy and protobuf):

    .venv/bin/pip install --no-deps --target /tmp/ortpkgs onnxruntime onnx onnxscript onnx_ir flatbuffers
    PYTHONPATH=/tmp/ortpkgs .venv/bin/python -m benchmarks.onnx_runtime [--seconds 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.charts import chart_path, lines_chart
from benchmarks.encoder_ceiling import load_encoder, run_batch
from benchmarks.encoder_throughput import SENTENCE, classifier_dir, minilm_dir
from benchmarks.report import print_table, write_results

CACHE_DIR = Path("/tmp/hf-serve-bench/onnx")
BATCH_SIZES = (1, 8, 32, 64)
TOLERANCE = 1e-4  # the bar for "outputs equal to torch's"
SPEEDUP_BAR = 1.3
INSTALL = (
    ".venv/bin/pip install --no-deps --target /tmp/ortpkgs onnxruntime onnx onnxscript onnx_ir flatbuffers,"
    " then run with PYTHONPATH=/tmp/ortpkgs"
)

Runner = Callable[[list[str]], torch.Tensor]


class _Outputs(torch.nn.Module):
    """The model with plain tensor inputs and one tensor out, the shape the exporter wants."""

    def __init__(self, model: torch.nn.Module, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.logits if self.task == "classify" else out.last_hidden_state


def export(tokenizer: Any, model: torch.nn.Module, task: str) -> Path:
    """model.onnx in the cache folder, exported on first use only."""
    path = CACHE_DIR / task / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = dict(tokenizer([SENTENCE, "short"], padding=True, return_tensors="pt"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    started = time.perf_counter()
    print(f"exporting {task} to {path} ...", flush=True)
    # The TorchScript exporter (dynamo=False) gives the graph onnxruntime's BERT fusions recognize.
    # .eval() on the wrapper: a new Module is in training mode, and the exporter restores that mode
    # afterwards, recursively, which would leave the measured torch model running its dropout.
    torch.onnx.export(
        _Outputs(model, task).eval(),
        tuple(sample[name] for name in names),
        str(path),
        input_names=names,
        output_names=["output"],
        dynamic_axes={**axes, "output": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    model.eval()
    print(f"exported in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def optimized(path: Path, model: torch.nn.Module) -> Path | None:
    """The BERT-fused graph (attention, layer norm, GELU), or None when the wheel lacks the optimizer."""
    fused = path.with_name("model-optimized.onnx")
    if fused.exists():
        return fused
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as error:
        print(f"no onnxruntime BERT optimizer ({error}); measuring the plain export only")
        return None
    config = model.config
    optimize_model(
        str(path), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    ).save_model_to_file(str(fused))
    return fused


def ort_runner(ort: Any, path: Path, tokenizer: Any, task: str) -> Runner:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}  # the optimizer may drop an unused input

    def run(texts: list[str]) -> torch.Tensor:
        inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
        feed = {name: value for name, value in inputs.items() if name in wanted}
        (output,) = session.run(None, feed)
        with torch.inference_mode():
            out = torch.from_numpy(output)
            if task == "classify":
                return out.softmax(-1)
            # Pooling exactly as encoder_ceiling.run_batch does it.
            mask = torch.from_numpy(inputs["attention_mask"]).unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return run


def rate(run: Runner, batch: list[str], seconds: float) -> float:
    run(batch)  # warm-up: first-call allocations and kernel choices
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def measure_task(ort: Any, task: str, seconds: float, reps: int) -> dict[str, Any]:
    folder = classifier_dir() if task == "classify" else minilm_dir()
    tokenizer, model = load_encoder(folder, task)
    plain = export(tokenizer, model, task)
    runners: dict[str, Runner] = {
        "torch": lambda texts: run_batch(tokenizer, model, task, texts),
        "onnxruntime": ort_runner(ort, plain, tokenizer, task),
    }
    fused = optimized(plain, model)
    if fused is not None:
        runners["onnxruntime, BERT-fused"] = ort_runner(ort, fused, tokenizer, task)

    # Outputs on texts of different lengths, so padding is exercised.
    mixed = [f"{SENTENCE} " * (1 + i % 4) for i in range(max(BATCH_SIZES))]
    max_diff = {
        name: {size: float((runner(mixed[:size]) - runners["torch"](mixed[:size])).abs().max()) for size in BATCH_SIZES}
        for name, runner in runners.items()
        if name != "torch"
    }
    samples: dict[str, dict[int, list[float]]] = {name: {size: [] for size in BATCH_SIZES} for name in runners}
    steps = tqdm(total=reps * len(BATCH_SIZES) * len(runners), desc=task, unit="step", leave=False)
    for _ in range(reps):
        for size in BATCH_SIZES:
            for name, runner in runners.items():
                samples[name][size].append(rate(runner, [SENTENCE] * size, seconds))
                steps.update()
    steps.close()
    medians = {name: {size: statistics.median(v) for size, v in by_size.items()} for name, by_size in samples.items()}
    return {"inputs_per_s": medians, "samples": samples, "max_abs_diff": max_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per step")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, interleaved; medians are reported")
    parser.add_argument("--threads", type=int, help="intra-op threads for both runtimes (default: torch's)")
    parser.add_argument("--task", action="append", choices=["embed", "classify"], help="default: both")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        import onnxruntime as ort
    except ImportError:
        print(f"onnxruntime is not importable, nothing measured. Install it outside the venv: {INSTALL}")
        sys.exit(0)
    # The load average goes with the figures: on a shared 2-core machine torch's OpenMP threads suffer
    # far more from other processes than onnxruntime's pool, which inflates the ratio.
    load = os.getloadavg()[0]
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}; threads: {torch.get_num_threads()}; load {load:.1f}"
    )

    figures: dict[str, Any] = {
        "onnxruntime": ort.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "seconds": options.seconds,
        "reps": options.reps,
    }
    rows = []
    for task in options.task or ["embed", "classify"]:
        result = figures[task] = measure_task(ort, task, options.seconds, options.reps)
        rates = result["inputs_per_s"]
        best_torch = max(rates["torch"].values())
        for name, by_size in rates.items():
            for size, value in by_size.items():
                diff = result["max_abs_diff"].get(name, {}).get(size)
                rows.append(
                    [
                        task,
                        name,
                        str(size),
                        f"{value:.0f}",
                        f"{value / rates['torch'][size]:.2f}x",
                        "" if diff is None else f"{diff:.1e}",
                    ]
                )
        verdicts = {}
        for name in rates:
            if name == "torch":
                continue
            speedup = max(rates[name].values()) / best_torch
            equal = max(result["max_abs_diff"][name].values()) <= TOLERANCE
            verdicts[name] = {"best_vs_torch_best": speedup, "within_tolerance": equal}
            verdict = "pays" if speedup >= SPEEDUP_BAR and equal else "does not pay"
            print(f"{task}, {name}: best {speedup:.2f}x torch's best, outputs within 1e-4: {equal} -> {verdict}")
        result["verdict"] = verdicts

    print()
    print_table(["task", "runtime", "batch", "inputs/s", "vs torch", "max abs diff"], rows)
    json_path = write_results("onnx_runtime", figures)
    panels = [(figures[task]["inputs_per_s"], f"{task}: inputs/s") for task in options.task or ["embed", "classify"]]
    lines_chart(
        chart_path(json_path),
        f"torch eager vs onnxruntime, medians of {options.reps}",
        panels,
        x_label="batch size",
    )


if __name__ == "__main__":
    main()
