"""schemathesis against the service's own OpenAPI document: V1, V2 and OpenAI routes of a `bentoml serve`
running a tiny embedding model (with an API key, as an operator on the internet would). No answer may be a
5xx, and every answer must match the status codes, content types and schemas the document declares.

Bounded for CI: a few examples per operation (FUZZ_EXAMPLES, default 15), about a minute on 2 cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server_process import ServerProcess

API_KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = {"model_dir": str(tiny_models["sentence_transformers"]), "model_name": "emb", "api_key": API_KEY}
    process = ServerProcess(args, tmp_path_factory.mktemp("fuzz") / "server.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def test_no_5xx_and_every_answer_matches_the_document(served: ServerProcess) -> None:
    document = httpx.get(served.url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    headers = {"authorization": f"Bearer {API_KEY}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        # Derandomized: the same examples every run, so CI stays reproducible; FUZZ_RANDOM=1 explores afresh.
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=os.environ.get("FUZZ_RANDOM") != "1",
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            # A path holding a control character (%0A) never reaches the app: BentoML's own router answers
            # it with a text/plain 404 (its mount's pattern stops at a newline). Known, reported, left out here.
            if any(ord(char) < 32 or char == "\x85" for char in unquote(case.formatted_path)):
                return
            # Half the named-model paths get the served name, so requests reach the model and not only 404.
            if case.path_parameters and len(str(case.path_parameters.get("name", ""))) % 2 == 0:
                case.path_parameters = {**case.path_parameters, "name": "emb"}
            case.call_and_validate(base_url=served.url, headers=headers, checks=CHECKS, timeout=60)

        check()


def test_the_document_declares_typed_bodies_for_model_routes(served: ServerProcess) -> None:
    document = httpx.get(served.url + "/openapi.json", timeout=30).json()
    paths = document["paths"]
    expected_bodies = {
        "/v1/models/{name}:predict": "V1PredictRequest",
        "/v2/models/{name}/infer": "InferenceRequest",
        "/openai/v1/embeddings": "EmbeddingRequest",
    }
    for path, model in expected_bodies.items():
        schema_ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert schema_ref.endswith("/" + model)
        assert model in document["components"]["schemas"]
    for path, operations in paths.items():
        if path.endswith("completions"):  # generation routes: their schemas come with the OpenAI layer's rework
            continue
        for method, operation in operations.items():
            if operation["responses"]["200"].get("content") == {}:  # declared as an empty body (TEI's /health)
                continue
            ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
            assert ok, f"{method} {path} has no response schema"
            assert "422" not in operation["responses"]
