"""Structured outputs and tools on the transformers backend, through the real service app on
SmolLM2-135M-Instruct: response_format (json_schema, json_object), vLLM's structured_outputs (json, regex,
choice, grammar), and tool_choice none/auto/required/named, streamed and not. Every choice that ends by
itself (finish_reason "stop") is valid; constrained and free rows share a batch. All requests are sent at
once (one batch), which keeps the module cheap on a busy CPU."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import xgrammar as xgr
from fastapi import FastAPI
from transformers import AutoTokenizer

from engines.generation.transformers import TransformersBackend
from tests.service_app import load_service, stop_service

# Heavy on a busy 2-core CPU (one batch of 16 SmolLM2 requests, ~40 steps): CI runs it with the slow tests.
pytestmark = pytest.mark.slow


def _json_matcher(model: Path) -> xgr.GrammarMatcher:
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(str(model)))
    return xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_builtin_json_grammar())


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def served(smollm2: Path) -> Iterator[tuple[FastAPI, TransformersBackend]]:
    service, instance = load_service({"model_dir": str(smollm2), "backend": "huggingface", "model_name": "smol"})
    assert isinstance(instance.generation, TransformersBackend)
    yield service.app, instance.generation
    stop_service(instance)


def _client(app: FastAPI) -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=app)
    http = httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120)
    return openai.AsyncOpenAI(base_url="http://test/openai/v1", api_key="-", http_client=http, max_retries=0)


QUESTION = "What is the capital of France?"
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
GRAMMAR = 'root ::= answer " " number\nanswer ::= "yes" | "no"\nnumber ::= [1-9] [0-9]*'
PATTERN = r"[A-Z][a-z]{2,12}, [0-9]{4}"
CITIES = ["Paris", "London", "Berlin"]

# name: (question, options); all are sent at once, so constrained and free rows share decode steps.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "free": (QUESTION, {"temperature": 0, "max_tokens": 12}),
    "schema_sampled": ("Describe a person as JSON.", {"response_format": SCHEMA_FORMAT, "seed": 1}),
    "schema_greedy": ("Describe a person as JSON.", {"response_format": SCHEMA_FORMAT, "temperature": 0}),
    "object": ("Give me a JSON object.", {"response_format": {"type": "json_object"}, "temperature": 0}),
    "regex": ("Name a city and a year.", {"seed": 3, "extra_body": {"structured_outputs": {"regex": PATTERN}}}),
    "choice": (QUESTION, {"temperature": 0, "extra_body": {"structured_outputs": {"choice": CITIES}}}),
    "grammar": (
        "Yes or no, and a number?",
        {"seed": 4, "extra_body": {"structured_outputs": {"grammar": GRAMMAR}}},
    ),
    "compact_json": (
        "Describe a person.",
        {"temperature": 0, "extra_body": {"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}}},
    ),
}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_REGEX = HERMES_CALL.replace("{", "\\{").replace("}", "\\}")
WEATHER_Q = "What is the weather in Paris?"
TOOL_CASES: dict[str, dict[str, Any]] = {
    "named": {"tools": [WEATHER, CLOCK], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "required": {"tools": [WEATHER, CLOCK], "tool_choice": "required"},
    # auto: the output is forced to a hermes call by a regex, so the parser is exercised on the real model.
    "auto": {
        "max_tokens": 80,
        "tools": [WEATHER],
        "tool_choice": "auto",
        "extra_body": {"structured_outputs": {"regex": "Let me check\\. " + HERMES_REGEX}},
    },
    "none": {"tools": [WEATHER], "tool_choice": "none", "temperature": 0, "max_tokens": 12},
}


async def _chat(client: openai.AsyncOpenAI, question: str, options: dict[str, Any]) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice."""
    messages = [{"role": "user", "content": question}]
    response = await client.chat.completions.create(model="smol", messages=messages, **{"max_tokens": 40, **options})
    return [(c.message.content or "", c.finish_reason) for c in response.choices]


async def _tools(client: openai.AsyncOpenAI, options: dict[str, Any], stream: bool) -> dict[str, Any]:
    """The message (content, tool_calls) and finish_reason, from one response or rebuilt from a stream."""
    messages = [{"role": "user", "content": WEATHER_Q}]
    options = {"max_tokens": 40, "temperature": 0, **options}
    if not stream:
        response = await client.chat.completions.create(model="smol", messages=messages, **options)
        choice = response.choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        return {"content": choice.message.content, "calls": calls, "finish": choice.finish_reason}
    chunks = [
        c async for c in await client.chat.completions.create(model="smol", messages=messages, stream=True, **options)
    ]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [
        (call.function.name, json.loads(call.function.arguments))
        for c in chunks
        if c.choices
        for call in c.choices[0].delta.tool_calls or []
    ]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return {"content": content or None, "calls": calls, "finish": finishes[-1] if finishes else None}


