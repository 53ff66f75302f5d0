"""The four predictive tasks over V1, V2 (JSON and binary) and OpenAI, through `bentoml serve`.

Every answer is compared with a direct transformers call on the same model folder.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from openai import OpenAI

from settings.loading import default_model_dir
from tests import reference
from tests.server_process import ServerProcess, free_port

SENTENCES = ["The capital of France is Paris.", "hello world", "a much longer sentence about the weather in paris"]
MINILM = Path(default_model_dir())
GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One server per task, started together: sequence_classification, token_classification, fill_mask, embedding."""
    logs = tmp_path_factory.mktemp("server-logs")
    models = {
        "sequence_classification": {
            "model_dir": str(tiny_models["sequence_classification"]),
            "model_name": "sst",
            "grpc_port": str(GRPC_PORT),
        },
        "token_classification": {"model_dir": str(tiny_models["token_classification"]), "model_name": "ner"},
        "fill_mask": {"model_dir": str(tiny_models["fill_mask"]), "model_name": "bert"},
        "text_embedding": {"model_name": "minilm"},  # the embedded default model folder
    }
    started = {task: ServerProcess(args, logs / f"{task}.log") for task, args in models.items()}
    try:
        yield {task: server.wait_ready().url for task, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


def predict_v1(url: str, name: str, instances: list[str], **parameters: object) -> httpx.Response:
    body: dict[str, object] = {"instances": instances}
    if parameters:
        body["parameters"] = parameters
    return httpx.post(f"{url}/v1/models/{name}:predict", json=body, timeout=60)


def infer_v2(url: str, name: str, texts: list[str], **parameters: object) -> dict:
    body: dict[str, object] = {
        "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    }
    if parameters:
        body["parameters"] = parameters
    response = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# --- sequence classification ---


def test_sequence_classification_v1_and_v2_equal_transformers(servers, tiny_models):
    logits = reference.classification_logits(tiny_models["sequence_classification"], SENTENCES)
    expected = logits.argmax(dim=-1).tolist()
    url = servers["sequence_classification"]
    assert predict_v1(url, "sst", SENTENCES).json() == {"predictions": expected}
    output = infer_v2(url, "sst", SENTENCES)["outputs"][0]
    assert output == {"name": "output-0", "datatype": "INT64", "shape": [3], "data": expected}


def test_sequence_classification_probabilities_labels_and_logits(servers, tiny_models):
    logits = reference.classification_logits(tiny_models["sequence_classification"], SENTENCES)
    probabilities = torch.softmax(logits, dim=-1)
    url = servers["sequence_classification"]
    got = predict_v1(url, "sst", SENTENCES, return_probabilities=True).json()["predictions"]
    assert got == [{str(j): round(float(p), 4) for j, p in enumerate(row)} for row in probabilities]
    labels = predict_v1(url, "sst", SENTENCES, labels=True).json()["predictions"]
    names = ["NEGATIVE", "NEUTRAL", "POSITIVE"]
    assert labels == [names[i] for i in logits.argmax(dim=-1).tolist()]
    raw = predict_v1(url, "sst", SENTENCES, return_raw_logits=True).json()["predictions"]
    assert np.allclose([[row[str(j)] for j in range(3)] for row in raw], logits.numpy(), atol=1e-4)
    # V2 answers exactly KServe's str(dict) elements by default ...
    default = infer_v2(url, "sst", SENTENCES, return_probabilities=True)["outputs"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in default] == [("output-0", "BYTES", [3])]
    # ... and adds a real FP32 tensor beside them when asked, by parameter or by naming it in `outputs`.
    outputs = {
        o["name"]: o for o in infer_v2(url, "sst", SENTENCES, return_probabilities=True, extra_outputs=True)["outputs"]
    }
    assert list(outputs) == ["output-0", "probabilities"] and outputs["output-0"] == default[0]
    assert outputs["probabilities"]["shape"] == [3, 3]
    assert np.allclose(np.reshape(outputs["probabilities"]["data"], (3, 3)), probabilities.numpy(), atol=1e-5)
    named = httpx.post(
        f"{url}/v2/models/sst/infer",
        json={
            "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [3], "data": SENTENCES}],
            "parameters": {"return_raw_logits": True},
            "outputs": [{"name": "output-0"}, {"name": "logits"}],
        },
        timeout=60,
    ).json()["outputs"]
    assert [o["name"] for o in named] == ["output-0", "logits"]
    assert np.allclose(np.reshape(named[1]["data"], (3, 3)), logits.numpy(), atol=1e-4)


# --- token classification ---


def test_token_classification_v1_and_v2_shapes_equal_kserve(servers, tiny_models):
    logits = reference.token_logits(tiny_models["token_classification"], SENTENCES)
    expected = [[row] for row in logits.argmax(dim=-1).tolist()]
    url = servers["token_classification"]
    assert predict_v1(url, "ner", SENTENCES).json() == {"predictions": expected}
    output = infer_v2(url, "ner", SENTENCES)["outputs"][0]
    length = logits.shape[1]
    assert output["datatype"] == "INT64" and output["shape"] == [3, 1, length]
    assert output["data"] == [i for row in expected for i in row[0]]


def test_token_classification_offsets_and_entities(servers, tiny_models):
    from transformers import pipeline

    url = servers["token_classification"]
    outputs = {o["name"]: o for o in infer_v2(url, "ner", SENTENCES[:1], return_offsets_mapping=True)["outputs"]}
    encoding = reference.tokenizer(tiny_models["token_classification"])(SENTENCES[:1], return_offsets_mapping=True)
    assert outputs["offset_mapping"]["datatype"] == "INT64"
    assert outputs["offset_mapping"]["data"] == [v for pair in encoding["offset_mapping"][0] for v in pair]
    ner = pipeline(
        "token-classification", model=str(tiny_models["token_classification"]), aggregation_strategy="simple"
    )
    expected = ner(SENTENCES[0])
    got = predict_v1(url, "ner", SENTENCES[:1], aggregation_strategy="simple").json()["predictions"][0]
    assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in got] == [
        (e["entity_group"], e["start"], e["end"], e["word"]) for e in expected
    ]
    assert np.allclose([e["score"] for e in got], [float(e["score"]) for e in expected], atol=1e-4)


# --- fill mask ---


def test_fill_mask_v1_v2_and_top_k(servers, tiny_models):
    texts = ["the capital of france is [MASK].", "[MASK] is the capital of [MASK]."]
    expected = reference.fill_mask_tokens(tiny_models["fill_mask"], texts)
    url = servers["fill_mask"]
    assert predict_v1(url, "bert", texts).json() == {"predictions": expected}
    output = infer_v2(url, "bert", texts)["outputs"][0]
    assert output == {"name": "output-0", "datatype": "BYTES", "shape": [2], "data": expected}

    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(tiny_models["fill_mask"]), top_k=3)
    want = fill(texts[0])
    got = predict_v1(url, "bert", texts[:1], top_k=3).json()["predictions"][0]
    assert [(g["token"], g["token_str"]) for g in got] == [(w["token"], w["token_str"]) for w in want]
    assert np.allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)


