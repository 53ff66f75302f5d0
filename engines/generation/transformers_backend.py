"""Text generation on transformers with iteration-level (continuous) batching.

One background thread owns the model and loops:

1. take new requests and aborts from the inbox (aborted requests leave the batch here);
2. admit waiting requests while there are free slots (`max_batch_size` sequences) and prefill
   token budget (`max_batch_tokens`): each prompt is prefilled alone (no padding, so prefill is
   exactly the model's own forward), its first token is sampled, and its n sequences join the batch;
3. decode one token for every active sequence in ONE batched forward over a left-padded KV cache
   (per-row attention mask and position ids), sample each sequence with its own options, detokenize
   incrementally, apply stop strings, and hand the step's outputs to the asyncio side with
   `loop.call_soon_threadsafe` into the request's own asyncio.Queue.

The batch's KV cache is one tensor pair per layer, [rows, heads, time, head_dim], left-padded with
zeros: joining requests are padded to a common length and concatenated, finished or aborted rows are
removed with index_select and leading columns that are padding in every row are trimmed.

Encoder-decoder models (T5, BART): the encoder runs once per request at admission, together with the
first decoder step; decoder steps are batched with the encoder states right-padded and masked. T5's
relative position bias does not see left padding, so all T5 rows share one batch; models with
absolute decoder positions that cannot take position_ids (BART, Marian, ...) batch only the requests
admitted together (their decoders start together and stay the same length), so no padding is needed.

Logprobs are log_softmax of the model's raw logits (before penalties, temperature, top-k/top-p),
like vLLM's default and OpenAI's documentation.

Torch runs only on the engine thread; the asyncio side only awaits queues.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from engines.generation.backend import (
    ChoiceDelta,
    GenerationOutput,
    GenerationRequest,
    Logprob,
    SamplingOptions,
    TokenLogprobs,
)
from engines.generation.select import generation_config_defaults
from handlers.errors import InvalidInput, NotReady, Overloaded
from settings.arguments import ServerArguments
from settings.loading import ModelLoadError, ModelSource
from settings.tasks import Task

logger = logging.getLogger(__name__)

# Prompt tokens decoded before the first generated token, so its leading space survives decoding.
_DETOKENIZE_CONTEXT = 5
# Model types whose decoder positions are relative (left padding of the decoder cache is invisible).
_RELATIVE_DECODER_POSITIONS = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}


class _Abort(Exception):
    """Internal: the request was aborted before it finished."""


# --------------------------------------------------------------------------------------------------
# Per-sequence text state: incremental detokenization and stop strings
# --------------------------------------------------------------------------------------------------


class _Detokenizer:
    """Incremental decoding with a sliding prefix window (vLLM/TGI's method): emits text only once a
    token's characters are complete (no U+FFFD at the end), and keeps leading spaces right."""

    def __init__(self, tokenizer: Any, prompt_ids: tuple[int, ...], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        context = list(prompt_ids[-_DETOKENIZE_CONTEXT:])
        self.ids = context
        self.prefix_offset = 0
        self.read_offset = len(context)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still undecided (an incomplete character at the very end)."""
        if self.read_offset >= len(self.ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class _TextState:
    """The text of one sequence so far, with stop strings applied and a held-back tail."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include_stop = include_stop
        self.text = ""
        self.emitted = 0
        self.max_stop = max((len(s) for s in self.stops), default=0)

    def add(self, delta: str) -> str | None:
        """Append decoded text; returns the stop string when one matched (the text is cut there)."""
        if not delta:
            return None
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        best: tuple[int, str] | None = None
        for stop in self.stops:
            position = self.text.find(stop, start)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        if best is None:
            return None
        position, stop = best
        self.text = self.text[: position + (len(stop) if self.include_stop else 0)]
        return stop

    def take(self, final: bool) -> str:
        """Text ready to send: all of it when final, else all but a tail that may start a stop string."""
        end = len(self.text)
        if not final and self.stops:
            hold = 0
            for stop in self.stops:
                for k in range(min(len(stop) - 1, end - self.emitted), hold, -1):
                    if self.text.endswith(stop[:k]):
                        hold = k
                        break
            end -= hold
        if end <= self.emitted:
            return ""
        chunk = self.text[self.emitted : end]
        self.emitted = end
        return chunk


# --------------------------------------------------------------------------------------------------
# Requests and rows
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _RequestState:
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

    @property
    def sampling(self) -> SamplingOptions:
        return self.request.sampling

    def deliver(self, item: GenerationOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.aborted = True


@dataclass(eq=False)
class _Row:
    """One sequence (one of a request's n choices) in the running batch."""

    state: _RequestState
    index: int
    prompt_len: int
    detokenizer: _Detokenizer
    text: _TextState
    next_token: int = -1
    generated: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # occurrences of each vocabulary id among generated tokens
    seen: torch.Tensor | None = None  # prompt + generated ids, for repetition_penalty
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(eq=False)
class _Batch:
    """Rows decoded together, with their KV caches padded to common lengths."""

    rows: list[_Row]
    keys: list[torch.Tensor]  # per layer [B, H, T, D], left-padded
    values: list[torch.Tensor]
    mask: torch.Tensor  # [B, T] 1 = real token
    cross_keys: list[torch.Tensor] | None = None  # per layer [B, H, S, D], right-padded
    cross_values: list[torch.Tensor] | None = None
    encoder_hidden: torch.Tensor | None = None  # [B, S, hidden], right-padded
    encoder_mask: torch.Tensor | None = None  # [B, S]

    def select(self, keep: list[int]) -> _Batch | None:
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row can go.
        real = mask.sum(0).nonzero()
        first = int(real[0]) if len(real) else mask.shape[1]
        batch = _Batch(
            rows=[self.rows[i] for i in keep],
            keys=[k.index_select(0, index)[:, :, first:] for k in self.keys],
            values=[v.index_select(0, index)[:, :, first:] for v in self.values],
            mask=mask[:, first:],
        )
        if self.encoder_hidden is not None:
            assert self.cross_keys is not None and self.cross_values is not None and self.encoder_mask is not None
            enc_mask = self.encoder_mask.index_select(0, index)
            length = int(enc_mask.sum(1).max())
            batch.cross_keys = [k.index_select(0, index)[:, :, :length] for k in self.cross_keys]
            batch.cross_values = [v.index_select(0, index)[:, :, :length] for v in self.cross_values]
            batch.encoder_hidden = self.encoder_hidden.index_select(0, index)[:, :length]
            batch.encoder_mask = enc_mask[:, :length]
        return batch

    def repeat(self, n: int) -> _Batch:
        """A one-row batch turned into n identical rows (the rows themselves are set by the caller)."""
        if n == 1:
            return self
        batch = _Batch(
            rows=self.rows,
            keys=[k.repeat(n, 1, 1, 1) for k in self.keys],
            values=[v.repeat(n, 1, 1, 1) for v in self.values],
            mask=self.mask.repeat(n, 1),
        )
        if self.encoder_hidden is not None:
            assert self.cross_keys is not None and self.cross_values is not None and self.encoder_mask is not None
            batch.cross_keys = [k.repeat(n, 1, 1, 1) for k in self.cross_keys]
            batch.cross_values = [v.repeat(n, 1, 1, 1) for v in self.cross_values]
            batch.encoder_hidden = self.encoder_hidden.repeat(n, 1, 1)
            batch.encoder_mask = self.encoder_mask.repeat(n, 1)
        return batch

    @staticmethod
    def concat(batches: list[_Batch]) -> _Batch:
        if len(batches) == 1:
            return batches[0]
        length = max(b.mask.shape[1] for b in batches)

        def left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = length - t.shape[-dim_from_end]
            if missing == 0:
                return t
            pad = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, pad)

        batch = _Batch(
            rows=[row for b in batches for row in b.rows],
            keys=[torch.cat([left(b.keys[i], 2) for b in batches]) for i in range(len(batches[0].keys))],
            values=[torch.cat([left(b.values[i], 2) for b in batches]) for i in range(len(batches[0].values))],
            mask=torch.cat([left(b.mask, 1) for b in batches]),
        )
        if batches[0].encoder_hidden is not None:
            source = max(b.encoder_mask.shape[1] for b in batches)  # type: ignore[union-attr]

            def right(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
                missing = source - t.shape[-dim_from_end]
                if missing == 0:
                    return t
                return F.pad(t, [0, 0] * (dim_from_end - 1) + [0, missing])

            layers = range(len(batches[0].cross_keys))  # type: ignore[arg-type]
            batch.cross_keys = [torch.cat([right(b.cross_keys[i], 2) for b in batches]) for i in layers]  # type: ignore[index]
            batch.cross_values = [torch.cat([right(b.cross_values[i], 2) for b in batches]) for i in layers]  # type: ignore[index]
            batch.encoder_hidden = torch.cat([right(b.encoder_hidden, 2) for b in batches])  # type: ignore[arg-type]
            batch.encoder_mask = torch.cat([right(b.encoder_mask, 1) for b in batches])  # type: ignore[arg-type]
        return batch


def _put_all(items: list[tuple[_RequestState, GenerationOutput]]) -> None:
    """On the event loop: hand each output to its request's queue."""
    for state, output in items:
        state.queue.put_nowait(output)


def _cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A DynamicCache holding the given tensors without copying them."""
    cache = DynamicCache()
    layers = []
    for k, v in zip(keys, values, strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        layers.append(layer)
    cache.layers = layers
    return cache


def _cache_tensors(cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


class TransformersBackend:
    """GenerationBackend on a transformers model, continuously batched on one engine thread."""

    name = "huggingface"

    def __init__(
        self,
        source: ModelSource,
        args: ServerArguments,
        *,
        model: PreTrainedModel | None = None,
        max_num_seqs: int | None = None,
    ) -> None:
        if not source.task.is_generative:
            raise ModelLoadError(f"task '{source.task.value}' is not a generation task")
        self.source = source
        self.args = args
        self.tokenizer = source.tokenizer
        self.max_model_len = source.max_model_len
        self.sampling_defaults = generation_config_defaults(source)
        self.is_encoder_decoder = source.task == Task.text2text_generation
        self.max_num_seqs = max_num_seqs or args.max_batch_size
        self.max_prefill_tokens = args.max_batch_tokens
        self.max_queue_size = args.max_queue_size
        self.model: PreTrainedModel | None = model
        self._inbox: deque[_RequestState] = deque()
        self._waiting: deque[_RequestState] = deque()
        self._batches: list[_Batch] = []
        self._wake = threading.Condition()
        self._running = False
        self._dead: str | None = None
        self._thread: threading.Thread | None = None
        self._token_texts: dict[int, str] = {}
        self._eos_ids: set[int] = set()
        self._takes_position_ids = False
        self._shared_batch = True
        self._decoder_start: int | None = None
        self.steps = 0  # decode steps run (for tests and metrics)
        self.max_rows_seen = 0  # largest decode batch so far

    # ---- life cycle ----

    async def start(self) -> None:
        if self._running:
            return
        await asyncio.to_thread(self._load)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if not self._running:
            return
        with self._wake:
            self._running = False
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    def _load(self) -> None:
        source = self.source
        if self.model is None:
            model_class = AutoModelForSeq2SeqLM if self.is_encoder_decoder else AutoModelForCausalLM
            try:
                self.model = model_class.from_pretrained(
                    str(source.path), dtype=source.dtype, trust_remote_code=self.args.trust_remote_code
                )
            except Exception as error:
                raise ModelLoadError(f"cannot load the model in '{source.path}': {error}") from None
            self.model.to(source.device)
        model = self.model
        model.eval()
        generation_config = getattr(model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        if eos is None:
            eos = model.config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos_ids = {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}
        parameters = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in parameters
        self._takes_logits_to_keep = "logits_to_keep" in parameters
        if self.is_encoder_decoder:
            start = getattr(generation_config, "decoder_start_token_id", None)
            if start is None:
                start = model.config.decoder_start_token_id
            if start is None:
                raise ModelLoadError("the encoder-decoder model's config has no decoder_start_token_id")
            self._decoder_start = int(start)
            self._shared_batch = model.config.model_type in _RELATIVE_DECODER_POSITIONS
        else:
            self._shared_batch = self._takes_position_ids
        self._device = source.device

    # ---- the asyncio side ----

    def unsupported(self, sampling: SamplingOptions) -> str | None:
        if sampling.n > self.max_num_seqs:
            return "n"
        if self.is_encoder_decoder and sampling.prompt_logprobs is not None:
            return "echo"  # the encoder input has no logprobs
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not self._running:
            raise NotReady("the generation engine is not running")
        problem = request.sampling.validate()
        if problem:
            raise InvalidInput(problem, param=problem.split()[0])
        name = self.unsupported(request.sampling)
        if name:
            raise InvalidInput(f"'{name}' is not supported by the {self.name} backend", param=name)
        if not request.prompt_token_ids and not self.is_encoder_decoder:
            raise InvalidInput("the prompt is empty", param="prompt")
        total = len(request.prompt_token_ids) + request.sampling.max_tokens
        if len(request.prompt_token_ids) >= self.max_model_len or (
            not self.is_encoder_decoder and total > self.max_model_len
        ):
            raise InvalidInput(
                f"prompt ({len(request.prompt_token_ids)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                f"= {total} is more than the model's context length ({self.max_model_len})",
                param="max_tokens",
            )
        state = _RequestState(request=request, loop=asyncio.get_running_loop(), queue=asyncio.Queue())
        with self._wake:
            if self.dead_reason is not None:
                raise NotReady(f"the generation engine died ({self.dead_reason})")
            if len(self._inbox) + len(self._waiting) >= self.max_queue_size:
                raise Overloaded(f"{self.max_queue_size} generation requests are waiting; retry later")
            self._inbox.append(state)
            self._wake.notify()
        try:
            while True:
                item = await state.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not state.done:
                with self._wake:
                    state.aborted = True
                    self._wake.notify()

    # ---- the engine thread ----

    @property
    def dead_reason(self) -> str | None:
        """Why the engine thread is gone while it should run (None while it is healthy or stopped on purpose)."""
        if self._dead is None and self._running and self._thread is not None and not self._thread.is_alive():
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
        touched: list[_RequestState] = []
        self._admit(touched)
        for position, batch in enumerate(self._batches):
            self._decode(batch, touched)
            self._batches[position] = batch.select([i for i, r in enumerate(batch.rows) if r.finish_reason is None])
        self._batches = [b for b in self._batches if b is not None]
        self._emit(touched)

    def _active_rows(self) -> int:
        return sum(len(b.rows) for b in self._batches)

    def _admit(self, touched: list[_RequestState]) -> None:
        free = self.max_num_seqs - self._active_rows()
        budget = self.max_prefill_tokens
        admitted: list[_Batch] = []
        while self._waiting:
            state = self._waiting[0]
            n = state.sampling.n
            prompt_len = len(state.request.prompt_token_ids)
            if n > free or (admitted and prompt_len > budget):
                break
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
            self._batches = [_Batch.concat(self._batches + admitted)]
        elif self.is_encoder_decoder:
            # Decoders admitted together have the same length: one batch, no padding.
            self._batches.append(_Batch.concat(admitted))
        else:
            self._batches.extend(admitted)

    def _prefill(self, state: _RequestState) -> _Batch | None:
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
            keys, values = _cache_tensors(cache.self_attention_cache)
            cross_keys, cross_values = _cache_tensors(cache.cross_attention_cache)
            batch = _Batch(
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
            keys, values = _cache_tensors(out.past_key_values)
            batch = _Batch(rows=[], keys=keys, values=values, mask=torch.ones_like(prompt))
        logits = out.logits[:, -1, :]
        if want_prompt_logprobs:
            state.prompt_logprobs = self._prompt_logprobs(out.logits[0], state.request.prompt_token_ids, sampling)
        rows = []
        for index in range(sampling.n):
            row = _Row(
                state=state,
                index=index,
                prompt_len=len(state.request.prompt_token_ids),
                detokenizer=_Detokenizer(
                    self.tokenizer,
                    () if self.is_encoder_decoder else state.request.prompt_token_ids,
                    sampling.skip_special_tokens,
                ),
                text=_TextState(sampling.stop, sampling.include_stop_str_in_output),
            )
            if sampling.presence_penalty != 0.0 or sampling.frequency_penalty != 0.0:
                row.counts = torch.zeros(logits.shape[-1], dtype=torch.float32, device=self._device)
            if sampling.repetition_penalty != 1.0:
                row.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self._device)
                if not self.is_encoder_decoder:
                    row.seen[prompt[0]] = True
            rows.append(row)
        state.rows_left = len(rows)
        self._sample(logits.expand(len(rows), -1), rows)
        for row in rows:
            self._advance(row)
        keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
        batch = batch.repeat(len(rows))
        batch.rows = rows
        return batch.select(keep)

    def _decode(self, batch: _Batch, touched: list[_RequestState]) -> None:
        model = self.model
        assert model is not None
        rows = batch.rows
        size = len(rows)
        tokens = torch.tensor([[row.next_token] for row in rows], dtype=torch.long, device=self._device)
        mask = torch.cat([batch.mask, torch.ones((size, 1), dtype=batch.mask.dtype, device=self._device)], dim=1)
        self_cache = _cache_from(batch.keys, batch.values)
        if self.is_encoder_decoder:
            assert batch.cross_keys is not None and batch.cross_values is not None
            cache = EncoderDecoderCache(self_cache, _cache_from(batch.cross_keys, batch.cross_values))
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
        batch.keys, batch.values = _cache_tensors(self_cache)
        batch.mask = mask
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, size)
        self._sample(out.logits[:, -1, :], rows)
        for row in rows:
            self._advance(row)
            if row.state not in touched:
                touched.append(row.state)

    # ---- sampling ----

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Choose each row's next token (row.next_token) and record its logprobs."""
        logits = logits.float()
        need_logprobs = any(row.state.sampling.logprobs is not None for row in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if need_logprobs else None
        argmax = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            sampling = row.state.sampling
            plain = (
                sampling.greedy
                and sampling.presence_penalty == 0.0
                and sampling.frequency_penalty == 0.0
                and sampling.repetition_penalty == 1.0
                and (sampling.min_tokens == 0 or len(row.generated) >= sampling.min_tokens)
            )
            token = argmax[i] if plain else self._sample_row(logits[i], row)
            row.next_token = token
            if logprobs is not None and sampling.logprobs is not None:
                row.new_logprobs.append(self._token_logprobs(logprobs[i], token, sampling.logprobs))

    def _sample_row(self, logits: torch.Tensor, row: _Row) -> int:
        sampling = row.state.sampling
        x = logits.clone()
        if row.seen is not None:
            penalty = sampling.repetition_penalty
            picked = x[row.seen]
            x[row.seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if row.counts is not None:
            x -= sampling.frequency_penalty * row.counts + sampling.presence_penalty * (row.counts > 0).float()
        if len(row.generated) < sampling.min_tokens:
            banned = [t for t in (*self._eos_ids, *sampling.stop_token_ids) if 0 <= t < x.shape[-1]]
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

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_texts[token_id] = text
        return text

    def _token_logprobs(self, logprobs: torch.Tensor, token: int, top: int) -> TokenLogprobs:
        chosen = Logprob(token, self._token_text(token), float(logprobs[token]))
        alternatives: tuple[Logprob, ...] = ()
        if top > 0:
            values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
            alternatives = tuple(
                Logprob(int(t), self._token_text(int(t)), float(v))
                for t, v in zip(ids.tolist(), values.tolist(), strict=True)
            )
        return TokenLogprobs(chosen, alternatives)

    def _prompt_logprobs(
        self, logits: torch.Tensor, prompt: tuple[int, ...], sampling: SamplingOptions
    ) -> tuple[TokenLogprobs | None, ...]:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = sampling.prompt_logprobs or 0
        entries: list[TokenLogprobs | None] = [None]
        for position in range(1, len(prompt)):
            entries.append(self._token_logprobs(logprobs[position - 1], prompt[position], top))
        return tuple(entries)

    # ---- after sampling: bookkeeping, text, stop conditions ----

    def _advance(self, row: _Row) -> None:
        sampling = row.state.sampling
        token = row.next_token
        row.generated.append(token)
        row.new_ids.append(token)
        if row.counts is not None:
            row.counts[token] += 1
        if row.seen is not None:
            row.seen[token] = True
        is_eos = token in self._eos_ids and not sampling.ignore_eos
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

    def _emit(self, touched: list[_RequestState]) -> None:
        # One call_soon_threadsafe per event loop and step (each wakes the loop through a socket).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_RequestState, GenerationOutput]]] = {}
        for state in touched:
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
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for state, _ in items:
                    state.aborted = True

    # ---- for tests and benchmarks ----

    def active_requests(self) -> int:
        """Requests waiting or running (read from another thread: an estimate)."""
        states = {row.state for batch in list(self._batches) for row in batch.rows}
        return len(states) + len(self._waiting) + len(self._inbox)


__all__ = ["TransformersBackend"]
