"""The engine thread: iteration-level (continuous) batching over a transformers model.

It loops:

1. take new requests and aborts from the inbox (aborted requests leave the batch here);
2. admit waiting requests while there are free slots (`max_batch_size` sequences) and prefill
   token budget (`max_batch_tokens`): each prompt is prefilled alone (no padding, so prefill is
   exactly the model's own forward), its first token is sampled, and its n sequences join the batch;
3. decode one token for every active sequence in ONE batched forward over a left-padded KV cache
   (per-row attention mask and position ids), sample each sequence with its own options, detokenize
   incrementally, apply stop strings, and hand the step's outputs to the asyncio side with
   `loop.call_soon_threadsafe` into the request's own asyncio.Queue.

Encoder-decoder models (T5, BART): the encoder runs once per request at admission, together with the
first decoder step; decoder steps are batched with the encoder states right-padded and masked. T5's
relative position bias does not see left padding, so all T5 rows share one batch; models with
absolute decoder positions that cannot take position_ids (BART, Marian, ...) batch only the requests
admitted together (their decoders start together and stay the same length), so no padding is needed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import EncoderDecoderCache

from engines.generation.backend import ChoiceDelta, GenerationOutput
from engines.generation.transformers.detokenizer import Detokenizer, StopStrings
from engines.generation.transformers.grammar import Grammars
from engines.generation.transformers.kv_batch import KVBatch, cache_from, cache_tensors
from engines.generation.transformers.sampling import Sampler
from engines.generation.transformers.state import RequestState, Row, put_all
from handlers.errors import NotReady

logger = logging.getLogger(__name__)


class Scheduler:
    """Owns the model on one thread; the asyncio side only appends to the inbox and sets `aborted`."""

    model: PreTrainedModel | None
    sampler: Sampler
    tokenizer: Any
    is_encoder_decoder: bool
    max_model_len: int
    max_num_seqs: int
    max_prefill_tokens: int

    def __init__(self) -> None:
        self._inbox: deque[RequestState] = deque()
        self._waiting: deque[RequestState] = deque()
        self._batches: list[KVBatch] = []
        self._wake = threading.Condition()
        self._running = False
        self._dead: str | None = None
        self._takes_position_ids = False
        self._takes_logits_to_keep = False
        self._shared_batch = True
        self._decoder_start: int | None = None
        self._device: Any = "cpu"
        self.kv_bytes_per_token = 0  # K and V of every layer for one token of one row
        self.kv_budget_bytes = 0  # 0 = no budget
        self.steps = 0  # decode steps run (for tests and metrics)
        self.max_rows_seen = 0  # largest decode batch so far

    @property
    def dead_reason(self) -> str | None:
        """Why the engine thread is gone while it should run (None while it is healthy or stopped on purpose)."""
        thread = getattr(self, "_thread", None)
        if self._dead is None and self._running and thread is not None and not thread.is_alive():
            return "the engine thread is gone"
        return self._dead

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # the loop itself died: fail everyone now, refuse the rest (503), never hang
            self._dead = f"{type(error).__name__}: {error}"
            logger.critical("the generation engine died", exc_info=True)
            self._fail_all(NotReady(f"the generation engine died ({self._dead})"))

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while self._running and not self._inbox and not self._waiting and not self._batches:
                        self._wake.wait(timeout=1.0)
                    if not self._running:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                try:
                    self._step()
                except Exception as error:  # a failed forward fails its requests, not the engine
                    logger.exception("generation step failed")
                    self._fail_all(error)
        self._fail_all(NotReady("the generation engine stopped"))

    def _fail_all(self, error: BaseException) -> None:
        states = {row.state for batch in self._batches for row in batch.rows}
        states.update(self._waiting)
        with self._wake:
            states.update(self._inbox)
            self._inbox.clear()
        self._batches = []
        self._waiting.clear()
        for state in states:
            if not state.done:
                state.done = True
                state.deliver(error)

    def _step(self) -> None:
        # Aborted requests leave the queue and the batch first.
        self._waiting = deque(s for s in self._waiting if not s.aborted)
        self._batches = [
            b for b in (b.select([i for i, r in enumerate(b.rows) if not r.state.aborted]) for b in self._batches) if b
        ]
        touched: list[RequestState] = []
        self._admit(touched)
        kept: list[KVBatch] = []
        for batch in self._batches:
            kept.extend(self._decode_isolated(batch, touched))
        self._batches = kept
        self._emit(touched)

    def _decode_isolated(self, batch: KVBatch, touched: list[RequestState]) -> list[KVBatch]:
        """Decode one step; when the forward pass fails, retry each request's rows on their own, so only the
        request that cannot run fails (the batch's cache is unchanged by a failed forward)."""
        try:
            self._decode(batch, touched)
        except Exception as error:
            states = list(dict.fromkeys(row.state for row in batch.rows))
            if len(states) == 1:
                logger.exception("generation step failed for request %s", states[0].request.request_id)
                states[0].done = True
                states[0].deliver(error)
                return []
            parts = [batch.select([i for i, r in enumerate(batch.rows) if r.state is state]) for state in states]
            return [kept for part in parts if part is not None for kept in self._decode_isolated(part, touched)]
        rest = batch.select([i for i, r in enumerate(batch.rows) if r.finish_reason is None])
        return [rest] if rest is not None else []

    def _active_rows(self) -> int:
        return sum(len(b.rows) for b in self._batches)

    def kv_bytes(self, rows: int, longest: int) -> int:
        """KV memory of `rows` rows padded to `longest` tokens (the batch is one padded tensor per layer)."""
        return rows * longest * self.kv_bytes_per_token

    def _admit(self, touched: list[RequestState]) -> None:
        free = self.max_num_seqs - self._active_rows()
        budget = self.max_prefill_tokens
        admitted: list[KVBatch] = []
        rows = self._active_rows()
        longest = max((r.prompt_len + r.state.sampling.max_tokens for b in self._batches for r in b.rows), default=0)
        while self._waiting:
            state = self._waiting[0]
            n = state.sampling.n
            prompt_len = len(state.request.prompt_token_ids)
            if n > free or (admitted and prompt_len > budget):
                break
            final = max(longest, prompt_len + state.sampling.max_tokens)
            if self.kv_budget_bytes and rows and self.kv_bytes(rows + n, final) > self.kv_budget_bytes:
                break  # waits (FIFO) until running rows finish and free their KV memory
            rows, longest = rows + n, final
            self._waiting.popleft()
            free -= n
            budget -= prompt_len
            try:
                batch = self._prefill(state)
            except Exception as error:  # this request fails alone; the batch goes on
                logger.exception("prefill failed")
                state.done = True
                state.deliver(error)
                continue
            touched.append(state)
            if batch is not None:
                admitted.append(batch)
        if not admitted:
            return
        if self._shared_batch:
            self._batches = [KVBatch.concat(self._batches + admitted)]
        elif self.is_encoder_decoder:
            # Decoders admitted together have the same length: one batch, no padding.
            self._batches.append(KVBatch.concat(admitted))
        else:
            self._batches.extend(admitted)

    def _prefill(self, state: RequestState) -> KVBatch | None:
        """Run the prompt (encoder + first decoder step for seq2seq) and sample the first tokens."""
        sampling = state.sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        state.generator = torch.Generator(device=self._device).manual_seed(seed)
        model = self.model
        assert model is not None
        prompt = torch.tensor([state.request.prompt_token_ids], dtype=torch.long, device=self._device)
        want_prompt_logprobs = sampling.prompt_logprobs is not None and not self.is_encoder_decoder
        if self.is_encoder_decoder:
            encoder_mask = torch.ones_like(prompt)
            encoder = model.get_encoder()(input_ids=prompt, attention_mask=encoder_mask)
            out = model(
                encoder_outputs=encoder,
                attention_mask=encoder_mask,
                decoder_input_ids=torch.tensor([[self._decoder_start]], device=self._device),
                use_cache=True,
            )
            cache = out.past_key_values
            assert isinstance(cache, EncoderDecoderCache)
            keys, values = cache_tensors(cache.self_attention_cache)
            cross_keys, cross_values = cache_tensors(cache.cross_attention_cache)
            batch = KVBatch(
                rows=[],
                keys=keys,
                values=values,
                mask=torch.ones((1, keys[0].shape[2]), dtype=torch.long, device=self._device),
                cross_keys=cross_keys,
                cross_values=cross_values,
                encoder_hidden=encoder.last_hidden_state,
                encoder_mask=encoder_mask,
            )
        else:
            kwargs: dict[str, Any] = {"use_cache": True}
            if self._takes_logits_to_keep and not want_prompt_logprobs:
                kwargs["logits_to_keep"] = 1
            out = model(input_ids=prompt, **kwargs)
            keys, values = cache_tensors(out.past_key_values)
            batch = KVBatch(rows=[], keys=keys, values=values, mask=torch.ones_like(prompt))
        logits = out.logits[:, -1, :]
        if want_prompt_logprobs:
            state.prompt_logprobs = self.sampler.prompt_logprobs(
                out.logits[0], state.request.prompt_token_ids, sampling
            )
        rows = []
        for index in range(sampling.n):
            row = Row(
                state=state,
                index=index,
                prompt_len=len(state.request.prompt_token_ids),
                detokenizer=Detokenizer(
                    self.tokenizer,
                    () if self.is_encoder_decoder else state.request.prompt_token_ids,
                    sampling.skip_special_tokens,
                ),
                text=StopStrings(sampling.stop, sampling.include_stop_str_in_output),
                matcher=None if state.grammar is None else Grammars.matcher(state.grammar),
            )
            if sampling.presence_penalty != 0.0 or sampling.frequency_penalty != 0.0:
                row.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=self._device)
            if sampling.repetition_penalty != 1.0:
                row.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self._device)
                if not self.is_encoder_decoder:
                    row.seen[prompt[0]] = True
            rows.append(row)
        state.rows_left = len(rows)
        self.sampler.sample(logits.expand(len(rows), -1), rows)
        for row in rows:
            self._advance(row)
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        batch = batch.repeat(len(rows))
        batch.rows = rows
        return batch.select(keep)

    def _decode(self, batch: KVBatch, touched: list[RequestState]) -> None:
        model = self.model
        assert model is not None
        rows = batch.rows
        size = len(rows)
        tokens = torch.tensor([[row.next_token] for row in rows], dtype=torch.long, device=self._device)
        mask = torch.cat([batch.mask, torch.ones((size, 1), dtype=batch.mask.dtype, device=self._device)], dim=1)
        self_cache = cache_from(batch.keys, batch.values)
        if self.is_encoder_decoder:
            assert batch.cross_keys is not None and batch.cross_values is not None
            cache = EncoderDecoderCache(self_cache, cache_from(batch.cross_keys, batch.cross_values))
            out = model(
                encoder_outputs=(batch.encoder_hidden,),
                attention_mask=batch.encoder_mask,
                decoder_input_ids=tokens,
                decoder_attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
        else:
            kwargs: dict[str, Any] = {}
            if self._takes_position_ids:
                kwargs["position_ids"] = batch.mask.sum(dim=1, keepdim=True)
            out = model(input_ids=tokens, attention_mask=mask, past_key_values=self_cache, use_cache=True, **kwargs)
        batch.keys, batch.values = cache_tensors(self_cache)
        batch.mask = mask
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, size)
        self.sampler.sample(out.logits[:, -1, :], rows)
        for row in rows:
            self._advance(row)
            if row.state not in touched:
                touched.append(row.state)

    # ---- sampling ----

    def _advance(self, row: Row) -> None:
        if row.state.error is not None:  # its sampling failed: the row leaves, _emit fails the request
            row.finish_reason = "error"
            return
        sampling = row.state.sampling
        token = row.next_token
        row.generated.append(token)
        row.new_ids.append(token)
        if row.counts is not None:
            row.counts[token] += 1
        if row.seen is not None:
            row.seen[token] = True
        is_eos = token in self.sampler.eos_ids and not sampling.ignore_eos
        stop_token = token in sampling.stop_token_ids
        stop = row.text.add(row.detokenizer.add(token))
        if stop is not None:
            row.finish_reason, row.stop_reason = "stop", stop
        elif is_eos and len(row.generated) >= sampling.min_tokens:
            row.finish_reason = "stop"
        elif stop_token and len(row.generated) >= sampling.min_tokens:
            row.finish_reason, row.stop_reason = "stop", token
        elif len(row.generated) >= sampling.max_tokens or (
            not self.is_encoder_decoder and row.prompt_len + len(row.generated) >= self.max_model_len
        ):
            row.finish_reason = "length"
        if row.finish_reason is not None and stop is None:
            row.text.add(row.detokenizer.flush())
        text = row.text.take(final=row.finish_reason is not None)
        if row.finish_reason is not None:
            row.state.rows_left -= 1
        if text or row.finish_reason is not None or row.new_ids:
            row.state.pending.append(
                ChoiceDelta(
                    index=row.index,
                    token_ids=tuple(row.new_ids),
                    text=text,
                    logprobs=tuple(row.new_logprobs) if sampling.logprobs is not None else None,
                    finish_reason=row.finish_reason,  # type: ignore[arg-type]
                    stop_reason=row.stop_reason,
                )
            )
            row.new_ids = []
            row.new_logprobs = []

    def _emit(self, touched: list[RequestState]) -> None:
        # One call_soon_threadsafe per event loop and step (each wakes the loop through a socket).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestState, GenerationOutput]]] = {}
        for state in touched:
            if state.error is not None and not state.done and not state.aborted:
                logger.warning("request %s failed: %s", state.request.request_id, state.error)
                state.done = True
                state.deliver(state.error)
                continue
            if not state.pending or state.aborted or state.done:
                state.pending = []
                continue
            finished = state.rows_left == 0
            output = GenerationOutput(
                request_id=state.request.request_id,
                prompt_token_count=len(state.request.prompt_token_ids),
                choices=tuple(state.pending),
                prompt_logprobs=state.prompt_logprobs if not state.sent_first else None,
                finished=finished,
            )
            state.pending = []
            state.sent_first = True
            if finished:
                state.done = True
            by_loop.setdefault(state.loop, []).append((state, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for state, _ in items:
                    state.aborted = True

    # ---- for tests and benchmarks ----

    def active_requests(self) -> int:
        """Requests waiting or running (read from another thread: an estimate)."""
        states = {row.state for batch in list(self._batches) for row in batch.rows}
        return len(states) + len(self._waiting) + len(self._inbox)
