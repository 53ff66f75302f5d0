"""protocols/openai alone: request schemas (refusals by name) and SSE framing, no model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from handlers.errors import InvalidInput, ServingError
from protocols.openai.runner import Runner
from protocols.openai.schemas import parse_chat_request, parse_completion_request
from protocols.openai.sse import sse_event, sse_stream


def test_sse_event_framing() -> None:
    assert sse_event({"a": 1}) == 'data: {"a":1}\n\n'
    assert sse_event("[DONE]") == "data: [DONE]\n\n"


def _collect(events: AsyncIterator[dict[str, Any]]) -> list[str]:
    async def run() -> list[str]:
        return [line async for line in sse_stream(events, Runner(None, []), "test")]  # type: ignore[arg-type]

    return asyncio.run(run())


def test_an_error_after_the_first_byte_is_an_error_event_then_done() -> None:
    async def failing() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}
        raise ServingError("engine died")

    lines = _collect(failing())
    assert lines[0] == 'data: {"n":1}\n\n' and lines[-1] == "data: [DONE]\n\n"
    error = json.loads(lines[1][len("data: ") :])
    assert "engine died" in error["error"]["message"]


def test_schemas_refuse_by_name_and_accept_unknown_fields() -> None:
    with pytest.raises(InvalidInput, match="suffix"):
        parse_completion_request({"prompt": "x", "suffix": "y"})
    with pytest.raises(InvalidInput, match="best_of"):
        parse_completion_request({"prompt": "x", "best_of": 3})
    with pytest.raises(InvalidInput, match="top_logprobs"):
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    with pytest.raises(InvalidInput, match="temperature"):
        parse_completion_request({"prompt": "x", "temperature": 5})
    request = parse_completion_request({"prompt": ["a", "b"], "brand_new_field": 1})
    assert request.prompts() == ["a", "b"] and request.model_extra == {"brand_new_field": 1}
    chat = parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert chat.text_messages()[0]["content"] == "hi"
