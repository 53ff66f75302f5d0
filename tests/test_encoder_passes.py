"""Encoder batches run in length-sorted passes, and a request is answered as soon as its rows are done."""

from __future__ import annotations

from handlers.requests import PredictOptions
from tests.test_handlers import make_handler, predict


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