@pytest.fixture(scope="module")
def answers(served: tuple[FastAPI, TransformersBackend]) -> dict[str, list[tuple[str, str]]]:
    app, backend = served

    async def run() -> dict[str, list[tuple[str, str]]]:
        client = _client(app)
        alone = await _chat(client, *CASES["free"])
        backend.max_rows_seen = 0
        chats = [_chat(client, question, options) for question, options in CASES.values()]
        tools = [_tools(client, options, stream) for stream in (False, True) for options in TOOL_CASES.values()]
        results = await asyncio.gather(*chats, *tools)
        await client.close()
        names = [*CASES, *(f"tools_{name}_{kind}" for kind in ("whole", "stream") for name in TOOL_CASES)]
        return {"free_alone": alone, **dict(zip(names, results, strict=True))}

    found = asyncio.run(run())
    found["rows"] = [("", str(backend.max_rows_seen))]
    return found


def _ended_by_themselves(choices: list[tuple[str, str]]) -> list[str]:
    ended = [text for text, reason in choices if reason == "stop"]
    assert ended, f"no choice ended by itself: {choices}"
    return ended


def test_response_format_json_schema_and_json_object(answers: dict[str, list[tuple[str, str]]], smollm2: Path) -> None:
    for text in _ended_by_themselves(answers["schema_sampled"]) + _ended_by_themselves(answers["schema_greedy"]):
        jsonschema.validate(json.loads(text), PERSON)
    # json_object: SmolLM2 may ramble past max_tokens; a choice that ended by itself is a JSON object,
    # and one cut by max_tokens is still a prefix the JSON grammar accepts.
    for text, reason in answers["object"]:
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{") and _json_matcher(smollm2).accept_string(text), text


def test_structured_outputs_regex_choice_grammar_json(answers: dict[str, list[tuple[str, str]]]) -> None:
    for text in _ended_by_themselves(answers["regex"]):
        assert re.fullmatch(PATTERN, text), text
    [(city, reason)] = answers["choice"]
    assert city in CITIES and reason == "stop"
    for text in _ended_by_themselves(answers["grammar"]):
        assert re.fullmatch(r"(yes|no) [1-9][0-9]*", text), text
    text = _ended_by_themselves(answers["compact_json"])[0]
    jsonschema.validate(json.loads(text), PERSON)
    assert "\n" not in text and "  " not in text  # no free whitespace (xgrammar keeps ", " and ": ")


def test_constrained_and_free_rows_share_a_batch(answers: dict[str, list[tuple[str, str]]]) -> None:
    rows = int(answers["rows"][0][1])
    assert rows >= 2 + 1  # the free row decoded beside constrained ones
    assert answers["free"] == answers["free_alone"]  # a free row is untouched by its constrained neighbours


@pytest.mark.parametrize("kind", ["whole", "stream"])
def test_tool_choice_named_required_auto_none(answers: dict[str, Any], kind: str) -> None:
    named = answers[f"tools_named_{kind}"]
    assert named["finish"] == "stop" and named["content"] is None
    [(name, arguments)] = named["calls"]
    assert name == "get_weather"
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    required = answers[f"tools_required_{kind}"]
    assert required["finish"] == "tool_calls" and required["calls"]
    for name, arguments in required["calls"]:
        tool = {"get_weather": WEATHER, "get_time": CLOCK}[name]
        jsonschema.validate(arguments, tool["function"]["parameters"])
    auto = answers[f"tools_auto_{kind}"]
    assert auto == {"content": "Let me check.", "calls": [("get_weather", {"city": "Paris"})], "finish": "tool_calls"}
    none = answers[f"tools_none_{kind}"]
    assert none["calls"] == [] and none["content"]


def test_bad_constraints_are_400_by_name(served: tuple[FastAPI, TransformersBackend]) -> None:
    app, _ = served
    cases = [
        ({"structured_outputs": {"regex": "(unclosed"}}, "regex"),
        ({"structured_outputs": {"json": {"type": "no-such-type"}}}, "json"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structural_tag"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "not both"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "required"}, "needs 'tools'"),
        ({"tools": [{"type": "function", "function": {}}]}, "name"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "grammar"),
    ]

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            for extra, named in cases:
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
                response = await http.post("/openai/v1/chat/completions", json=body)
                assert response.status_code == 400, (extra, response.text)
                assert named in response.json()["error"]["message"], response.text

    asyncio.run(run())