# --- embeddings ---


def test_embedding_v1_v2_and_openai_equal_transformers(servers):
    expected = reference.mean_pooled_embeddings(MINILM, SENTENCES).numpy()
    url = servers["text_embedding"]
    v1_vectors = np.array(predict_v1(url, "minilm", SENTENCES).json()["predictions"])
    assert v1_vectors.shape == (3, 384) and np.allclose(v1_vectors, expected, atol=1e-5)

    output = infer_v2(url, "minilm", SENTENCES)["outputs"][0]
    assert output["datatype"] == "FP64" and output["shape"] == [3, 384]
    assert np.allclose(np.reshape(output["data"], (3, 384)), expected, atol=1e-5)

    client = OpenAI(base_url=f"{url}/openai/v1", api_key="unused")
    response = client.embeddings.create(model="minilm", input=SENTENCES)
    assert response.object == "list" and [d.index for d in response.data] == [0, 1, 2]
    assert np.allclose([d.embedding for d in response.data], expected, atol=1e-5)
    tokens = int(reference.encode(MINILM, SENTENCES)["attention_mask"].sum())
    assert response.usage.prompt_tokens == tokens == response.usage.total_tokens

    raw = httpx.post(
        f"{url}/openai/v1/embeddings", json={"input": "hello world", "encoding_format": "base64"}, timeout=30
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, expected[1], atol=1e-5)
    assert client.models.list().data[0].id == "minilm"


