"""TransformersBackend: the GenerationBackend on a transformers model: life cycle, loading, and the
asyncio side (`generate`) of the engine thread in `scheduler.py`. Torch runs only on that thread."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from engines.generation.backend import GenerationOutput, GenerationRequest, RequestPolicy, SamplingOptions
from engines.generation.defaults import generation_config_defaults
from engines.generation.transformers.cache_support import refusal, unsupported_cache_reason, unsupported_layers_reason
from engines.generation.transformers.grammar import Grammars
from engines.generation.transformers.sampling import Sampler
from engines.generation.transformers.scheduler import Scheduler
from engines.generation.transformers.state import RequestState
from handlers.errors import InvalidInput, NotReady, Overloaded
from settings.arguments import ServerArguments
from settings.loading import ModelLoadError, ModelSource
from settings.tasks import Task

logger = logging.getLogger(__name__)


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """K and V bytes of one token of one row over every (decoder) layer; encoder-decoder models count the
    cross-attention cache too, as if the encoder input were as long as the decoder's."""
    config = model.config.get_text_config(decoder=True)
    layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "num_decoder_layers", None) or 0)
    layers = layers or int(getattr(config, "num_layers", 1))
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", 1))
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None)
    head_dim = int(head_dim or config.hidden_size // heads)
    size = 2 * layers * kv_heads * head_dim * model.dtype.itemsize
    return size * (2 if model.config.is_encoder_decoder else 1)


def kv_budget_bytes(budget_mb: int | None, device: Any) -> int:
    """The argument, else half the memory free now (after the model is loaded)."""
    if budget_mb is not None:
        return budget_mb * 2**20
    if str(device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * 0.5)
    return int(psutil.virtual_memory().available * 0.5)


# Model types whose decoder positions are relative (left padding of the decoder cache is invisible).
_RELATIVE_DECODER_POSITIONS = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}


class TransformersBackend(Scheduler):
    """GenerationBackend on a transformers model, continuously batched on one engine thread."""

    name = "huggingface"
    supports_structured_outputs = True
    supports_logit_bias = True

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
        super().__init__()
        self.source = source
        self.args = args
        self.tokenizer = source.tokenizer
        self.max_model_len = source.max_model_len
        self.sampling_defaults = generation_config_defaults(source)
        self.policy = RequestPolicy.from_args(args)
        self.is_encoder_decoder = source.task == Task.text2text_generation
        self.max_num_seqs = max_num_seqs or args.max_batch_size
        self.max_prefill_tokens = args.max_batch_tokens
        self.max_queue_size = args.max_queue_size
        self.model: PreTrainedModel | None = model
        self._thread: threading.Thread | None = None
        self._grammar_error = ""
        self.warmed_up = False

    # ---- life cycle ----

    async def start(self) -> None:
        if self._running:
            return
        await asyncio.to_thread(self._load)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()
        await self._warm_up()

    async def _warm_up(self) -> None:
        """One short generation before ready: the first forward passes allocate memory and pick kernels, and
        a model that cannot generate fails the start instead of the first request."""
        ids = list(self.tokenizer("Hello")["input_ids"]) or [next(iter(self.sampler.eos_ids), 0)]
        sampling = SamplingOptions(max_tokens=2, temperature=0.0, ignore_eos=True)
        started = time.perf_counter()
        async for _ in self.generate(GenerationRequest("warm-up", tuple(ids), sampling)):
            pass
        self.warmed_up = True
        logger.info("generation warm-up done in %.2f s", time.perf_counter() - started)

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
        self._refuse_unbatchable_cache(model)
        generation_config = getattr(model, "generation_config", None)
        eos = getattr(generation_config, "eos_token_id", None)
        if eos is None:
            eos = model.config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        eos_ids = {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}
        self.sampler = Sampler(self.tokenizer, eos_ids, self._grammars(model, eos_ids))
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
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        self.kv_budget_bytes = kv_budget_bytes(self.args.kv_cache_budget_mb, source.device)
        logger.info(
            "KV-cache budget %.0f MiB (%d bytes per token and row)",
            self.kv_budget_bytes / 2**20,
            self.kv_bytes_per_token,
        )

    def _refuse_unbatchable_cache(self, model: PreTrainedModel) -> None:
        """ModelLoadError naming the reason when the scheduler's KV-batch surgery cannot hold this model's
        cache (hybrid Mamba/SSM layers): by its config, then by the cache a one-token forward returns, which
        also catches remote code whose config does not say. Encoder-decoder models are checked by config."""
        reason = unsupported_layers_reason(model.config)
        if reason is None and not self.is_encoder_decoder:
            token = self.tokenizer.bos_token_id or 0
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([[token]], device=model.device), use_cache=True)
            reason = unsupported_cache_reason(getattr(out, "past_key_values", None))
        if reason is not None:
            architecture = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
            instead = "Try --arg backend=vllm if vLLM's model registry has this architecture."
            raise ModelLoadError(refusal(architecture, reason, instead))

    def _grammars(self, model: PreTrainedModel, eos_ids: set[int]) -> Grammars | None:
        """xgrammar over this tokenizer, sized to the model's logits; None (structured outputs refused with
        the reason) when the tokenizer cannot be read by xgrammar."""
        head = model.get_output_embeddings()
        vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        try:
            return Grammars(self.tokenizer, vocab_size, eos_ids)
        except Exception as error:
            self._grammar_error = f"{type(error).__name__}: {error}"
            logger.warning("structured outputs are off for this model: %s", self._grammar_error)
            return None

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
        limit = self.policy.check(request.sampling)
        if limit:
            raise InvalidInput(limit[1], param=limit[0])
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
        needed = self.kv_bytes(request.sampling.n, len(request.prompt_token_ids) + request.sampling.max_tokens)
        if self.kv_budget_bytes and needed > self.kv_budget_bytes:
            raise InvalidInput(
                f"this request needs {needed / 2**20:.1f} MiB of KV cache (n x (prompt + max_tokens) tokens), more "
                f"than the server's whole budget of {self.kv_budget_bytes / 2**20:.1f} MiB (argument "
                "kv_cache_budget_mb); lower n or max_tokens",
                param="max_tokens",
            )
        state = RequestState(request=request, loop=asyncio.get_running_loop(), queue=asyncio.Queue())
        if request.sampling.structured is not None:
            grammars = self.sampler.grammars
            if grammars is None:
                raise InvalidInput(
                    f"structured outputs are not available for this model ({self._grammar_error})",
                    param="structured_outputs",
                )
            state.grammar = await asyncio.to_thread(grammars.compile, request.sampling.structured)
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
