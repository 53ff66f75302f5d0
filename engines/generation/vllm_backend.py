"""Text generation on vLLM's async engine (vllm.v1 `AsyncLLM`), in the worker's own process.

One engine per BentoML worker: `start()` builds it with `AsyncLLM.from_engine_args(AsyncEngineArgs(...))`
(vLLM runs its engine core in a child process it manages itself; requests go to it through vLLM's
own API, not over HTTP). Each `generate()` maps `SamplingOptions` to `vllm.SamplingParams` with
`output_kind=DELTA` and turns every `RequestOutput` into a `GenerationOutput` of the choices that
moved. Closing or cancelling the consumer aborts the request in the engine.

`vllm serve` arguments, lowest precedence first: what the server decides (model folder, dtype,
max_model_len, trust_remote_code, revisions, served_model_name = model_name, tensor_parallel_size = gpus
when gpus > 1, max_num_queued_reqs = max_queue_size), then `ServerArguments.engine_args` (any `vllm serve`
argument by its own name), all parsed by vLLM's own parser into the Namespace `vllm serve` would build;
then the `engine_args` given to the constructor (tests; typed values set on that Namespace). The engine
is `AsyncEngineArgs.from_cli_args(namespace)`; once it is up, `openai_app` is vLLM's own OpenAI server
app on it (engines/generation/vllm_openai.py), which routes/vllm_openai.py serves under /openai.
vLLM's engine statistics are on (disable_log_stats false unless given), so its Prometheus metrics
(vllm:num_requests_running, vllm:kv_cache_usage_perc, TTFT, ...) are recorded for /metrics.

On a CPU the engine reads two environment variables, set here when unset:
VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default 1) and VLLM_ENABLE_V1_MULTIPROCESSING=0 (the model
runs in the engine-core process rather than in one more worker process: starts in seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import torch

from engines.generation.backend import (
    ChoiceDelta,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    Logprob,
    SamplingOptions,
    TokenLogprobs,
    check_sampling,
)
from engines.generation.defaults import generation_config_defaults
from engines.generation.vllm_openai import start_openai_app
from engines.process_priority import new_processes_at
from handlers.errors import InvalidInput, NotReady, Overloaded, ServingError
from settings.arguments import ServerArguments
from settings.loading import ModelLoadError, ModelSource
from settings.tasks import Task
from settings.vllm_serve_args import ServeArgumentError, parse_serve_arguments

logger = logging.getLogger(__name__)

CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DEFAULT_MAX_LOGPROBS = 20  # vLLM's default max_logprobs


def cpu_unsupported_reason(source: ModelSource) -> str | None:
    """Why vLLM's CPU attention cannot run this model (None when it can, or off the CPU).

    Its kernels take only some head sizes (32, 64, 80, 96, 112, 128, ...): a model with another one
    fails at engine start, so backend selection should send it to transformers instead.
    """
    if source.device.type != "cpu":
        return None
    config = source.config.get_text_config() if hasattr(source.config, "get_text_config") else source.config
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
        head_dim = hidden // heads if hidden and heads else None
    if not head_dim:
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # another vllm layout: vLLM 0.32's list
        supported = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]
    if int(head_dim) not in supported:
        return f"vLLM's CPU attention takes head sizes {supported}; this model's is {head_dim}"
    return None


def _finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None or reason in ("stop", "length"):
        return reason  # type: ignore[return-value]
    if reason == "abort":
        raise NotReady("the generation engine aborted the request (it is stopping)")
    raise ServingError(f"the generation engine failed the request (finish reason '{reason}')")


def serve_namespace(source: ModelSource, args: ServerArguments, **fixed: Any) -> argparse.Namespace:
    """The `vllm serve` Namespace for this model: the server's own arguments under vLLM's names, `fixed`
    (e.g. runner="pooling"), then the user's vLLM arguments, which win."""
    values: dict[str, Any] = {
        "model": str(source.path),
        "tokenizer": str(source.path),
        "served_model_name": [args.model_name],
        "dtype": _DTYPE_NAMES.get(source.dtype, "auto"),
        "max_model_len": source.max_model_len,
        "trust_remote_code": args.trust_remote_code,
        "max_num_queued_reqs": args.max_queue_size,
        "disable_log_stats": False,
        # A server argument of ours with vLLM's name and meaning: it reaches vLLM's own chat layer too.
        "trust_request_chat_template": args.trust_request_chat_template,
        **fixed,
    }
    if args.model_revision:
        values["revision"] = args.model_revision
    if args.tokenizer_revision:
        values["tokenizer_revision"] = args.tokenizer_revision
    if args.gpus > 1:
        values["tensor_parallel_size"] = args.gpus
    try:
        return parse_serve_arguments({**values, **args.engine_args})
    except ServeArgumentError as error:
        raise ModelLoadError(f"invalid vLLM arguments: {error}") from None


