"""Encoder batches run in length-sorted passes, and a request is answered as soon as its rows are done."""

from __future__ import annotations

import threading

import pytest

from handlers.requests import PredictOptions
from tests.test_handlers import assert_close, make_handler, predict


def test_short_requests_are_answered_before_a_long_ones_pass(tiny_models, monkeypatch):
    """In one batch, rows run shortest pass first and a request is answered when its last row is done."""
    handler = make_handler(tiny_models["sequence_classification"])
    events: list[tuple[str, object]] = []
    forward = handler.forward

    def recording_forward(inputs):
        events.append(("forward", int(inputs["input_ids"].shape[1])))
        return forward(inputs)

    monkeypatch.setattr(handler, "forward", recording_forward)
    short = ["hello world, how are you today my good friend?"] * 8
    long = ["paris " * 100]
    encoded = [handler.encode(long, PredictOptions()), handler.encode(short, PredictOptions())]
    results = handler.run(encoded, on_result=lambda index, result: events.append(("answer", index)))
    assert [kind for kind, _ in events] == ["forward", "answer", "forward", "answer"]
    assert events[1] == ("answer", 1) and events[3] == ("answer", 0)  # the short request first
    assert events[0][1] < events[2][1]  # its pass was padded to its own length, not the long one's
    assert [r.predictions for r in results] == [predict(handler, long).predictions, predict(handler, short).predictions]


def test_passes_split_by_budget_and_by_length_and_keep_tiny_ones_together():
    from handlers.base import plan_passes

    assert plan_passes([10] * 8 + [500], 16384) == [list(range(8)), [8]]  # 80 padded tokens, then a 50x longer row
    assert plan_passes([5, 60], 16384) == [[0, 1]]  # a 5-token pass is too small to split off
    assert plan_passes([100] * 10, 300) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # rows x length <= budget
    assert plan_passes([30, 10, 20], 16384) == [[1, 2, 0]]  # shortest first; 3x the shortest, but 10 tokens is tiny


@pytest.mark.parametrize(
    "kind", ["sequence_classification", "token_classification", "fill_mask", "sentence_transformers"]
)
def test_two_threads_forwarding_at_once_get_the_results_of_one(tiny_models, kind):
    """The batcher's express lane runs a short pass beside a long one on a CPU model: results must not mix."""
    handler = make_handler(tiny_models[kind])
    assert handler.concurrent_forward  # a local CPU model: the express lane is on
    mask = handler.tokenizer.mask_token or ""
    short = [f"hello {mask} world", f"the weather in {mask} is fine"]
    long = [f"paris {mask} " + "and a long sentence about many things " * 12] * 16
    want_short, want_long = predict(handler, short), predict(handler, long)
    got: dict[str, list[object]] = {"short": [], "long": []}

    def repeat(name: str, texts: list[str], times: int) -> None:
        for _ in range(times):
            got[name].append(predict(handler, texts).outputs["output-0"])

    threads = [
        threading.Thread(target=repeat, args=("long", long, 4)),
        threading.Thread(target=repeat, args=("short", short, 40)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got["short"]) == 40 and len(got["long"]) == 4
    for name, want in (("short", want_short), ("long", want_long)):
        for outputs in got[name]:
            if kind == "fill_mask":  # the predicted words
                assert outputs == want.outputs["output-0"]
            else:
                assert_close(outputs, want.outputs["output-0"], atol=1e-5)
