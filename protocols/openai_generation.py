"""OpenAI completions and chat completions over any GenerationBackend (no torch here).

Routes call:

    await create_completion(backend, body, model_name=...)       # POST /openai/v1/completions
    await create_chat_completion(backend, body, model_name=...)  # POST /openai/v1/chat/completions

Each returns the OpenAI response dict, or, when the body has "stream": true, an async iterator of
SSE lines ("data: {chunk}\\n\\n" ... "data: [DONE]\\n\\n") to send with media type text/event-stream.
Every client mistake raises handlers.errors.InvalidInput (400) before anything is streamed; a full
queue raises Overloaded (429). An error after streaming began is sent as a `data: {"error": ...}`
event followed by [DONE], as vLLM does.

Default precedence for each sampling parameter: the request's value → the model's
generation_config.json (`backend.sampling_defaults`) → the OpenAI default. max_tokens defaults to 16
for completions (OpenAI's and KServe's default) and to the rest of the context for chat.

Differences from KServe's transformers backend (all compatible with its wire format): n > 1,
logprobs, top_k, stream_options.include_usage are honoured; stop strings are removed from the text;
finish_reason appears only on the last chunk of each choice. Parameters that cannot be honoured
(logit_bias, suffix, best_of != n, tools, non-text response_format, token-id prompts, ...) are
refused by name with a 400; unknown fields are accepted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines.generation.backend import (
    ChoiceDelta,
    GenerationBackend,
    GenerationOutput,
    GenerationRequest,
    SamplingOptions,
    TokenLogprobs,
    check_sampling,
)
from handlers.errors import InvalidInput, ServingError
from protocols.errors import invalid_from_validation, openai_error_body

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16


# --------------------------------------------------------------------------------------------------
# Request schemas
# --------------------------------------------------------------------------------------------------


class OpenAIBaseModel(BaseModel):
    """Accepts fields it does not know (clients send new ones all the time) and logs their names."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def log_ignored(self, endpoint: str) -> None:
        if self.model_extra:
            logger.info("%s request: ignored unknown fields %s", endpoint, sorted(self.model_extra))


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with the usage (choices empty).")