def test_tritonclient_binary_and_json(servers, tiny_models):
    logits = reference.classification_logits(tiny_models["sequence_classification"], SENTENCES)
    client = triton.InferenceServerClient(servers["sequence_classification"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("sst")
    metadata = client.get_model_metadata("sst")
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "output-0", "datatype": "INT64", "shape": [-1]}]
    for binary in (True, False):
        tensor = triton.InferInput("input-0", [3], "BYTES")
        tensor.set_data_from_numpy(np.array(SENTENCES, dtype=object), binary_data=binary)
        outputs = [triton.InferRequestedOutput("output-0", binary_data=binary)]
        result = client.infer("sst", [tensor], outputs=outputs)
        assert result.as_numpy("output-0").tolist() == logits.argmax(dim=-1).tolist()
    # No outputs named: tritonclient asks for binary output of everything.
    tensor = triton.InferInput("input-0", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(SENTENCES, dtype=object))
    assert client.infer("sst", [tensor]).as_numpy("output-0").tolist() == logits.argmax(dim=-1).tolist()

    embedder = triton.InferenceServerClient(servers["text_embedding"].removeprefix("http://"))
    tensor = triton.InferInput("input-0", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(SENTENCES, dtype=object))
    vectors = embedder.infer("minilm", [tensor]).as_numpy("output-0")
    assert vectors.shape == (3, 384)
    assert np.allclose(vectors, reference.mean_pooled_embeddings(MINILM, SENTENCES).numpy(), atol=1e-5)


def test_grpc_served_beside_rest(servers, tiny_models):
    import tritonclient.grpc as triton_grpc

    logits = reference.classification_logits(tiny_models["sequence_classification"], SENTENCES)
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    assert client.is_server_ready() and client.is_model_ready("sst")
    tensor = triton_grpc.InferInput("input-0", [3], "BYTES")
    tensor.set_data_from_numpy(np.array(SENTENCES, dtype=object))
    assert client.infer("sst", [tensor]).as_numpy("output-0").tolist() == logits.argmax(dim=-1).tolist()


# --- routes, health, metrics ---


def test_kserve_routes_and_metadata(servers):
    url = servers["sequence_classification"]
    assert httpx.get(url + "/").json() == {"status": "alive"}
    assert httpx.get(url + "/v1/models").json() == {"models": ["sst"]}
    assert httpx.get(url + "/v1/models/sst").json() == {"name": "sst", "ready": True}
    assert httpx.get(url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(url + "/v2/health/ready").json() == {"ready": True}
    assert "binary_tensor_data" in httpx.get(url + "/v2").json()["extensions"]
    metadata = httpx.get(servers["token_classification"] + "/v2/models/ner").json()
    assert metadata["outputs"] == [{"name": "output-0", "datatype": "INT64", "shape": [-1, 1, -1]}]


def test_metrics_have_per_model_latency_histograms(servers):
    from prometheus_client.parser import text_string_to_metric_families

    url = servers["sequence_classification"]
    predict_v1(url, "sst", ["hello"])
    counts = {
        sample.name: sample.value
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        for sample in family.samples
        if sample.labels.get("model_name") == "sst" and sample.name.endswith("_seconds_count")
    }
    for stage in ("preprocess", "predict", "postprocess"):
        assert counts.get(f"request_{stage}_seconds_count", 0) >= 1, counts


def test_metrics_have_the_batchers_rows_and_pass_times(servers):
    """engines/batch_metrics.py: each forward pass observed once, with its rows, on the forward lane."""
    from prometheus_client.parser import text_string_to_metric_families

    url = servers["sequence_classification"]

    def samples() -> dict[str, float]:
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
            for sample in family.samples
            if sample.labels.get("model_name") == "sst" and sample.labels.get("lane") == "forward"
        }

    before = samples()
    predict_v1(url, "sst", ["one", "two", "three"])  # one request of three inputs: one pass of three rows
    after = samples()
    assert after["encoder_batch_rows_count"] - before.get("encoder_batch_rows_count", 0) == 1
    assert after["encoder_batch_rows_sum"] - before.get("encoder_batch_rows_sum", 0) == 3
    assert after["encoder_forward_pass_seconds_count"] - before.get("encoder_forward_pass_seconds_count", 0) == 1


