"""Choosing each row's next token: greedy fast path, penalties, min_tokens, temperature, top-k, min-p,
top-p and a per-request seeded generator; logprobs are log_softmax of the raw logits (before penalties
and temperature), like vLLM's default and OpenAI's documentation."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from engines.generation.backend import Logprob, SamplingOptions, TokenLogprobs
from engines.generation.transformers.grammar import Grammars
from engines.generation.transformers.state import Row


class Sampler:
    """Samples rows of one model: knows its eos ids and caches each token's text."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], grammars: Grammars | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.grammars = grammars
        self._token_texts: dict[int, str] = {}

    def sample(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """Choose each row's next token (row.next_token) and record its logprobs."""
        logits = logits.float()
        need_logprobs = any(row.state.sampling.logprobs is not None for row in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None  # raw, before constraints
        biased = [(i, row.state.sampling.logit_bias) for i, row in enumerate(rows) if row.state.sampling.logit_bias]
        if biased:
            logits = logits.clone()
            for i, bias in biased:
                ids, values = zip(*bias, strict=True)
                logits[i, list(ids)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
        matchers = [row.matcher for row in rows]
        constrained = self.grammars is not None and any(m is not None for m in matchers)
        if constrained:
            logits = self.grammars.mask(logits, matchers)  # type: ignore[union-attr]
        argmax = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            try:
                self._choose(row, i, logits, argmax, logprobs)
            except Exception as error:  # this row's request fails alone (scheduler.py ends it)
                row.state.error = error

    def _choose(self, row: Row, i: int, logits: torch.Tensor, argmax: list[int], logprobs: torch.Tensor | None) -> None:
        sampling = row.state.sampling
        plain = (
            sampling.greedy
            and sampling.presence_penalty == 0.0
            and sampling.frequency_penalty == 0.0
            and sampling.repetition_penalty == 1.0
            and (sampling.min_tokens == 0 or len(row.generated) >= sampling.min_tokens)
        )
        token = argmax[i] if plain else self.sample_row(logits[i], row)
        row.next_token = token
        if row.matcher is not None:
            Grammars.accept(row.matcher, token)
        if logprobs is not None and sampling.logprobs is not None:
            row.new_logprobs.append(self.token_logprobs(logprobs[i], token, sampling.logprobs))

    def sample_row(self, logits: torch.Tensor, row: Row) -> int:
        sampling = row.state.sampling
        x = logits.clone()
        if row.seen is not None:
            penalty = sampling.repetition_penalty
            picked = x[row.seen]
            x[row.seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if row.counts is not None:
            x -= sampling.frequency_penalty * row.counts + sampling.presence_penalty * (row.counts > 0).float()
        if len(row.generated) < sampling.min_tokens:
            banned = [t for t in (*self.eos_ids, *sampling.stop_token_ids) if 0 <= t < x.shape[-1]]
            if banned:
                x[banned] = float("-inf")
        if sampling.greedy:
            return int(x.argmax())
        x = x / sampling.temperature
        top_k = sampling.top_k
        if 0 < top_k < x.shape[-1]:
            threshold = torch.topk(x, top_k).values[-1]
            x = x.masked_fill(x < threshold, float("-inf"))
        if sampling.min_p > 0.0:
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < sampling.min_p * probs.max(), float("-inf"))
        if sampling.top_p < 1.0:
            sorted_logits, order = torch.sort(x, descending=False)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            remove = cumulative <= 1.0 - sampling.top_p
            remove[-1] = False  # keep at least the most likely token
            x = x.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = torch.softmax(x, dim=-1)
        return int(torch.multinomial(probs, 1, generator=row.state.generator))

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text

    def token_logprobs(self, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprobs:
        chosen = Logprob(token, self.token_text(token), float(logprobs[token]))
        alternatives: tuple[Logprob, ...] = ()
        if top > 0:
            values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
            alternatives = tuple(
                Logprob(int(t), self.token_text(int(t)), float(v), rank)
                for rank, (t, v) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), start=1)
            )
        return TokenLogprobs(chosen, alternatives)

    def prompt_logprobs(
        self, logits: torch.Tensor, prompt: tuple[int, ...], sampling: SamplingOptions
    ) -> tuple[TokenLogprobs | None, ...]:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = sampling.prompt_logprobs or 0
        entries: list[TokenLogprobs | None] = [None]
        for position in range(1, len(prompt)):
            row, token = logprobs[position - 1], prompt[position]
            entry = self.token_logprobs(row, token, top)
            rank = int((row > row[token]).sum()) + 1
            entries.append(dataclasses.replace(entry, chosen=dataclasses.replace(entry.chosen, rank=rank)))
        return tuple(entries)

    # ---- after sampling: bookkeeping, text, stop conditions ----
