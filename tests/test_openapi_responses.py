"""The OpenAPI document's response schemas: the OpenAI completions and chat completions answers are typed (JSON,
and server-sent events with `stream: true`), real answers match them, and every route documents its 200.

The real service in-process on the tiny Llama (transformers backend), as test_openai_generation.py drives it.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from protocols.openai import responses
from tests.service_app import load_service, stop_service

# Routes whose 200 has no body schema on purpose: TEI's /health answers 200 with an empty body, as TEI does.
EMPTY_ON_PURPOSE = {"GET /health"}
# BentoML's own infrastructure routes in its document (/docs.json): plain-text answers it documents without a
# schema; left as BentoML writes them.
BENTOML_UNTYPED = {"GET /healthz", "GET /livez", "GET /readyz", "GET /metrics"}


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path]) -> Iterator[tuple[Any, dict[str, Any]]]:
    service, instance = load_service(
        {"model_dir": str(tiny_models["llama"]), "backend": "huggingface", "model_name": "tiny"}
    )
    yield service.app, service.app.openapi()
    stop_service(instance)


@pytest.fixture(scope="module")
def bentoml_document(served: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    """BentoML's document (/docs.json, what /docs shows): the typed endpoints and every mounted route."""
    import service

    return service.HuggingFaceService.openapi_spec.asdict()


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def validate(document: dict[str, Any], instance: Any, name: str) -> None:
    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": document["components"]})


def undocumented(body: dict[str, Any], model: type[BaseModel]) -> set[str]:
    return set(body) - set(model.model_fields)


@pytest.mark.parametrize(
    "path, answer, chunk, choice_field",
    [
        ("/openai/v1/completions", "CompletionResponse", "CompletionStreamResponse", "text"),
        ("/openai/v1/chat/completions", "ChatCompletionResponse", "ChatCompletionStreamResponse", "message"),
    ],
)
def test_completions_document_their_json_and_event_stream_answers(served, path, answer, chunk, choice_field):
    _, document = served
    ok = document["paths"][path]["post"]["responses"]["200"]["content"]
    schema = resolve(document, ok["application/json"]["schema"])
    assert schema["title"] == answer
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(schema["required"])
    choice = resolve(document, schema["properties"]["choices"]["items"])
    assert {"index", choice_field} <= set(choice["required"]) and "finish_reason" in choice["properties"]
    usage = resolve(document, schema["properties"]["usage"])
    assert set(usage["required"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    stream = ok["text/event-stream"]
    assert stream["schema"]["type"] == "string"
    assert resolve(document, stream["x-sse-event"])["title"] == chunk
    assert {"id", "choices"} <= set(resolve(document, stream["x-sse-event"])["required"])


def test_real_answers_match_the_documented_schemas(served):
    app, document = served

    async def answers() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            base = {"model": "tiny", "max_tokens": 6, "temperature": 0}
            chat = {**base, "messages": [{"role": "user", "content": "hello"}]}
            return [
                await client.post("/openai/v1/completions", json={**base, "prompt": "hi", "logprobs": 2, "n": 2}),
                await client.post("/openai/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2}),
                await client.post(
                    "/openai/v1/completions",
                    json={**base, "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
                ),
                await client.post("/openai/v1/chat/completions", json={**chat, "stream": True}),
            ]

    completion, chat, completion_stream, chat_stream = asyncio.run(answers())
    for response, name, model in (
        (completion, "CompletionResponse", responses.CompletionResponse),
        (chat, "ChatCompletionResponse", responses.ChatCompletionResponse),
    ):
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = response.json()
        validate(document, body, name)
        assert not undocumented(body, model), f"{name}: fields the document does not list"
        choice_model = model.model_fields["choices"].annotation.__args__[0]  # type: ignore[union-attr]
        assert all(not undocumented(choice, choice_model) for choice in body["choices"])
    for response, name in (
        (completion_stream, "CompletionStreamResponse"),
        (chat_stream, "ChatCompletionStreamResponse"),
    ):
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 2
        for event in events[:-1]:
            validate(document, json.loads(event), name)


def lacking_a_200_body(document: dict[str, Any]) -> set[str]:
    """The operations whose 200 has no schema (or that have no 200 at all)."""
    lacking = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answers = operation.get("responses", {})
            content = (answers.get("200") or answers.get(200) or {}).get("content", {})
            if not any(entry.get("schema") not in (None, {}) for entry in content.values()):
                lacking.add(f"{method.upper()} {path}")
    return lacking


def test_every_route_documents_a_200_body(served, bentoml_document):
    _, document = served
    assert lacking_a_200_body(document) == EMPTY_ON_PURPOSE
    assert len(document["paths"]) >= 20
    assert lacking_a_200_body(bentoml_document) == EMPTY_ON_PURPOSE | BENTOML_UNTYPED


def test_bentoml_document_has_every_model_our_routes_name_and_no_422(bentoml_document):
    """BentoML merges the mounted routes through FastAPI's get_openapi, which knows nothing of the request and
    stream models the routes name in openapi_extra (routes/openapi.py completes its document)."""
    text = json.dumps(bentoml_document)
    named = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert named - set(bentoml_document["components"]["schemas"]) == set()
    assert {"CompletionRequest", "ChatCompletionRequest", "CompletionStreamResponse"} <= named
    assert '"422"' not in text
    completions = bentoml_document["paths"]["/openai/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(completions) == {"application/json", "text/event-stream"}
