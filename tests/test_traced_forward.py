"""Encoders traced with TorchScript on CPU: traced at start, the same outputs as eager, eager where tracing fails."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import pytest
import torch

from engines.batcher import MicroBatcher
from engines.encoder_runtime import PredictiveRuntime
from handlers.traced import trace_encoder
from settings.arguments import parse_arguments
from tests.test_handlers import assert_close, make_handler, predict

KINDS = ["sequence_classification", "token_classification", "fill_mask", "sentence_transformers", "cross_encoder"]
# Rows of other lengths than the start-up check's, so a trace that recorded one shape would show here.
# Each has a mask token for fill_mask; to the other tasks it is one more token.
TEXTS = ["hello [MASK]", "the weather in [MASK] is fine today, and tomorrow it will rain", "bread and [MASK] butter"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_task_is_traced_and_answers_as_the_eager_model_does(tiny_models, kind):
    traced = make_handler(tiny_models[kind])
    eager = make_handler(tiny_models[kind], encoder_runtime="eager")
    assert traced.traced is not None, "tracing failed: see the log (torch.jit.trace gone or the model changed?)"
    assert eager.traced is None
    for texts in (TEXTS, TEXTS[:1], TEXTS * 7):
        got, want = predict(traced, texts), predict(eager, texts)
        assert got.outputs.keys() == want.outputs.keys()
        for name in want.outputs:
            if isinstance(want.outputs[name], list) and want.outputs[name] and not _has_text(want.outputs[name]):
                assert_close(got.outputs[name], want.outputs[name], atol=1e-5)
            else:
                assert got.outputs[name] == want.outputs[name]


def _has_text(value: object) -> bool:
    if isinstance(value, list):
        return any(_has_text(item) for item in value)
    return isinstance(value, str | dict)


def test_the_default_model_is_traced_and_served_on_one_lane_per_torch_thread(monkeypatch):
    args = parse_arguments({"device": "cpu"}, environ={})
    runtime = PredictiveRuntime(args)
    runtime.handler.load()
    assert runtime.handler.traced is not None
    assert runtime.forward_lanes() == torch.get_num_threads()
    monkeypatch.setattr(runtime.args, "forward_lanes", 1)
    assert runtime.forward_lanes() == 1


def test_an_eager_model_runs_one_pass_at_a_time_on_all_threads(tiny_models):
    args = parse_arguments(
        {"model_dir": str(tiny_models["sequence_classification"]), "device": "cpu", "encoder_runtime": "eager"},
        environ={},
    )
    runtime = PredictiveRuntime(args)
    runtime.handler.load()
    assert runtime.handler.traced is None and runtime.forward_lanes() == 1


class _ShapeBranch(torch.nn.Module):
    """Takes a Python branch on the number of rows: a trace records one side only."""

    def forward(self, input_ids: torch.Tensor, **_: torch.Tensor) -> dict:
        hidden = input_ids.float().unsqueeze(-1)
        return {"logits": hidden * 2 if input_ids.shape[0] > 2 else hidden}  # traced on 2 rows, checked on 3


class _Untraceable(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, **_: torch.Tensor) -> dict:
        if torch.jit.is_tracing():
            raise RuntimeError("this model cannot be traced")
        return {"logits": input_ids.float()}


def test_a_model_tracing_records_wrong_or_cannot_record_serves_eagerly(tiny_models, caplog):
    tokenizer = make_handler(tiny_models["sequence_classification"]).tokenizer
    with caplog.at_level(logging.WARNING, logger="handlers.traced"):
        assert trace_encoder(_ShapeBranch(), tokenizer, "logits") is None
        assert "differ from the eager model's" in caplog.text
        caplog.clear()
        assert trace_encoder(_Untraceable(), tokenizer, "logits") is None
        assert "tracing the model failed (RuntimeError: this model cannot be traced)" in caplog.text


def test_inputs_other_than_the_traced_ones_run_eagerly(tiny_models):
    handler = make_handler(tiny_models["sequence_classification"])
    assert handler.traced is not None
    inputs = {"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    assert handler.traced(inputs) is None  # no token_type_ids: not the traced signature
    eager = handler.model(**inputs).logits  # type: ignore[misc]
    assert torch.equal(handler.model_output(inputs), eager)


def holding_the_first_pass() -> tuple[
    Callable[[list[str]], list[str]], threading.Event, threading.Event, list[tuple[str, list[str]]]
]:
    """A batcher's `process` that records (thread name, works) of each pass and holds a pass starting with
    "held" (setting `held`) until `release` is set; with (process, held, release, batches)."""
    held, release = threading.Event(), threading.Event()
    batches: list[tuple[str, list[str]]] = []

    def process(works: list[str]) -> list[str]:
        batches.append((threading.current_thread().name, list(works)))
        if works[0] == "held":
            held.set()
            release.wait(5)
        return works

    return process, held, release, batches


def test_forward_lanes_run_passes_at_once_each_single_threaded_in_ready_order():
    """Two lanes: batches run on the second lane while the first lane's pass is held, in ready order."""
    process, held, release, batches = holding_the_first_pass()
    setups: list[bool] = []

    batcher = MicroBatcher(
        process,
        max_batch_size=32,
        max_wait_s=0.0,
        max_queue_size=100,
        forward_lanes=2,
        thread_setup=setups.append,
        arriving=lambda: 100,  # requests on their way: with lanes nothing waits for them
    )

    async def run() -> list[str]:
        first = asyncio.ensure_future(batcher.submit("held"))
        while not held.is_set():
            await asyncio.sleep(0.001)
        started = time.perf_counter()
        others = await asyncio.gather(*(batcher.submit(name) for name in "abcd"))
        elapsed = time.perf_counter() - started
        assert elapsed < 2, "the second lane waited for the first lane's pass"
        release.set()
        return [await first, *others]

    try:
        assert asyncio.run(run()) == ["held", "a", "b", "c", "d"]
    finally:
        release.set()
        batcher.close()
    assert setups == [True, True]  # each lane on one torch thread
    lanes = {thread for thread, _ in batches}
    assert len(lanes) == 2 and all("-forward-" in thread for thread in lanes)
    rest = [works for _, works in batches[1:]]
    assert [name for works in rest for name in works] == ["a", "b", "c", "d"]


