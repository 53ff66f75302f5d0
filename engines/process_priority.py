"""A lower CPU priority for the processes an engine starts, so the HTTP worker runs first when both want a core.

On a CPU, vLLM's engine core runs the model on OpenMP threads that keep every core busy (and spin between
steps), while this worker's event loop parses requests, tokenizes prompts, detokenizes and streams every
token. When both want a core, the kernel's fair scheduler splits it evenly, so a new request's headers and
first token wait in the run queue behind the engine's threads. With the engine's processes a few steps of
`nice` lower (`engine_nice`), the event loop (about 0.4 of a core at 32 streams) gets a core as soon as it has
work. It is a trade, so it is off by default: measured with `benchmarks.vllm_side_by_side --also-ours` on 2
cores, nice 5 cut TTFT at 32 streams by a fifth and cost 3-7% of the output tokens/s (decoding 17% slower per
token at 32 streams), because the engine's OpenMP threads then lose the cores to the loop and the client
mid-step; nice 1 changed nothing measurable (README, "Generation on vLLM").

Only ever lowers priority (a higher nice value), which needs no privilege. On Linux a nice value belongs to
a thread, not a process, so every thread of each process is set; threads the engine starts later inherit the
value of the thread that starts them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psutil

logger = logging.getLogger(__name__)


def descendants() -> set[int]:
    """Process ids of every process below this one."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def thread_ids(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:  # gone, or no /proc (not Linux): the process's own value is all there is
        return [pid]


def lower_priority(pids: Iterable[int], nice: int) -> int:
    """Every thread of these processes at `nice` at least (one already lower keeps its value). Returns how
    many threads were changed; a process or thread that has gone meanwhile is skipped."""
    changed = 0
    for pid in pids:
        for tid in thread_ids(pid):
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                    changed += 1
            except (ProcessLookupError, PermissionError):
                continue
    return changed


@contextmanager
def new_processes_at(nice: int, what: str) -> Iterator[None]:
    """Every process started below this one inside the block runs at `nice` once the block ends without error
    (`lower_priority`); nothing is looked up when `nice` is 0."""
    if nice <= 0:
        yield
        return
    before = descendants()
    yield
    started = sorted(descendants() - before)
    changed = lower_priority(started, nice)
    logger.info("%s: %d threads in processes %s now at nice %d", what, changed, started, nice)
