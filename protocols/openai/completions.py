"""POST /openai/v1/completions over any GenerationBackend (no torch here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from engines.generation.backend import GenerationBackend, GenerationOutput, GenerationRequest
from protocols.openai.generation_requests import completion_generation_requests
from protocols.openai.logprobs import completion_logprobs, echo_logprobs, merge_logprobs, vllm_prompt_logprobs
from protocols.openai.runner import Choice, Runner, collect, start, usage
from protocols.openai.schemas import CompletionRequest, parse_completion_request
from protocols.openai.sse import sse_stream


async def create_completion(
    backend: GenerationBackend, body: Mapping[str, Any], *, model_name: str | None = None
) -> dict[str, Any] | AsyncIterator[str]:
    """POST /openai/v1/completions: the response dict, or SSE lines when body["stream"] is true."""
    started = await start(backend, body, model_name, parse_completion_request, "cmpl", completion_generation_requests)
    request, runner = started.request, started.runner
    prompts = [p if isinstance(p, str) else backend.tokenizer.decode(p) for p in request.prompts()]
    context = CompletionContext(
        backend, request, started.generation_requests, prompts, started.request_id, started.model, started.created
    )
    if request.stream:
        return sse_stream(_completion_stream(runner, context), runner, "completion")
    try:
        return await _completion_response(runner, context)
    finally:
        await runner.close()


@dataclass
class CompletionContext:
    backend: GenerationBackend
    request: CompletionRequest
    generation_requests: list[GenerationRequest]
    prompts: list[str]
    request_id: str
    model: str
    created: int

    def choice_index(self, position: int, index: int) -> int:
        return position * self.request.n + index

    def echo_head(self, position: int, output: GenerationOutput) -> tuple[str, dict[str, Any] | None]:
        """The echoed prompt text and (with logprobs) its logprobs object."""
        prompt = self.prompts[position]
        if self.request.logprobs is None:
            return prompt, None
        ids = self.generation_requests[position].prompt_token_ids
        first = self.backend.tokenizer.decode([ids[0]]) if ids else ""
        return prompt, echo_logprobs(output.prompt_logprobs or (None,), first)


async def _completion_response(runner: Runner, context: CompletionContext) -> dict[str, Any]:
    request = context.request
    choices: dict[int, Choice] = {}
    prompt_logprobs: dict[int, tuple[str, dict[str, Any] | None]] = {}
    prompt_tokens = [len(r.prompt_token_ids) for r in context.generation_requests]
    prompt_entries: dict[int, Any] = {}
    async for position, output in runner.outputs():
        if output.prompt_logprobs is not None:
            prompt_entries.setdefault(position, output.prompt_logprobs)
        if request.echo and position not in prompt_logprobs:
            prompt_logprobs[position] = context.echo_head(position, output)
        for delta in output.choices:
            collect(choices.setdefault(context.choice_index(position, delta.index), Choice()), delta)
    result = []
    for index in sorted(choices):
        choice = choices[index]
        position = index // request.n
        text, logprobs = choice.text, None
        if request.logprobs is not None:
            head_text, head = prompt_logprobs.get(position, ("", None)) if request.echo else ("", None)
            logprobs = merge_logprobs(head, completion_logprobs(list(choice.logprobs), len(head_text)))
        if request.echo:
            text = prompt_logprobs[position][0] + text
        item = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        if request.prompt_logprobs is not None:
            item["prompt_logprobs"] = vllm_prompt_logprobs(prompt_entries.get(position))
        result.append(item)
    completion_tokens = sum(c.token_count for c in choices.values())
    return {
        "id": context.request_id,
        "object": "text_completion",
        "created": context.created,
        "model": context.model,
        "choices": result,
        "usage": usage(sum(prompt_tokens), completion_tokens),
        "system_fingerprint": None,
    }


async def _completion_stream(runner: Runner, context: CompletionContext) -> AsyncIterator[dict[str, Any]]:
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
                tail = completion_logprobs(list(delta.logprobs or ()), offset)
                logprobs = merge_logprobs(head, tail)
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
        final["usage"] = usage(prompt_tokens, completion_tokens)
        yield final