def test_one_lane_collects_at_a_time_so_items_arriving_during_the_wait_join_the_batch(monkeypatch):
    """Without one lane collecting at a time, the idle lane could take any of b, c, d as they arrive."""
    batches: list[list[str]] = []
    collecting, most_at_once, count_lock = 0, 0, threading.Lock()
    collect = MicroBatcher._collect

    def counted_collect(self: MicroBatcher) -> object:
        nonlocal collecting, most_at_once
        with count_lock:
            collecting += 1
            most_at_once = max(most_at_once, collecting)
        try:
            return collect(self)
        finally:
            with count_lock:
                collecting -= 1

    monkeypatch.setattr(MicroBatcher, "_collect", counted_collect)
    batcher = MicroBatcher(
        lambda works: batches.append(list(works)) or works,
        max_batch_size=32,
        max_wait_s=0.5,
        max_queue_size=100,
        forward_lanes=2,
    )

    async def run() -> list[str]:
        futures = [asyncio.ensure_future(batcher.submit("a"))]
        for name in "bcd":
            await asyncio.sleep(0.03)  # within the batch's max_wait_s: each arrives while "a" is collected
            futures.append(asyncio.ensure_future(batcher.submit(name)))
        return [*(await asyncio.gather(*futures))]

    try:
        assert asyncio.run(run()) == ["a", "b", "c", "d"]
    finally:
        batcher.close()
    assert batches == [["a", "b", "c", "d"]]  # not split across the idle lane
    assert most_at_once == 1  # the other lane waited for its turn, not inside _collect


def test_each_lane_takes_its_share_of_max_batch_size():
    """max_batch_size=8 on two lanes: while one lane's pass is held, the other runs the 8 items waiting in two
    passes of 4 (not one of 8), in ready order; a single item of 6 rows, over the share, still runs whole."""
    process, held, release, batches = holding_the_first_pass()

    batcher = MicroBatcher(
        process,
        max_batch_size=8,
        max_wait_s=0.5,  # a pass waits for its share to fill: all eight are submitted well within it
        max_queue_size=100,
        forward_lanes=2,
        cost=lambda work: (6 if work == "wide" else 1, 1),
    )
    assert batcher.lane_batch_size == 4

    async def run() -> list[str]:
        first = asyncio.ensure_future(batcher.submit("held"))
        while not held.is_set():
            await asyncio.sleep(0.001)
        others = await asyncio.gather(*(batcher.submit(name) for name in "abcdefgh"))
        wide = await batcher.submit("wide")
        release.set()
        return [await first, *others, wide]

    try:
        assert asyncio.run(run()) == ["held", *"abcdefgh", "wide"]
    finally:
        release.set()
        batcher.close()
    assert [works for _, works in batches] == [["held"], list("abcd"), list("efgh"), ["wide"]]
