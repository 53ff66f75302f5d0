"""The in-process ceiling of an encoder: tokenize + forward + pool (or softmax), batched, no server.

What the model costs on this machine with nothing in front of it, measured in the same run as the
servers so ratios compare. Plain transformers calls, as the plain BentoML peer makes them: in one process with
torch's threads (`inputs_per_second`), and in one single-threaded process per core at once
(`per_core_inputs_per_second`): what the cores give with no OpenMP threads sharing a pass and no GIL shared
(on 2 cores ~1.2x the first for all-MiniLM-L6-v2), the best this hardware does with this model; and the
server's own runtime with nothing in front (`traced_lanes_inputs_per_second`): the model traced as the server
traces it (handlers/traced.py), one single-threaded loop per core on threads of one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from handlers.traced import trace_encoder


def load_encoder(folder: Path, task: str) -> tuple[object, torch.nn.Module]:
    model_class = AutoModelForSequenceClassification if task == "classify" else AutoModel
    return AutoTokenizer.from_pretrained(folder), model_class.from_pretrained(folder).eval()


def run_batch(tokenizer: object, model: torch.nn.Module, task: str, texts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")  # type: ignore[operator]
        if task == "classify":
            return model(**inputs).logits.softmax(-1)
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def inputs_per_second(folder: Path, task: str, text: str, batch_sizes: list[int], seconds: float) -> dict[int, float]:
    """Inputs/s of `run_batch` on `text` repeated, per batch size (after one warm-up batch each)."""
    tokenizer, model = load_encoder(folder, task)
    rates: dict[int, float] = {}
    for size in tqdm(batch_sizes, desc=f"in-process ceiling ({task})", unit="batch size", leave=False):
        run_batch(tokenizer, model, task, [text] * size)
        rates[size] = _rate(tokenizer, model, task, [text] * size, seconds)
    return rates


def _rate(tokenizer: object, model: torch.nn.Module, task: str, batch: list[str], seconds: float) -> float:
    """Inputs/s of `run_batch` on `batch`, repeated for `seconds`."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run_batch(tokenizer, model, task, batch)
        done += len(batch)
    return done / (time.perf_counter() - started)


def per_core_inputs_per_second(
    folder: Path, task: str, text: str, batch_sizes: list[int], seconds: float, processes: int
) -> dict[int, float]:
    """The same loop in `processes` processes at once, one torch thread each: their summed inputs/s per batch
    size. Each loads and warms up first, then all start together."""
    command = [sys.executable, "-m", "benchmarks.encoder_ceiling", str(folder), task, text, str(seconds)]
    command += [str(size) for size in batch_sizes]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        for _ in range(processes)
    ]
    try:
        for child in children:  # each says "ready" once loaded and warmed up
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = [json.loads(child.communicate(timeout=600)[0]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    return {size: sum(result[str(size)] for result in results) for size in batch_sizes}


class _TracedModel:
    """A traced pass called as `run_batch` calls a model."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, task: str) -> None:
        self.field = "logits" if task == "classify" else "last_hidden_state"
        traced = trace_encoder(model, tokenizer, self.field)
        assert traced is not None, "the model did not trace (see the log)"
        self.traced = traced

    def __call__(self, **inputs: torch.Tensor) -> SimpleNamespace:
        output = self.traced(inputs)
        assert output is not None, f"inputs {sorted(inputs)} are not the traced ones"
        return SimpleNamespace(**{self.field: output})


def traced_lanes_inputs_per_second(
    folder: Path, task: str, text: str, batch_sizes: list[int], seconds: float, lanes: int
) -> dict[int, float]:
    """Summed inputs/s of `lanes` threads each running `run_batch` on the traced model with one torch thread,
    per batch size: what the server's runtime does with nothing in front of it. Run it after the other
    ceilings: it leaves torch's default thread count at 1 for threads that have not run torch yet."""
    tokenizer, model = load_encoder(folder, task)
    traced = _TracedModel(model, tokenizer, task)
    rates: dict[int, float] = {}
    for size in batch_sizes:
        done = [0.0] * lanes
        barrier = threading.Barrier(lanes)
        threads = [
            threading.Thread(
                target=_traced_lane, args=(tokenizer, traced, task, [text] * size, seconds, barrier, done, i)
            )
            for i in range(lanes)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rates[size] = sum(done)
    return rates


def _traced_lane(
    tokenizer: object,
    traced: _TracedModel,
    task: str,
    batch: list[str],
    seconds: float,
    barrier: threading.Barrier,
    done: list[float],
    index: int,
) -> None:
    """One lane of traced_lanes_inputs_per_second: one torch thread, warm up, start with the others, measure."""
    torch.set_num_threads(1)
    run_batch(tokenizer, traced, task, batch)
    barrier.wait()
    done[index] = _rate(tokenizer, traced, task, batch, seconds)


def _one_process_of_several() -> None:
    """Child of per_core_inputs_per_second: warm up, say ready, wait for go, measure, print JSON."""
    folder, task, text, seconds, *sizes = sys.argv[1:]
    torch.set_num_threads(1)
    tokenizer, model = load_encoder(Path(folder), task)
    for size in sizes:
        run_batch(tokenizer, model, task, [text] * int(size))
    print("ready", flush=True)
    sys.stdin.readline()
    rates = {size: _rate(tokenizer, model, task, [text] * int(size), float(seconds)) for size in sizes}
    print(json.dumps(rates), flush=True)


if __name__ == "__main__":
    _one_process_of_several()
