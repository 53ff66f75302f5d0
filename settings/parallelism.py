"""How many BentoML worker processes serve the model, and how many torch threads each: decided once it is known.

`workers` unset: one process per CPU core, each with one torch thread, for a small encoder on CPU; one process
otherwise. Measured on the 2-core benchmark machine with all-MiniLM-L6-v2 (README, Performance): two processes of
one thread served ~1.2x the requests of one process of two threads at 8 and 32 concurrent clients, and two
single-threaded in-process loops together ran ~1.2x the batches of one two-threaded loop. A small encoder's
matrices are too small for two OpenMP threads to share well: each of the many parallel regions of a pass ends at
a barrier, and whatever pre-empts one of the two threads (the event loop, the tokenizer, the load generator)
stalls both. Separate processes also have their own GIL and event loop.

Each worker loads its own copy of the model, so this is the default only where that is cheap: weights of at most
SMALL_ENCODER_BYTES. Generation (one engine batches all requests), GPUs, vLLM's pooling engine and a remote
predictor keep one worker. `workers` or `torch_threads` given by the user always win.
"""

from __future__ import annotations

import os
from pathlib import Path

from settings.arguments import ServerArguments
from settings.loading import ModelSource

# all-MiniLM-L6-v2 is 90 MB, bge-small 130 MB: sentence encoders of this size are where one thread per process
# was measured to win. Larger models have larger matrices, which two threads share well, and cost more memory per copy.
SMALL_ENCODER_BYTES = 256 * 1024 * 1024
MAX_AUTO_WORKERS = 8  # past this, start-up time and memory grow faster than a small model's throughput
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def weight_bytes(folder: Path) -> int | None:
    """Size of the model's weight files (None when there are none to measure, e.g. a GGUF or remote model)."""
    if not folder.is_dir():
        return None
    sizes = [f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)]
    return sum(sizes) if sizes else None


def replicates_per_core(args: ServerArguments, source: ModelSource) -> bool:
    """One single-threaded worker per core suits this model: a small encoder served from local weights on CPU."""
    if source.task.is_generative or source.device.type != "cpu" or args.gpus > 0:
        return False
    if args.backend == "vllm" or args.predictor_host:
        return False
    size = weight_bytes(source.path)
    return size is not None and size <= SMALL_ENCODER_BYTES


def settle_parallelism(args: ServerArguments, source: ModelSource, cores: int | None = None) -> ServerArguments:
    """`args` with `workers` decided (and `torch_threads`, when one worker per core takes a share of them)."""
    if args.workers is not None:
        return args
    cores = usable_cores() if cores is None else cores
    if cores < 2 or not replicates_per_core(args, source):
        return args.model_copy(update={"workers": 1})
    workers = min(cores, MAX_AUTO_WORKERS)
    threads = args.torch_threads if args.torch_threads is not None else max(1, cores // workers)
    return args.model_copy(update={"workers": workers, "torch_threads": threads})
