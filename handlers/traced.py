"""An encoder's forward pass traced with TorchScript on CPU: the same outputs, and no GIL held while it runs.

Why: an eager transformers pass dispatches each of its few hundred ops from Python, holding the GIL between
them. That costs CPU per request, and two passes on two threads take turns on the GIL (1.71-1.75 of 2 cores
busy on all-MiniLM-L6-v2), so one single-threaded pass per core (engines/batcher.py's forward lanes) gains
nothing. A traced pass runs in TorchScript's C++ interpreter: less CPU per request on one lane, and two
lanes keep both cores busy (benchmarks/encoder_profile.py; README "where the time goes").

Tracing records the ops one example runs, so a model whose Python takes data-dependent branches would be
recorded wrong. Each trace is therefore checked at start against the eager model on a batch of another shape
(other rows, other lengths, padding); a model that fails to trace or to match serves eagerly, with the reason
logged. torch 2.13 marks torch.jit.trace deprecated in favour of torch.compile, which here took 21 s to start
and recompiled per batch shape on each thread; the trace takes ~1 s. If a torch release drops it, the check
fails and serving goes on eagerly (tests/test_traced_forward.py fails loudly).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Tolerance of the start-up check: the traced graph runs the same kernels, so outputs agree to float32 rounding.
CHECK_ATOL = 1e-5


class _Positional(torch.nn.Module):
    """The model called with its inputs in a fixed order, returning one output tensor (what tracing records)."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...], output_field: str) -> None:
        super().__init__()
        self.model, self.names, self.output_field = model, names, output_field

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors, strict=True)))[self.output_field]


class TracedForward:
    """The traced pass for inputs named `names`; other inputs (another set of names) are not its to run."""

    def __init__(self, module: Any, names: tuple[str, ...]) -> None:
        self.module, self.names = module, names

    def __call__(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The output, or None when the inputs are not the traced set (the caller runs the model eagerly)."""
        if len(model_inputs) != len(self.names) or any(name not in model_inputs for name in self.names):
            return None
        return self.module(*(model_inputs[name] for name in self.names))


def _examples(tokenizer: Any, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The batch traced (2 rows, padded) and the batch checked (3 rows of other lengths)."""

    def batch(texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        return {name: encoded[name] for name in names if name in encoded}

    traced = batch(["warm up", "a second, longer example for the trace"])
    checked = batch(["one", "two three four five six seven eight nine ten eleven", "twelve thirteen"])
    return traced, checked


def _same(got: Any, expected: Any) -> bool:
    return (
        isinstance(got, torch.Tensor)
        and isinstance(expected, torch.Tensor)
        and got.shape == expected.shape
        and torch.allclose(got, expected, atol=CHECK_ATOL, rtol=CHECK_ATOL)
    )


def trace_encoder(model: torch.nn.Module, tokenizer: Any, output_field: str) -> TracedForward | None:
    """The traced pass of `model`'s `output_field`, checked against the eager model; None (logged) if it fails."""
    traced_batch, checked_batch = _examples(tokenizer, list(tokenizer.model_input_names))
    names = tuple(traced_batch)
    try:
        wrapper = _Positional(model, names, output_field).eval()
        with torch.inference_mode(), warnings.catch_warnings():
            # TracerWarnings name each Python branch recorded; the check below is what decides.
            warnings.simplefilter("ignore")
            module = torch.jit.trace(wrapper, tuple(traced_batch.values()), check_trace=False, strict=False)
            expected = wrapper(*checked_batch.values())
            got = module(*checked_batch.values())
    except Exception as error:  # any model tracing cannot record serves eagerly
        logger.warning("serving eagerly: tracing the model failed (%s: %s)", type(error).__name__, error)
        return None
    if not _same(got, expected):
        logger.warning("serving eagerly: the traced model's outputs differ from the eager model's")
        return None
    logger.info("encoder traced with TorchScript (inputs %s); passes run without the GIL", ", ".join(names))
    return TracedForward(module, names)