class _SamplingFields(OpenAIBaseModel):
    """Fields shared by completions and chat, in OpenAI's order, then vLLM's extras."""

    model: str | None = Field(None, description="Served model name; the route checks it.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI default 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (400 when non-empty).")
    n: int = Field(1, ge=1, le=128, description="Choices per prompt.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI default 0.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'} is supported.")
    seed: int | None = Field(None, description="Seeds sampling: same seed and options, same output.")
    stop: str | list[str] | None = Field(None, description="Stop strings, excluded from the text.")
    stream: bool = Field(False, description="Server-sent events, one chunk per step and choice.")
    stream_options: StreamOptions | None = Field(None, description="include_usage: a last usage chunk.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy. OpenAI default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling. OpenAI default 1.")
    user: str | None = Field(None, description="Accepted and ignored.")
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, description="vLLM extra: keep the k most likely tokens; 0/-1 = all.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM extra: relative probability floor.")
    repetition_penalty: float | None = Field(None, gt=0.0, description="vLLM extra: 1 = off.")
    min_tokens: int = Field(0, ge=0, description="vLLM extra: no eos / stop token before this many tokens.")
    ignore_eos: bool = Field(False, description="vLLM extra: generate past eos up to max_tokens.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM extra: token ids that end a choice.")
    include_stop_str_in_output: bool = Field(False, description="vLLM extra: keep the stop string.")
    skip_special_tokens: bool = Field(True, description="vLLM extra: leave special tokens out of the text.")

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidInput("'logit_bias' is not supported", param="logit_bias")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidInput(
                f"'response_format' of type '{self.response_format.get('type')}' is not supported; only 'text'",
                param="response_format",
            )

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingFields):
    """POST /openai/v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(..., description="Text or list of texts.")
    best_of: int | None = Field(None, description="Only best_of == n is supported.")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Logprobs of the chosen tokens and this many alternatives."
    )
    max_tokens: int | None = Field(None, ge=1, description="Default: generation_config, else 16.")
    suffix: str | None = Field(None, description="Not supported (400).")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise InvalidInput("'suffix' is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidInput("'best_of' is not supported (only best_of == n)", param="best_of")

    def prompts(self) -> list[str]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            if not prompt:
                raise InvalidInput("'prompt' is an empty list", param="prompt")
            return list(prompt)  # type: ignore[arg-type]
        raise InvalidInput("'prompt' as token ids is not supported; send text", param="prompt")


class ChatCompletionRequest(_SamplingFields):
    """POST /openai/v1/chat/completions."""

    messages: list[dict[str, Any]] = Field(..., min_length=1, description="The conversation so far.")
    logprobs: bool = Field(False, description="Return the chosen tokens' logprobs.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported (400 when non-empty).")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none' / 'auto' without tools.")
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported (400 when non-empty).")
    function_call: str | dict[str, Any] | None = Field(None, description="Not supported.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored (no tools).")
    # extras
    chat_template: str | None = Field(None, description="Extra: a Jinja chat template replacing the model's.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra: passed to the template.")
    add_generation_prompt: bool = Field(True, description="Extra: end the prompt with the assistant header.")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise InvalidInput("'tools' is not supported", param="tools")
        if self.functions:
            raise InvalidInput("'functions' is not supported", param="functions")
        if self.function_call not in (None, "none", "auto"):
            raise InvalidInput("'function_call' is not supported", param="function_call")
        if self.tool_choice not in (None, "none", "auto"):
            raise InvalidInput("'tool_choice' is not supported", param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInput("'top_logprobs' needs 'logprobs': true", param="top_logprobs")

    def text_messages(self) -> list[dict[str, Any]]:
        """Messages with text content only (a list of text parts is joined with newlines)."""
        result = []
        for i, message in enumerate(self.messages):
            if not isinstance(message.get("role"), str):
                raise InvalidInput(f"messages[{i}] has no 'role'", param="messages")
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind != "text":
                        raise InvalidInput(
                            f"messages[{i}].content[{j}] of type '{kind}' is not supported; only 'text'",
                            param="messages",
                        )
                    texts.append(str(part.get("text", "")))
                content = "\n".join(texts)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise InvalidInput(f"messages[{i}].content must be a string or a list of parts", param="messages")
            result.append({**message, "content": content})
        return result


_Request = TypeVar("_Request", CompletionRequest, ChatCompletionRequest)


def _parse(model: type[_Request], body: Mapping[str, Any], what: str) -> _Request:
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        raise invalid_from_validation(error, f"{what} request") from None
    request.log_ignored(what)
    request.refuse_unsupported()
    return request


def parse_completion_request(body: Mapping[str, Any]) -> CompletionRequest:
    return _parse(CompletionRequest, body, "completion")


def parse_chat_request(body: Mapping[str, Any]) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body, "chat completion")


# --------------------------------------------------------------------------------------------------
# Requests → GenerationRequests
# --------------------------------------------------------------------------------------------------


def _pick(value: Any, key: str, defaults: Mapping[str, Any], fallback: Any) -> Any:
    """request → generation_config → OpenAI default."""
    if value is not None:
        return value
    if key in defaults:
        return defaults[key]
    return fallback


def _sampling(
    request: _SamplingFields,
    defaults: Mapping[str, Any],
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    echo: bool = False,
) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=float(_pick(request.temperature, "temperature", defaults, 1.0)),
        top_p=float(_pick(request.top_p, "top_p", defaults, 1.0)),
        top_k=int(_pick(request.top_k, "top_k", defaults, 0)),
        min_p=float(_pick(request.min_p, "min_p", defaults, 0.0)),
        seed=request.seed,
        stop=tuple(request.stop_strings()),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        include_stop_str_in_output=request.include_stop_str_in_output,
        n=request.n,
        presence_penalty=float(request.presence_penalty or 0.0),
        frequency_penalty=float(request.frequency_penalty or 0.0),
        repetition_penalty=float(_pick(request.repetition_penalty, "repetition_penalty", defaults, 1.0)),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        echo=echo,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        skip_special_tokens=request.skip_special_tokens,
    )


def _check_length(backend: GenerationBackend, prompt_len: int, max_tokens: int) -> None:
    if prompt_len + max_tokens > backend.max_model_len:
        raise InvalidInput(
            f"This model's maximum context length is {backend.max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens and max_tokens is {max_tokens} ({prompt_len + max_tokens} in total). "
            "Shorten the prompt or lower max_tokens.",
            param="max_tokens",
        )


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_generation_requests(
    backend: GenerationBackend, request: CompletionRequest, request_id: str
) -> list[GenerationRequest]:
    """One GenerationRequest per prompt (tokenized with the model's special tokens, as vLLM does)."""
    prompts = request.prompts()
    defaults = backend.sampling_defaults
    max_tokens = int(_pick(request.max_tokens, "max_tokens", defaults, DEFAULT_COMPLETION_MAX_TOKENS))
    logprobs = request.logprobs
    sampling = _sampling(
        request,
        defaults,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=logprobs if request.echo and logprobs is not None else None,
        echo=request.echo,
    )
    check_sampling(backend, sampling)
    result = []
    for i, prompt in enumerate(prompts):
        ids = list(backend.tokenizer(prompt)["input_ids"])
        if not ids:
            raise InvalidInput(f"prompt {i} is empty after tokenization", param="prompt")
        _check_length(backend, len(ids), max_tokens)
        result.append(GenerationRequest(f"{request_id}-{i}", tuple(ids), sampling))
    return result


def chat_prompt_ids(backend: GenerationBackend, request: ChatCompletionRequest) -> list[int]:
    """The conversation rendered by the chat template (the request's, else the model's) and tokenized."""
    tokenizer = backend.tokenizer
    template = request.chat_template
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(
            "this model has no chat template; send 'chat_template' or use /openai/v1/completions",
            param="chat_template",
        )
    try:
        text = tokenizer.apply_chat_template(
            request.text_messages(),
            chat_template=template,
            add_generation_prompt=request.add_generation_prompt,
            tokenize=False,
            **(request.chat_template_kwargs or {}),
        )
    except InvalidInput:
        raise
    except Exception as error:  # jinja2 errors, raise_exception() in templates
        raise InvalidInput(f"the chat template failed: {error}", param="messages") from None
    # The template writes the special tokens (bos, role markers) itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_generation_request(
    backend: GenerationBackend, request: ChatCompletionRequest, request_id: str
) -> GenerationRequest:
    ids = chat_prompt_ids(backend, request)
    if not ids:
        raise InvalidInput("the rendered conversation is empty", param="messages")
    asked = request.max_completion_tokens or request.max_tokens
    rest = backend.max_model_len - len(ids)
    default = backend.sampling_defaults.get("max_tokens")
    if asked is None and rest < 1:
        raise InvalidInput(
            f"This model's maximum context length is {backend.max_model_len} tokens, but the messages have "
            f"{len(ids)} tokens; nothing is left to generate.",
            param="messages",
        )
    max_tokens = int(asked if asked is not None else (min(default, rest) if default else rest))
    top = request.top_logprobs or 0
    sampling = _sampling(
        request, backend.sampling_defaults, max_tokens=max_tokens, logprobs=top if request.logprobs else None
    )
    check_sampling(backend, sampling)
    _check_length(backend, len(ids), max_tokens)
    return GenerationRequest(request_id, tuple(ids), sampling)


