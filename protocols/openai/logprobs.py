"""OpenAI's two logprobs shapes: completions' legacy lists (with echo) and chat's content entries."""

from __future__ import annotations

from typing import Any

from engines.generation.backend import TokenLogprobs


def append_logprobs(entries: Any, offset: int, into: dict[str, list[Any]]) -> int:
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


def completion_logprobs(entries: list[TokenLogprobs | None], text_offset: int) -> dict[str, Any]:
    """Completions' legacy logprobs object; text_offset counts characters of the response text."""
    result: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    append_logprobs(entries, text_offset, result)
    return result


def echo_logprobs(prompt: tuple[TokenLogprobs | None, ...], first_token: str) -> dict[str, Any]:
    """The prompt part of echo + logprobs: the first prompt token has no logprob (None)."""
    assert all(entry is not None for entry in prompt[1:])
    result: dict[str, list[Any]] = {
        "tokens": [first_token],
        "token_logprobs": [None],
        "top_logprobs": [None],
        "text_offset": [0],
    }
    append_logprobs(prompt[1:], len(first_token), result)
    return result


def merge_logprobs(head: dict[str, Any] | None, tail: dict[str, Any]) -> dict[str, Any]:
    if head is None:
        return tail
    return {key: head[key] + tail[key] for key in head}


def vllm_prompt_logprobs(entries: tuple[TokenLogprobs | None, ...] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}
    holding the prompt's own token and the most likely alternatives."""
    if entries is None:
        return None
    result: list[dict[str, Any] | None] = []
    for entry in entries:
        if entry is None:
            result.append(None)
            continue
        tokens = {}
        for item in (entry.chosen, *entry.top):
            tokens.setdefault(
                str(item.token_id), {"logprob": item.logprob, "rank": item.rank, "decoded_token": item.token}
            )
        result.append(tokens)
    return result


def chat_logprobs(entries: list[TokenLogprobs]) -> dict[str, Any]:
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
