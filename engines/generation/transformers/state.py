"""A request's state on the engine thread, and the rows (one per choice) it runs as."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from engines.generation.backend import ChoiceDelta, GenerationOutput, GenerationRequest, SamplingOptions, TokenLogprobs
from engines.generation.transformers.detokenizer import Detokenizer, StopStrings


@dataclass(eq=False)
class RequestState:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationOutput | BaseException]
    aborted: bool = False
    done: bool = False
    rows_left: int = 0
    generator: torch.Generator | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    sent_first: bool = False
    pending: list[ChoiceDelta] = field(default_factory=list)
    grammar: Any = None  # xgrammar CompiledGrammar for structured outputs
    error: BaseException | None = None  # set when one of its rows failed: the request fails alone

    @property
    def sampling(self) -> SamplingOptions:
        return self.request.sampling

    def deliver(self, item: GenerationOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.aborted = True


@dataclass(eq=False)
class Row:
    """One sequence (one of a request's n choices) in the running batch."""

    state: RequestState
    index: int
    prompt_len: int
    detokenizer: Detokenizer
    text: StopStrings
    next_token: int = -1
    generated: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # occurrences of each vocabulary id among generated tokens
    seen: torch.Tensor | None = None  # prompt + generated ids, for repetition_penalty
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    matcher: Any = None  # xgrammar GrammarMatcher of this row (structured outputs)


def put_all(items: list[tuple[RequestState, GenerationOutput]]) -> None:
    """On the event loop: hand each output to its request's queue."""
    for state, output in items:
        state.queue.put_nowait(output)