# --- errors: each a clear 4xx, and the server keeps answering ---


@pytest.mark.parametrize(
    ("path", "content", "headers", "status", "needle"),
    [
        ("/v1/models/sst:predict", b"{not json", {}, 400, "JSON"),
        ("/v1/models/sst:predict", b"{}", {}, 400, "instances"),
        ("/v1/models/sst:predict", b'{"instances": []}', {}, 400, "empty"),
        ("/v1/models/sst:predict", b'{"instances": ["ok", 3]}', {}, 400, "instances.1"),
        ("/v1/models/sst:predict", b'{"instances": ["ok"], "parameters": {"bogus": 1}}', {}, 400, "bogus"),
        ("/v1/models/nope:predict", b'{"instances": ["ok"]}', {}, 404, "Model with name nope does not exist."),
        ("/v1/models/sst:predict", b'{"instances": ["ok"]}', {"content-type": "application/xml"}, 415, "xml"),
        (
            "/v2/models/sst/infer",
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}',
            {},
            400,
            "BYTES",
        ),
        (
            "/v2/models/sst/infer",
            b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}',
            {},
            400,
            "shape",
        ),
        ("/v2/models/sst/infer", b'{"inputs": []}', {}, 400, "inputs"),
        ("/v2/models/nope/infer", b'{"inputs": []}', {}, 404, "does not exist"),
        ("/v1/models/sst:predict", b'{"instances": ["ok"], "parameters": {"top_k": 2}}', {}, 400, "fill_mask"),
    ],
)
def test_bad_requests_get_clear_errors_and_server_keeps_serving(servers, path, content, headers, status, needle):
    url = servers["sequence_classification"]
    response = httpx.post(url + path, content=content, headers={"content-type": "application/json", **headers})
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]
    assert predict_v1(url, "sst", ["still here"]).status_code == 200


def test_fill_mask_without_mask_and_openai_errors(servers):
    response = predict_v1(servers["fill_mask"], "bert", ["no mask here"])
    assert response.status_code == 400 and "[MASK]" in response.json()["error"]
    url = servers["text_embedding"]
    response = httpx.post(url + "/openai/v1/embeddings", json={"input": [[101, 10**7, 102]]})
    assert response.status_code == 400 and "outside this model's vocabulary" in response.json()["error"]["message"]
    response = httpx.post(url + "/openai/v1/embeddings", json={"input": "x", "dimensions": 385})
    assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"


def test_long_input_is_truncated_at_the_folders_max_seq_length(servers):
    # Silently, as KServe; at sentence_bert_config.json's max_seq_length (256), as SentenceTransformer.encode.
    long_text = " ".join(["paris"] * 2000)
    got = np.array(predict_v1(servers["text_embedding"], "minilm", [long_text]).json()["predictions"][0])
    expected = reference.mean_pooled_embeddings(MINILM, [long_text], max_length=256).numpy()[0]
    assert np.allclose(got, expected, atol=1e-5)


def test_concurrent_requests_are_batched_and_equal_single_answers(servers, tiny_models):
    url = servers["sequence_classification"]
    texts = [f"sentence number {i} about paris" for i in range(24)]
    expected = reference.classification_logits(tiny_models["sequence_classification"], texts)

    async def send_all() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(
                *[
                    client.post(
                        f"{url}/v1/models/sst:predict",
                        json={"instances": [t], "parameters": {"return_raw_logits": True}},
                    )
                    for t in texts
                ]
            )
        return [json.loads(r.content)["predictions"][0] for r in responses]

    got = asyncio.run(send_all())
    assert np.allclose([[row[str(j)] for j in range(3)] for row in got], expected.numpy(), atol=1e-4)
