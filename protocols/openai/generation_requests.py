"""OpenAI requests -> GenerationRequests: default precedence, chat templates, context length checks.

Default precedence for each sampling parameter: the request's value -> the model's
generation_config.json (`backend.sampling_defaults`) -> the OpenAI default. max_tokens defaults to 16
for completions (OpenAI's and KServe's default) and to the rest of the context for chat.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

from engines.generation.backend import (
    GenerationBackend,
    GenerationRequest,
    SamplingOptions,
    StructuredOutput,
    check_sampling,
    policy_of,
)
from handlers.errors import InvalidInput
from protocols.openai.schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from protocols.openai.structured import structured_output
from protocols.openai.tools import template_messages


def pick(value: Any, key: str, defaults: Mapping[str, Any], fallback: Any) -> Any:
    """request → generation_config → OpenAI default."""
    if value is not None:
        return value
    if key in defaults:
        return defaults[key]
    return fallback


def sampling_options(
    request: SamplingFields,
    defaults: Mapping[str, Any],
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    echo: bool = False,
) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=float(pick(request.temperature, "temperature", defaults, 1.0)),
        top_p=float(pick(request.top_p, "top_p", defaults, 1.0)),
        top_k=int(pick(request.top_k, "top_k", defaults, 0)),
        min_p=float(pick(request.min_p, "min_p", defaults, 0.0)),
        seed=request.seed,
        stop=tuple(request.stop_strings()),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        include_stop_str_in_output=request.include_stop_str_in_output,
        n=request.n,
        presence_penalty=float(request.presence_penalty or 0.0),
        frequency_penalty=float(request.frequency_penalty or 0.0),
        repetition_penalty=float(pick(request.repetition_penalty, "repetition_penalty", defaults, 1.0)),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        echo=echo,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        skip_special_tokens=request.skip_special_tokens,
        structured=structured_from(request),
    )


def structured_from(request: SamplingFields) -> StructuredOutput | None:
    return structured_output(request.response_format, request.structured_outputs)


def check_length(backend: GenerationBackend, prompt_len: int, max_tokens: int) -> None:
    if prompt_len + max_tokens > backend.max_model_len:
        raise InvalidInput(
            f"This model's maximum context length is {backend.max_model_len} tokens, but the prompt has "
            f"{prompt_len} tokens and max_tokens is {max_tokens} ({prompt_len + max_tokens} in total). "
            "Shorten the prompt or lower max_tokens.",
            param="max_tokens",
        )


def with_logit_bias(
    backend: GenerationBackend, sampling: SamplingOptions, bias: dict[str, float] | None
) -> SamplingOptions:
    """logit_bias's token ids checked against the vocabulary (400 naming them), biases clamped to [-100, 100]."""
    if not bias:
        return sampling
    vocabulary = len(backend.tokenizer)
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidInput(f"logit_bias key '{key}' is not a token id", param="logit_bias") from None
        if not 0 <= token < vocabulary:
            raise InvalidInput(
                f"logit_bias token id {token} is outside the vocabulary (0..{vocabulary - 1})", param="logit_bias"
            )
        pairs.append((token, max(-100.0, min(100.0, float(value)))))
    return dataclasses.replace(sampling, logit_bias=tuple(pairs))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion_generation_requests(
    backend: GenerationBackend, request: CompletionRequest, request_id: str
) -> list[GenerationRequest]:
    """One GenerationRequest per prompt (tokenized with the model's special tokens, as vLLM does)."""
    prompts = request.prompts()
    defaults = backend.sampling_defaults
    max_tokens = int(pick(request.max_tokens, "max_tokens", defaults, DEFAULT_COMPLETION_MAX_TOKENS))
    logprobs = request.logprobs
    sampling = sampling_options(
        request,
        defaults,
        max_tokens=max_tokens,
        logprobs=logprobs,
        prompt_logprobs=request.prompt_logprobs
        if request.prompt_logprobs is not None
        else (logprobs if request.echo and logprobs is not None else None),
        echo=request.echo,
    )
    sampling = with_logit_bias(backend, sampling, request.logit_bias)
    check_sampling(backend, sampling)
    result = []
    vocabulary = len(backend.tokenizer)
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids = list(backend.tokenizer(prompt)["input_ids"])
        else:
            ids = prompt
            bad = [t for t in ids if not 0 <= t < vocabulary]
            if bad:
                raise InvalidInput(
                    f"prompt {i} has token ids {bad[:5]} outside the vocabulary (0..{vocabulary - 1})", param="prompt"
                )
        if not ids:
            raise InvalidInput(f"prompt {i} is empty after tokenization", param="prompt")
        check_length(backend, len(ids), max_tokens)
        result.append(GenerationRequest(f"{request_id}-{i}", tuple(ids), sampling))
    return result


def chat_prompt_ids(backend: GenerationBackend, request: ChatCompletionRequest) -> list[int]:
    """The conversation rendered by the chat template (the request's, else the model's) and tokenized."""
    tokenizer = backend.tokenizer
    template = request.chat_template
    trusted = policy_of(backend).trust_request_chat_template
    if template is not None and not trusted:
        raise InvalidInput(
            "'chat_template' in a request is refused: this server does not run templates sent by clients "
            "(start it with trust_request_chat_template=true to allow them)",
            param="chat_template",
        )
    if template is None and not getattr(tokenizer, "chat_template", None):
        hint = "send 'chat_template' or " if trusted else ""
        raise InvalidInput(f"this model has no chat template; {hint}use /openai/v1/completions", param="chat_template")
    try:
        text = tokenizer.apply_chat_template(
            template_messages(request.text_messages()),
            tools=request.tools or None,
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
    if asked is None:  # the rest of the context, within the server's per-request limits
        asked = min(default or rest, rest, policy_of(backend).default_max_tokens(request.n))
    max_tokens = int(asked)
    top = request.top_logprobs or 0
    sampling = sampling_options(
        request,
        backend.sampling_defaults,
        max_tokens=max_tokens,
        logprobs=top if request.logprobs else None,
        prompt_logprobs=request.prompt_logprobs,
    )
    sampling = with_logit_bias(backend, sampling, request.logit_bias)
    forced = request.tool_plan().structured()
    if forced is not None:  # tool_choice required / named: the grammar of the call
        sampling = dataclasses.replace(sampling, structured=forced)
    check_sampling(backend, sampling)
    check_length(backend, len(ids), max_tokens)
    return GenerationRequest(request_id, tuple(ids), sampling)
