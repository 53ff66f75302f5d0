"""Response models of /openai/v1/completions and /openai/v1/chat/completions, for the OpenAPI document.

The answers are built as dicts (completions.py, chat.py: the hot path does not pay for pydantic), so these
models describe them, field for field in OpenAI's order with vLLM's extras after, and are not used to build
them. tests/test_openapi_responses.py checks real answers against them. Streamed answers (`stream: true`) are
`text/event-stream`: `data: <chunk>` events, one `*StreamResponse` each, ended by `data: [DONE]`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptLogprob(_Response):
    """vLLM's shape of one candidate token of a prompt position (`prompt_logprobs`)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per prompt token, keyed by token id; the first prompt token has none (null).
PromptLogprobs = list[dict[str, PromptLogprob] | None]


# --- completions ---


class CompletionLogprobs(_Response):
    """OpenAI's legacy logprobs object: one entry per token of the text (echoed prompt first)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = Field(None, description="stop, length; null while streaming")
    stop_reason: int | str | None = Field(None, description="vLLM extra: the stop string or token id that ended it")
    prompt_logprobs: PromptLogprobs | None = Field(None, description="vLLM extra, when prompt_logprobs is asked for")


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(_Response):
    """One `data:` event of a streamed completion; with stream_options.include_usage the last one carries
    `usage` and no choices."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# --- chat completions ---


class FunctionCall(_Response):
    name: str
    arguments: str = Field(description="JSON text")


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Response):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, description="Present when the model called tools")


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: str | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = Field(None, description="stop, length or tool_calls")
    stop_reason: int | str | None = Field(None, description="vLLM extra: the stop string or token id that ended it")


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, description="vLLM extra, when prompt_logprobs is asked for")


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(_Response):
    """One `data:` event of a streamed chat completion (`chat.completion.chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
