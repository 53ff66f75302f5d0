"""POST /openai/v1/chat/completions over any GenerationBackend (no torch here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from engines.generation.backend import GenerationBackend, GenerationRequest
from protocols.openai.generation_requests import chat_generation_request
from protocols.openai.logprobs import chat_logprobs, vllm_prompt_logprobs
from protocols.openai.runner import Choice, Started, collect, start, usage
from protocols.openai.schemas import ChatCompletionRequest, parse_chat_request
from protocols.openai.sse import sse_stream
from protocols.openai.tools import StreamSplitter, finish_reason, parse_output


async def create_chat_completion(
    backend: GenerationBackend, body: Mapping[str, Any], *, model_name: str | None = None
) -> dict[str, Any] | AsyncIterator[str]:
    """POST /openai/v1/chat/completions: the response dict, or SSE lines when body["stream"] is true."""
    started = await start(backend, body, model_name, parse_chat_request, "chatcmpl", _generation_requests)
    request, runner = started.request, started.runner
    if request.stream:
        return sse_stream(_chat_stream(started), runner, "chat completion")
    try:
        choices: dict[int, Choice] = {}
        prompt_entries = None
        async for _, output in runner.outputs():
            prompt_entries = prompt_entries or output.prompt_logprobs
            for delta in output.choices:
                collect(choices.setdefault(delta.index, Choice()), delta)
    finally:
        await runner.close()
    plan = request.tool_plan()
    result = []
    for index in sorted(choices):
        choice = choices[index]
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        reason = choice.finish_reason
        if plan.mode != "none":
            content, calls = parse_output(plan, choice.text)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = finish_reason(plan, calls, reason)
        result.append(
            {
                "index": index,
                "message": message,
                "logprobs": chat_logprobs(choice.logprobs) if request.logprobs else None,
                "finish_reason": reason,
                "stop_reason": choice.stop_reason,
            }
        )
    prompt_tokens = len(started.generation_requests[0].prompt_token_ids)
    return {
        "id": started.request_id,
        "object": "chat.completion",
        "created": started.created,
        "model": started.model,
        "choices": result,
        "usage": usage(prompt_tokens, sum(c.token_count for c in choices.values())),
        "system_fingerprint": None,
        **({"prompt_logprobs": vllm_prompt_logprobs(prompt_entries)} if request.prompt_logprobs is not None else {}),
    }


def _generation_requests(
    backend: GenerationBackend, request: ChatCompletionRequest, request_id: str
) -> list[GenerationRequest]:
    return [chat_generation_request(backend, request, request_id)]


async def _chat_stream(started: Started[ChatCompletionRequest]) -> AsyncIterator[dict[str, Any]]:
    request = started.request
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    completion_tokens = 0

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": started.request_id,
            "object": "chat.completion.chunk",
            "created": started.created,
            "model": started.model,
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
    plan = request.tool_plan()
    splitters = {i: StreamSplitter(plan) for i in range(request.n)} if plan.mode != "none" else {}
    async for _, output in started.runner.outputs():
        for delta in output.choices:
            completion_tokens += len(delta.token_ids)
            splitter = splitters.get(delta.index)
            text = splitter.feed(delta.text) if splitter is not None else delta.text
            reason: str | None = delta.finish_reason
            if splitter is not None and reason is not None:
                rest, calls = splitter.finish()
                text += rest
                if calls:
                    if text:
                        yield chunk([{"index": delta.index, "delta": {"content": text}, "finish_reason": None}])
                    text = ""
                    yield chunk(
                        [
                            {
                                "index": delta.index,
                                "delta": {"tool_calls": calls},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                    reason = finish_reason(plan, calls, reason)
            if not text and reason is None and not delta.logprobs:
                continue
            choice: dict[str, Any] = {
                "index": delta.index,
                "delta": {"content": text} if text else {},
                "logprobs": chat_logprobs(list(delta.logprobs or ())) if request.logprobs else None,
                "finish_reason": reason,
            }
            if reason is not None:
                choice["stop_reason"] = delta.stop_reason
            yield chunk([choice])
    if include_usage:
        final = chunk([])
        final["usage"] = usage(len(started.generation_requests[0].prompt_token_ids), completion_tokens)
        yield final
