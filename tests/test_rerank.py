"""Rerank: a tiny sentence-transformers CrossEncoder folder, scored by the runtime and over every route
(Cohere/Jina/vLLM, TEI, V1, V2, POST /), against sentence_transformers.CrossEncoder and a direct model call."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from sentence_transformers import CrossEncoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from engines.encoder_runtime import PredictiveRuntime
from handlers.errors import InvalidInput
from settings.arguments import parse_arguments
from settings.loading import ModelLoadError, inspect_model
from settings.tasks import Task, infer_task
from tests.server_process import ServerProcess, free_port

QUERY = "What is the capital of France?"
DOCUMENTS = [
    "The capital of France is Paris.",
    "The cat sat on the mat and the dog slept by the door.",
    "Berlin is the capital of Germany, and Rome is the capital of Italy.",
    "Paris",
]


def cross_encoder_scores(path: Path, query: str, documents: list[str]) -> np.ndarray:
    return CrossEncoder(str(path), device="cpu").predict([(query, d) for d in documents])


@torch.inference_mode()
def direct_logits(path: Path, query: str, documents: list[str]) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    encoding = tokenizer([query] * len(documents), documents, padding=True, truncation=True, return_tensors="pt")
    return model(**encoding).logits[:, 0].numpy()


@pytest.fixture(scope="module")
def runtime(tiny_models: dict[str, Path]) -> PredictiveRuntime:
    loaded = PredictiveRuntime(parse_arguments({"model_dir": str(tiny_models["cross_encoder"])}))
    loaded.load()
    return loaded


# --- task inference ---


def test_cross_encoder_folders_are_inferred_as_rerank(tiny_models, tmp_path):
    assert infer_task(["BertForSequenceClassification"], tiny_models["cross_encoder"]) == Task.rerank
    # sentence-transformers v4/v5 mark the folder in config.json instead of config_sentence_transformers.json.
    older = tmp_path / "v4"
    shutil.copytree(tiny_models["cross_encoder"], older)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        (older / name).unlink()
    config = json.loads((older / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.activation.Sigmoid", "version": "4.1.0"}
    (older / "config.json").write_text(json.dumps(config))
    assert infer_task(["BertForSequenceClassification"], older) == Task.rerank
    # A plain classifier stays KServe's sequence_classification.
    assert infer_task(["BertForSequenceClassification"], tiny_models["sequence_classification"]) == (
        Task.sequence_classification
    )


def test_task_rerank_needs_one_label(tiny_models):
    with pytest.raises(ModelLoadError, match="num_labels=3"):
        inspect_model(parse_arguments({"model_dir": str(tiny_models["sequence_classification"]), "task": "rerank"}))


# --- the runtime call any route uses ---


def test_runtime_rerank_equals_cross_encoder_and_raw_logits(runtime, tiny_models):
    path = tiny_models["cross_encoder"]
    result = asyncio.run(runtime.rerank(QUERY, DOCUMENTS))
    assert np.allclose(result.scores, cross_encoder_scores(path, QUERY, DOCUMENTS), atol=1e-6)
    raw = asyncio.run(runtime.rerank(QUERY, DOCUMENTS, raw_scores=True))
    assert np.allclose(raw.scores, direct_logits(path, QUERY, DOCUMENTS), atol=1e-5)
    assert len(set(np.round(result.scores, 6))) == len(DOCUMENTS)  # the tiny model tells documents apart
    assert result.token_count > 0


def test_concurrent_reranks_batch_together_and_equal_alone(runtime):
    async def both() -> list:
        return await asyncio.gather(runtime.rerank(QUERY, DOCUMENTS[:2]), runtime.rerank("hello world", DOCUMENTS))

    together = asyncio.run(both())
    alone = [asyncio.run(runtime.rerank(QUERY, DOCUMENTS[:2])), asyncio.run(runtime.rerank("hello world", DOCUMENTS))]
    for got, want in zip(together, alone, strict=True):
        assert np.allclose(got.scores, want.scores, atol=1e-6)


def test_rerank_refuses_empty_documents_and_other_tasks(runtime, tiny_models):
    with pytest.raises(InvalidInput, match="'documents' is empty"):
        asyncio.run(runtime.rerank(QUERY, []))
    classifier = PredictiveRuntime(parse_arguments({"model_dir": str(tiny_models["sequence_classification"])}))
    with pytest.raises(InvalidInput, match="serves sequence_classification; reranking needs a cross-encoder"):
        asyncio.run(classifier.rerank(QUERY, DOCUMENTS))


# --- over HTTP, through `bentoml serve` ---


GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def url(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServerProcess(
        {"model_dir": str(tiny_models["cross_encoder"]), "model_name": "reranker", "grpc_port": str(GRPC_PORT)},
        tmp_path_factory.mktemp("rerank-server") / "server.log",
    )
    try:
        yield server.wait_ready().url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def expected(tiny_models: dict[str, Path]) -> np.ndarray:
    return cross_encoder_scores(tiny_models["cross_encoder"], QUERY, DOCUMENTS)


@pytest.mark.parametrize("path", ["/v1/rerank", "/openai/v1/rerank"])
def test_cohere_jina_vllm_rerank(url, expected, path):
    documents = [DOCUMENTS[0], {"text": DOCUMENTS[1]}, *DOCUMENTS[2:]]
    response = httpx.post(url + path, json={"model": "reranker", "query": QUERY, "documents": documents}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    order = list(np.argsort(-expected, kind="stable"))
    assert [r["index"] for r in body["results"]] == order
    assert np.allclose([r["relevance_score"] for r in body["results"]], expected[order], atol=1e-6)
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[i] for i in order]
    assert body["model"] == "reranker" and body["usage"]["total_tokens"] > 0

    short = httpx.post(
        url + path, json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": False}, timeout=60
    ).json()
    assert [r["index"] for r in short["results"]] == order[:2]
    assert all("document" not in r for r in short["results"])

    wrong = httpx.post(url + path, json={"model": "other", "query": QUERY, "documents": DOCUMENTS}, timeout=60)
    assert wrong.status_code == 404 and "other" in wrong.json()["error"]["message"]

    raw = httpx.post(url + path, json={"query": QUERY, "documents": DOCUMENTS, "top_n": 0, "raw_scores": True}).json()
    assert len(raw["results"]) == len(DOCUMENTS) and [r["index"] for r in raw["results"]] == order
    assert np.allclose(
        [r["relevance_score"] for r in raw["results"]], np.log(expected / (1 - expected))[order], atol=1e-4
    )

    empty = httpx.post(url + path, json={"query": QUERY, "documents": []}, timeout=60)
    assert empty.status_code == 400 and "documents" in empty.text


def test_tei_rerank_and_post_root(url, expected, tiny_models):
    body = {"query": QUERY, "texts": DOCUMENTS, "return_text": True}
    ranks = httpx.post(url + "/rerank", json=body, timeout=60).json()
    order = list(np.argsort(-expected, kind="stable"))
    assert [r["index"] for r in ranks] == order
    assert np.allclose([r["score"] for r in ranks], expected[order], atol=1e-6)
    assert [r["text"] for r in ranks] == [DOCUMENTS[i] for i in order]

    raw = httpx.post(url + "/", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}, timeout=60).json()
    logits = direct_logits(tiny_models["cross_encoder"], QUERY, DOCUMENTS)
    assert [r["index"] for r in raw] == order and all("text" not in r for r in raw)
    assert np.allclose([r["score"] for r in raw], logits[order], atol=1e-5)

    empty = httpx.post(url + "/rerank", json={"query": QUERY, "texts": []}, timeout=60)
    assert empty.status_code == 400
    assert empty.json().items() >= {"error": "`texts` cannot be empty", "error_type": "validation"}.items()


def test_tei_predict_scores_pairs(url, expected):
    single = httpx.post(url + "/predict", json={"inputs": [QUERY, DOCUMENTS[0]]}, timeout=60).json()
    assert single[0]["label"] == "LABEL_0" and single[0]["score"] == pytest.approx(float(expected[0]), abs=1e-6)
    batch = httpx.post(url + "/predict", json={"inputs": [[QUERY, d] for d in DOCUMENTS]}, timeout=60).json()
    assert np.allclose([p[0]["score"] for p in batch], expected, atol=1e-6)


def test_v1_pairs_and_v2_pair_tensor(url, expected):
    pairs = [[QUERY, d] for d in DOCUMENTS]
    v1 = httpx.post(url + "/v1/models/reranker:predict", json={"instances": pairs}, timeout=60).json()
    assert np.allclose(v1["predictions"], expected, atol=1e-6)

    tensor = {"name": "input-0", "datatype": "BYTES", "shape": [len(pairs), 2], "data": pairs}
    v2 = httpx.post(url + "/v2/models/reranker/infer", json={"inputs": [tensor]}, timeout=60).json()
    output = v2["outputs"][0]
    assert output["name"] == "output-0" and output["datatype"] == "FP32" and output["shape"] == [len(pairs)]
    assert np.allclose(output["data"], expected, atol=1e-6)

    flat = {"name": "input-0", "datatype": "BYTES", "shape": [2], "data": [QUERY, DOCUMENTS[0]]}
    wrong = httpx.post(url + "/v2/models/reranker/infer", json={"inputs": [flat]}, timeout=60)
    assert wrong.status_code == 400 and "shape [N, 2]" in wrong.json()["error"]
    metadata = httpx.get(url + "/v2/models/reranker", timeout=60).json()
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1, 2]}]


def test_grpc_pair_tensor(url, expected):
    client = triton.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    tensor = triton.InferInput("input-0", [len(DOCUMENTS), 2], "BYTES")
    tensor.set_data_from_numpy(np.array([[QUERY, d] for d in DOCUMENTS], dtype=object))
    scores = client.infer("reranker", [tensor]).as_numpy("output-0")
    assert scores.shape == (len(DOCUMENTS),) and np.allclose(scores, expected, atol=1e-6)


def test_identity_activation_in_the_folder_gives_logits(tiny_models, tmp_path):
    folder = tmp_path / "identity"
    shutil.copytree(tiny_models["cross_encoder"], folder)
    config_file = folder / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text())
    config["activation_fn"] = "torch.nn.modules.linear.Identity"
    config_file.write_text(json.dumps(config))
    identity = PredictiveRuntime(parse_arguments({"model_dir": str(folder)}))
    identity.load()
    scores = asyncio.run(identity.rerank(QUERY, DOCUMENTS)).scores
    assert np.allclose(scores, cross_encoder_scores(folder, QUERY, DOCUMENTS), atol=1e-6)
    assert np.allclose(scores, direct_logits(folder, QUERY, DOCUMENTS), atol=1e-5)


def test_openapi_documents_typed_bodies_of_the_new_routes(url):
    document = httpx.get(url + "/openapi.json", timeout=60).json()
    schemas = document["components"]["schemas"]
    posts = ["/v1/rerank", "/openai/v1/rerank", "/embed", "/embed_all", "/predict", "/rerank", "/tokenize", "/decode"]
    for path in [*posts, "/generate", "/generate_stream", "/"]:
        operation = document["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        refs = [body["$ref"]] if "$ref" in body else [item["$ref"] for item in body["anyOf"]]
        assert all(ref.split("/")[-1] in schemas for ref in refs), path
        assert operation["responses"]["200"]["content"]["application/json"]["schema"], path
        error = operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("OpenAIErrorResponse" if path.endswith("/v1/rerank") else "/ErrorResponse"), path
    assert set(schemas["RerankRequest"]["required"]) == {"query", "documents"}
    assert set(schemas["TEIRerankRequest"]["required"]) == {"query", "texts"}
    assert document["paths"]["/info"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] == (
        "#/components/schemas/Info"
    )


def test_bentoml_client_rerank_endpoint(url, expected):
    """BentoML's typed `rerank` endpoint runs on the same cross-encoder and batcher: CrossEncoder's scores."""
    import bentoml

    with bentoml.SyncHTTPClient(url) as client:
        answer = client.rerank(query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True)
    order = list(np.argsort(-expected))[:2]
    assert [result["index"] for result in answer["results"]] == order
    assert np.allclose([result["score"] for result in answer["results"]], expected[order], atol=1e-6)
    assert [result["document"] for result in answer["results"]] == [DOCUMENTS[i] for i in order]
