"""Prometheus histograms of the encoder batcher's forward passes: how full the batches are and how long they take.

What an operator tunes `max_batch_size`, `max_batch_tokens` and `workers` by, and what
benchmarks/encoder_profile.py reads: at 32 closed-loop clients, for instance, a pass of ~16 rows means two batches
alternate (the clients of one are answered and come back while the other runs). One observation per pass, on the
forward thread, never per request. With several workers each records its own passes; /metrics sums them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Histogram

_LABELS = ["model_name", "lane"]  # lane: "forward", or "express" beside a long pass (engines/batcher.py)

BATCH_ROWS = Histogram(
    "encoder_batch_rows",
    "Inputs (rows) in one forward pass of the encoder batcher",
    _LABELS,
    buckets=(1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 96, 128, 256),
)
PASS_SECONDS = Histogram(
    "encoder_forward_pass_seconds",
    "Duration of one forward pass of the encoder batcher (the model and its postprocessing, per batch)",
    _LABELS,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
)


def pass_observer(model_name: str) -> Callable[[int, float, bool], None]:
    """`on_pass(rows, seconds, express)` for MicroBatcher, with the label children bound once."""
    children = {
        express: (BATCH_ROWS.labels(model_name, lane), PASS_SECONDS.labels(model_name, lane))
        for express, lane in ((False, "forward"), (True, "express"))
    }

    def on_pass(rows: int, seconds: float, express: bool) -> None:
        rows_histogram, seconds_histogram = children[express]
        rows_histogram.observe(rows)
        seconds_histogram.observe(seconds)

    return on_pass