def build_engine(namespace: argparse.Namespace, nice: int = 0) -> Any:
    """vLLM's AsyncLLM from a `vllm serve` Namespace, as `vllm serve` builds it (blocks for seconds); the
    processes it starts (its engine core and any workers) run at `nice`."""
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    try:
        engine_args = AsyncEngineArgs.from_cli_args(namespace)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"invalid vLLM engine arguments: {error}") from None
    try:
        with new_processes_at(nice, "vLLM engine"):
            return AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
    except Exception as error:
        raise ModelLoadError(f"the vLLM engine did not start: {type(error).__name__}: {error}") from error


class VLLMBackend:
    """GenerationBackend on vLLM's AsyncLLM (continuous batching, paged KV cache)."""

    name = "vllm"

    def __init__(
        self, source: ModelSource, args: ServerArguments, *, engine_args: Mapping[str, Any] | None = None
    ) -> None:
        if not source.task.is_generative or source.task == Task.text2text_generation:
            raise ModelLoadError(f"task '{source.task.value}' is not served by the vllm backend")
        self.source = source
        self.args = args
        self.tokenizer = source.tokenizer
        self.max_model_len = source.max_model_len
        self.sampling_defaults = generation_config_defaults(source)
        self.engine: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.openai_app: Any = None  # vLLM's OpenAI server app (FastAPI) on that engine, once started
        self._openai_lifespan = contextlib.AsyncExitStack()  # the app's, entered at start, left at stop
        self._overrides = dict(engine_args or {})
        self._max_logprobs = _DEFAULT_MAX_LOGPROBS
        self._token_text: dict[int, str] = {}

    # ---- life cycle ----

    def serve_arguments(self) -> argparse.Namespace:
        """The `vllm serve` Namespace for this model (see the module docstring)."""
        namespace = serve_namespace(self.source, self.args)
        for name, value in self._overrides.items():
            setattr(namespace, name, value)
        return namespace

    def engine_arguments(self) -> dict[str, Any]:
        """The fields of the AsyncEngineArgs built from `serve_arguments()`."""
        from vllm import AsyncEngineArgs

        engine_args = AsyncEngineArgs.from_cli_args(self.serve_arguments())
        return {field.name: getattr(engine_args, field.name) for field in dataclasses.fields(engine_args)}

    async def start(self) -> None:
        if self.engine is not None:
            return
        reason = cpu_unsupported_reason(self.source)
        if reason:  # the engine would start, then die on its first request
            raise ModelLoadError(f"the vllm backend cannot serve this model on a CPU: {reason}")
        if self.source.device.type == "cpu":
            for name, value in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(name, value)
        namespace = self.serve_arguments()
        # Building the engine blocks for seconds (it starts and waits for the engine-core process).
        self.engine = await asyncio.to_thread(build_engine, namespace, self.args.engine_nice)
        model_config = self.engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self._max_logprobs = int(getattr(model_config, "max_logprobs", _DEFAULT_MAX_LOGPROBS))
        try:
            await self._warm_up()
        except Exception as error:
            await self.stop()
            raise ModelLoadError(f"the vLLM engine failed its first request: {type(error).__name__}: {error}") from None
        try:
            self.openai_app = await start_openai_app(self.engine, namespace, self._openai_lifespan)
        except Exception as error:
            await self.stop()
            raise ModelLoadError(f"vLLM's OpenAI layer did not start: {type(error).__name__}: {error}") from error
        logger.info("vLLM engine started: %s, max_model_len %d", self.source.path, self.max_model_len)

    async def _warm_up(self) -> None:
        """One token from a one-token prompt: a model the engine cannot run fails here, not on a client."""
        token = self.tokenizer.bos_token_id
        if token is None:
            token = self.tokenizer.eos_token_id or 0
        request = GenerationRequest("warm-up", (int(token),), SamplingOptions(max_tokens=1, temperature=0.0))
        async for _ in self.generate(request):
            pass

    async def stop(self) -> None:
        self.openai_app = None
        await self._openai_lifespan.aclose()
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()

    # ---- requests ----

    def unsupported(self, sampling: SamplingOptions) -> str | None:
        if sampling.n > 1 and sampling.greedy:
            return "n"  # vLLM: "n must be 1 when using greedy sampling"
        if sampling.logprobs is not None and sampling.logprobs > self._max_logprobs:
            return "logprobs"
        if sampling.prompt_logprobs is not None and sampling.prompt_logprobs > self._max_logprobs:
            return "prompt_logprobs"
        return None

    def sampling_params(self, sampling: SamplingOptions) -> Any:
        """vllm.SamplingParams for these options, streaming deltas."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        try:
            return self._sampling_params(SamplingParams, RequestOutputKind.DELTA, sampling)
        except (VLLMClientError, ValueError) as error:
            raise InvalidInput(str(error), param=getattr(error, "parameter", None)) from None

    @staticmethod
    def _sampling_params(sampling_params: Any, delta: Any, sampling: SamplingOptions) -> Any:
        return sampling_params(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),
            min_p=sampling.min_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            include_stop_str_in_output=sampling.include_stop_str_in_output,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            logprobs=sampling.logprobs,
            prompt_logprobs=sampling.prompt_logprobs,
            max_tokens=sampling.max_tokens,
            min_tokens=sampling.min_tokens,
            ignore_eos=sampling.ignore_eos,
            skip_special_tokens=sampling.skip_special_tokens,
            output_kind=delta,
        )

    def _check(self, request: GenerationRequest) -> None:
        sampling = request.sampling
        check_sampling(self, sampling)
        if not request.prompt_token_ids:
            raise InvalidInput("the prompt is empty", param="prompt")
        total = len(request.prompt_token_ids) + sampling.max_tokens
        if len(request.prompt_token_ids) >= self.max_model_len or total > self.max_model_len:
            raise InvalidInput(
                f"prompt ({len(request.prompt_token_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                f"= {total} is more than the model's context length ({self.max_model_len})",
                param="max_tokens",
            )

    @property
    def dead_reason(self) -> str | None:
        """AsyncLLM's own verdict: `errored` once its engine core or output handler died (EngineDeadError)."""
        engine = self.engine
        if engine is None or not engine.errored:
            return None
        return f"{type(engine.dead_error).__name__}: {engine.dead_error}"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        engine = self.engine
        if engine is None:
            raise NotReady("the generation engine is not running")
        if self.dead_reason is not None:
            raise NotReady(f"the generation engine died ({self.dead_reason})")
        self._check(request)
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.inputs import TokensPrompt

        sampling = request.sampling
        params = self.sampling_params(sampling)
        # Ids must be unique in the engine; clients may reuse theirs.
        engine_id = f"{request.request_id}-{uuid.uuid4().hex[:12]}"
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        stream = engine.generate(prompt, params, engine_id)
        finished = False
        sent_prompt_logprobs = False
        try:
            while True:
                try:
                    out = await anext(stream)
                except StopAsyncIteration:
                    break
                except VLLMClientError as error:
                    raise InvalidInput(str(error), param=getattr(error, "parameter", None)) from None
                except GracefulHTTPError as error:  # admission control: max_num_queued_reqs / tokens
                    raise Overloaded(f"the generation queue is full; retry later ({error})") from None
                prompt_logprobs = None
                if sampling.prompt_logprobs is not None and not sent_prompt_logprobs and out.prompt_logprobs:
                    prompt_logprobs = self._prompt_logprobs(request.prompt_token_ids, out.prompt_logprobs, sampling)
                    sent_prompt_logprobs = True
                choices = tuple(
                    self._choice(completion, sampling)
                    for completion in out.outputs
                    if completion.token_ids or completion.text or completion.finish_reason is not None
                )
                finished = bool(out.finished)
                if not choices and not finished and prompt_logprobs is None:
                    continue
                yield GenerationOutput(
                    request_id=request.request_id,
                    prompt_token_count=len(request.prompt_token_ids),
                    choices=choices,
                    prompt_logprobs=prompt_logprobs,
                    finished=finished,
                )
                if finished:
                    return
        finally:
            # Closing vLLM's stream aborts the request when it has not finished (vLLM catches the
            # GeneratorExit / CancelledError); the explicit abort covers a stream that never started.
            await stream.aclose()
            if not finished:
                with contextlib.suppress(Exception):
                    await engine.abort(engine_id)

    # ---- conversions ----

    def _choice(self, completion: Any, sampling: SamplingOptions) -> ChoiceDelta:
        token_ids = tuple(int(t) for t in completion.token_ids)
        logprobs = None
        if sampling.logprobs is not None:
            positions = completion.logprobs or []
            logprobs = tuple(
                self._token_logprobs(token_id, positions[i] if i < len(positions) else None, sampling.logprobs)
                for i, token_id in enumerate(token_ids)
            )
        stop_reason = completion.stop_reason
        return ChoiceDelta(
            index=int(completion.index),
            token_ids=token_ids,
            text=completion.text or "",
            logprobs=logprobs,
            finish_reason=_finish_reason(completion.finish_reason),
            stop_reason=stop_reason if isinstance(stop_reason, str | int) else None,
        )

    def _prompt_logprobs(
        self, prompt_ids: Sequence[int], positions: Sequence[Any], sampling: SamplingOptions
    ) -> tuple[TokenLogprobs | None, ...]:
        k = sampling.prompt_logprobs or 0
        result: list[TokenLogprobs | None] = []
        for i, token_id in enumerate(prompt_ids):
            position = positions[i] if i < len(positions) else None
            result.append(None if i == 0 or position is None else self._token_logprobs(token_id, position, k))
        return tuple(result)

    def _token_logprobs(self, token_id: int, position: Mapping[int, Any] | None, k: int) -> TokenLogprobs:
        position = position or {}
        chosen = position.get(token_id)
        chosen_logprob = float(chosen.logprob) if chosen is not None else float("nan")
        ranked = sorted(
            ((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k),
            key=lambda item: item[1].rank,
        )[:k]
        return TokenLogprobs(
            chosen=Logprob(token_id, self._text(token_id, chosen), chosen_logprob),
            top=tuple(Logprob(int(tid), self._text(int(tid), lp), float(lp.logprob)) for tid, lp in ranked),
        )

    def _text(self, token_id: int, logprob: Any) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        if decoded is not None:
            return decoded
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text