# --------------------------------------------------------------------------------------------------
# Running requests and collecting outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class _Choice:
    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class _Runner:
    """Runs several GenerationRequests concurrently and yields (request position, output) as they come.

    `start()` waits for every request's first output, so queue and validation errors surface before
    a response starts; closing the runner (or cancelling its consumer) aborts every request.
    """

    def __init__(self, backend: GenerationBackend, requests: list[GenerationRequest]) -> None:
        self.generators = [backend.generate(r) for r in requests]
        self.queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.first: list[GenerationOutput | None] = [None] * len(requests)

    async def start(self) -> None:
        firsts = [asyncio.ensure_future(anext(g)) for g in self.generators]  # type: ignore[arg-type]
        self.tasks = list(firsts)  # type: ignore[arg-type]
        try:
            await asyncio.gather(*firsts)
        except BaseException:
            await self.close()
            raise
        self.first = [f.result() for f in firsts]
        self.tasks = []
        if len(self.generators) == 1:
            return  # one stream: outputs() reads it directly, without a pump task and queue hop per token
        for position, generator in enumerate(self.generators):
            if not self.first[position].finished:  # type: ignore[union-attr]
                self.tasks.append(asyncio.create_task(self._pump(position, generator)))

    async def _pump(self, position: int, generator: AsyncIterator[GenerationOutput]) -> None:
        try:
            async for output in generator:
                self.queue.put_nowait((position, output))
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self.queue.put_nowait((position, error))
            return
        self.queue.put_nowait((position, None))

    async def outputs(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        for position, output in enumerate(self.first):
            if output is not None:
                yield position, output
        if len(self.generators) == 1:
            if self.first[0] is not None and not self.first[0].finished:
                async for output in self.generators[0]:
                    yield 0, output
            return
        running = len(self.tasks)
        while running:
            position, item = await self.queue.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield position, item
            if item.finished:
                running -= 1

    async def close(self) -> None:
        """Cancel the pumps first (an async generator cannot be closed while it runs), then close."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for generator in self.generators:
            aclose = getattr(generator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # already failed; its error was reported
                    logger.debug("closing a generation stream failed", exc_info=True)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: Mapping[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return f"data: {data}\n\n"


def _append_logprobs(entries: Any, offset: int, into: dict[str, list[Any]]) -> int:
    """Adds entries to OpenAI's legacy logprobs lists; returns the text offset after them."""
    for entry in entries:
        if entry is None:
            continue
        into["tokens"].append(entry.chosen.token)
        into["text_offset"].append(offset)
        offset += len(entry.chosen.token)
        into["token_logprobs"].append(entry.chosen.logprob)
        top = {alt.token: alt.logprob for alt in entry.top}
        top.setdefault(entry.chosen.token, entry.chosen.logprob)
        into["top_logprobs"].append(top)
    return offset


def _completion_logprobs(entries: list[TokenLogprobs | None], text_offset: int) -> dict[str, Any]:
    """Completions' legacy logprobs object; text_offset counts characters of the response text."""
    result: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    _append_logprobs(entries, text_offset, result)
    return result


def _echo_logprobs(prompt: tuple[TokenLogprobs | None, ...], first_token: str) -> dict[str, Any]:
    """The prompt part of echo + logprobs: the first prompt token has no logprob (None)."""
    assert all(entry is not None for entry in prompt[1:])
    result: dict[str, list[Any]] = {
        "tokens": [first_token],
        "token_logprobs": [None],
        "top_logprobs": [None],
        "text_offset": [0],
    }
    _append_logprobs(prompt[1:], len(first_token), result)
    return result


def _merge_logprobs(head: dict[str, Any] | None, tail: dict[str, Any]) -> dict[str, Any]:
    if head is None:
        return tail
    return {key: head[key] + tail[key] for key in head}


def _chat_logprobs(entries: list[TokenLogprobs]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for entry in entries:
        content.append(
            {
                **item(entry.chosen.token, entry.chosen.logprob),
                "top_logprobs": [item(alt.token, alt.logprob) for alt in entry.top],
            }
        )
    return {"content": content, "refusal": None}


async def _sse_stream(events: AsyncIterator[dict[str, Any]], runner: _Runner, what: str) -> AsyncIterator[str]:
    """SSE lines for a stream's chunks; an error after the first byte becomes an error event, then
    `[DONE]`; the requests are aborted however the stream ends (client gone included)."""
    try:
        async for event in events:
            yield _sse(event)
    except ServingError as error:
        yield _sse(openai_error_body(error))
    except asyncio.CancelledError:
        raise
    except Exception as error:
        logger.exception("%s stream failed", what)
        yield _sse(openai_error_body(ServingError(f"generation failed: {error}")))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        await runner.close()
    yield _sse("[DONE]")


async def _prepare(function: Any, *args: Any) -> Any:
    """Tokenization and chat templates run on a worker thread, off the event loop."""
    return await asyncio.to_thread(function, *args)


# --------------------------------------------------------------------------------------------------
# Completions
# --------------------------------------------------------------------------------------------------


async def create_completion(
    backend: GenerationBackend, body: Mapping[str, Any], *, model_name: str | None = None
) -> dict[str, Any] | AsyncIterator[str]:
    """POST /openai/v1/completions: the response dict, or SSE lines when body["stream"] is true."""
    request = parse_completion_request(body)
    request_id = _new_id("cmpl")
    generation_requests = await _prepare(completion_generation_requests, backend, request, request_id)
    model = model_name or request.model or "model"
    runner = _Runner(backend, generation_requests)
    await runner.start()
    prompts = request.prompts()
    context = _CompletionContext(backend, request, generation_requests, prompts, request_id, model)
    if request.stream:
        return _sse_stream(_completion_stream(runner, context), runner, "completion")
    try:
        return await _completion_response(runner, context)
    finally:
        await runner.close()


@dataclass
class _CompletionContext:
    backend: GenerationBackend
    request: CompletionRequest
    generation_requests: list[GenerationRequest]
    prompts: list[str]
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def choice_index(self, position: int, index: int) -> int:
        return position * self.request.n + index

    def echo_head(self, position: int, output: GenerationOutput) -> tuple[str, dict[str, Any] | None]:
        """The echoed prompt text and (with logprobs) its logprobs object."""
        prompt = self.prompts[position]
        if self.request.logprobs is None:
            return prompt, None
        ids = self.generation_requests[position].prompt_token_ids
        first = self.backend.tokenizer.decode([ids[0]]) if ids else ""
        return prompt, _echo_logprobs(output.prompt_logprobs or (None,), first)


async def _completion_response(runner: _Runner, context: _CompletionContext) -> dict[str, Any]:
    request = context.request
    choices: dict[int, _Choice] = {}
    prompt_logprobs: dict[int, tuple[str, dict[str, Any] | None]] = {}
    prompt_tokens = [len(r.prompt_token_ids) for r in context.generation_requests]
    async for position, output in runner.outputs():
        if request.echo and position not in prompt_logprobs:
            prompt_logprobs[position] = context.echo_head(position, output)
        for delta in output.choices:
            _collect(choices.setdefault(context.choice_index(position, delta.index), _Choice()), delta)
    result = []
    for index in sorted(choices):
        choice = choices[index]
        position = index // request.n
        text, logprobs = choice.text, None
        if request.logprobs is not None:
            head_text, head = prompt_logprobs.get(position, ("", None)) if request.echo else ("", None)
            logprobs = _merge_logprobs(head, _completion_logprobs(list(choice.logprobs), len(head_text)))
        if request.echo:
            text = prompt_logprobs[position][0] + text
        result.append(
            {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
        )
    completion_tokens = sum(c.token_count for c in choices.values())
    return {
        "id": context.request_id,
        "object": "text_completion",
        "created": context.created,
        "model": context.model,
        "choices": result,
        "usage": _usage(sum(prompt_tokens), completion_tokens),
        "system_fingerprint": None,
    }


def _collect(choice: _Choice, delta: ChoiceDelta) -> None:
    choice.text += delta.text
    choice.token_count += len(delta.token_ids)
    if delta.logprobs:
        choice.logprobs.extend(delta.logprobs)
    if delta.finish_reason is not None:
        choice.finish_reason = delta.finish_reason
        choice.stop_reason = delta.stop_reason


async def _completion_stream(runner: _Runner, context: _CompletionContext) -> AsyncIterator[dict[str, Any]]:
    request = context.request
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in context.generation_requests)
    completion_tokens = 0
    echoed: set[int] = set()
    offsets: dict[int, int] = {}

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": context.request_id,
            "object": "text_completion",
            "created": context.created,
            "model": context.model,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = None
        return body

    async for position, output in runner.outputs():
        for delta in output.choices:
            index = context.choice_index(position, delta.index)
            completion_tokens += len(delta.token_ids)
            text, logprobs = delta.text, None
            head_text, head = "", None
            if request.echo and index not in echoed:
                echoed.add(index)
                head_text, head = context.echo_head(position, output)
                text = head_text + text
            if request.logprobs is not None:
                offset = offsets.get(index, 0) + len(head_text)
                tail = _completion_logprobs(list(delta.logprobs or ()), offset)
                logprobs = _merge_logprobs(head, tail)
                offsets[index] = offset + sum(len(t) for t in tail["tokens"])
            if not text and delta.finish_reason is None and not logprobs:
                continue
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason,
            }
            yield chunk([choice])
    if include_usage:
        final = chunk([])
        final["usage"] = _usage(prompt_tokens, completion_tokens)
        yield final


# --------------------------------------------------------------------------------------------------
# Chat completions
# --------------------------------------------------------------------------------------------------


async def create_chat_completion(
    backend: GenerationBackend, body: Mapping[str, Any], *, model_name: str | None = None
) -> dict[str, Any] | AsyncIterator[str]:
    """POST /openai/v1/chat/completions: the response dict, or SSE lines when body["stream"] is true."""
    request = parse_chat_request(body)
    request_id = _new_id("chatcmpl")
    generation_request = await _prepare(chat_generation_request, backend, request, request_id)
    model = model_name or request.model or "model"
    runner = _Runner(backend, [generation_request])
    await runner.start()
    created = int(time.time())
    if request.stream:
        return _sse_stream(
            _chat_stream(runner, request, generation_request, request_id, model, created), runner, "chat completion"
        )
    try:
        choices: dict[int, _Choice] = {}
        async for _, output in runner.outputs():
            for delta in output.choices:
                _collect(choices.setdefault(delta.index, _Choice()), delta)
    finally:
        await runner.close()
    result = []
    for index in sorted(choices):
        choice = choices[index]
        result.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": _chat_logprobs(choice.logprobs) if request.logprobs else None,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
        )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": result,
        "usage": _usage(len(generation_request.prompt_token_ids), sum(c.token_count for c in choices.values())),
        "system_fingerprint": None,
    }


async def _chat_stream(
    runner: _Runner,
    request: ChatCompletionRequest,
    generation_request: GenerationRequest,
    request_id: str,
    model: str,
    created: int,
) -> AsyncIterator[dict[str, Any]]:
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    completion_tokens = 0

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = None
        return body

    # OpenAI's first chunk of each choice carries the role and empty content.
    for i in range(request.n):
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield chunk([role])
    async for _, output in runner.outputs():
        for delta in output.choices:
            completion_tokens += len(delta.token_ids)
            if not delta.text and delta.finish_reason is None and not delta.logprobs:
                continue
            choice: dict[str, Any] = {
                "index": delta.index,
                "delta": {"content": delta.text} if delta.text else {},
                "logprobs": _chat_logprobs(list(delta.logprobs or ())) if request.logprobs else None,
                "finish_reason": delta.finish_reason,
            }
            if delta.finish_reason is not None:
                choice["stop_reason"] = delta.stop_reason
            yield chunk([choice])
    if include_usage:
        final = chunk([])
        final["usage"] = _usage(len(generation_request.prompt_token_ids), completion_tokens)
        yield final


__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "chat_generation_request",
    "completion_generation_requests",
    "create_chat_completion",
    "create_completion",
]
