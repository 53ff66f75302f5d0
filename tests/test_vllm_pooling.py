"""Encoder models on vLLM's pooling runner (`--arg backend=vllm`): vLLM's own pooling routes under /openai.

Tiny random BERTs of width 64 (head size 32, the smallest vLLM's CPU attention takes), one `bentoml serve`
per model (tests/vllm_server.py), each answer compared to transformers run on the same folder. The refusals
at start (fill-mask, a head size vLLM's CPU attention does not take) need no engine.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from tests.server_process import BENTOML, PROJECT_DIR
from tests.tiny_models import (
    build_bert_tokenizer,
    build_cross_encoder,
    build_sentence_transformers,
    build_sequence_classification,
    build_token_classification,
)
from tests.vllm_server import serve_on_vllm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")

TEXTS = ["Paris is the capital of France.", "I hate the rain, the food was bad.", "The cat sat on the mat."]
QUERY = "What is the capital of France?"
WIDTH = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-encoders")
    tokenizer = build_bert_tokenizer()
    return {
        "embedding": build_sentence_transformers(root / "embedding", tokenizer, WIDTH),
        "classifier": build_sequence_classification(root / "classifier", tokenizer, WIDTH),
        "cross_encoder": build_cross_encoder(root / "cross_encoder", tokenizer, WIDTH),
        "token_classifier": build_token_classification(root / "token_classifier", tokenizer, WIDTH),
    }


def serve(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = {"model_dir": str(folder), "model_name": "tiny", "backend": "vllm", "enforce_eager": "true"}
    yield from serve_on_vllm(args, tmp_path_factory)


@pytest.fixture(scope="module")
def embedding_server(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(folders["embedding"], tmp_path_factory)


@pytest.fixture(scope="module")
def classifier_server(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(folders["classifier"], tmp_path_factory)


@pytest.fixture(scope="module")
def token_classifier_server(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(folders["token_classifier"], tmp_path_factory)


@pytest.fixture(scope="module")
def cross_encoder_server(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(folders["cross_encoder"], tmp_path_factory)


def run_to_exit(args: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [BENTOML, "serve", "service:HuggingFaceService"]
    for name, value in args.items():
        command += ["--arg", f"{name}={value}"]
    return subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_embeddings_equal_transformers(embedding_server: str, folders: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=embedding_server + "/openai/v1", api_key="-")
    got = torch.tensor([item.embedding for item in client.embeddings.create(model="tiny", input=TEXTS).data])
    # The folder's sentence-transformers modules: CLS pooling, then Normalize.
    tokenizer = AutoTokenizer.from_pretrained(str(folders["embedding"]))
    model = AutoModel.from_pretrained(str(folders["embedding"]), dtype=torch.float32).eval()
    with torch.inference_mode():
        hidden = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
    assert got.shape == expected.shape == (len(TEXTS), WIDTH)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.slow
def test_classify_equals_transformers_softmax(classifier_server: str, folders: dict[str, Path]) -> None:
    answer = httpx.post(classifier_server + "/openai/classify", json={"model": "tiny", "input": TEXTS}, timeout=60)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    tokenizer = AutoTokenizer.from_pretrained(str(folders["classifier"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(folders["classifier"]), dtype=torch.float32)
    with torch.inference_mode():
        logits = model.eval()(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    expected = logits.softmax(-1)
    assert torch.allclose(torch.tensor([item["probs"] for item in data]), expected, atol=1e-4)
    assert [item["label"] for item in data] == [model.config.id2label[int(i)] for i in expected.argmax(-1)]


@pytest.mark.slow
def test_score_and_rerank_equal_transformers_sigmoid(cross_encoder_server: str, folders: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(folders["cross_encoder"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(folders["cross_encoder"]), dtype=torch.float32)
    pairs = tokenizer([QUERY] * len(TEXTS), TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = model.eval()(**pairs).logits[:, 0].sigmoid()
    assert len(set(expected.round(decimals=3).tolist())) == len(TEXTS), "the scores must differ to test anything"

    for path in ("/openai/score", "/openai/v1/score"):
        body = {"model": "tiny", "queries": QUERY, "documents": TEXTS}
        answer = httpx.post(cross_encoder_server + path, json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        scores = [item["score"] for item in sorted(answer.json()["data"], key=lambda item: item["index"])]
        assert torch.allclose(torch.tensor(scores), expected, atol=1e-4), (path, scores, expected)

    body = {"model": "tiny", "query": QUERY, "documents": TEXTS}
    answer = httpx.post(cross_encoder_server + "/openai/v1/rerank", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [item["index"] for item in results] == expected.argsort(descending=True).tolist()
    got = torch.tensor([item["relevance_score"] for item in sorted(results, key=lambda item: item["index"])])
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_token_classify_pooling_equals_transformers(token_classifier_server: str, folders: dict[str, Path]) -> None:
    """vLLM's /pooling with task token_classify: one row per token (special tokens included), softmax over the
    labels by default, the head's logits with use_activation false."""
    tokenizer = AutoTokenizer.from_pretrained(str(folders["token_classifier"]))
    model = AutoModelForTokenClassification.from_pretrained(str(folders["token_classifier"]), dtype=torch.float32)
    encoding = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model.eval()(**encoding).logits
    assert len(set(logits.argmax(-1).flatten().tolist())) > 1, "the tokens' classes must differ to test anything"
    lengths = encoding["attention_mask"].sum(-1).tolist()

    for use_activation in (True, False):
        body = {"model": "tiny", "input": TEXTS, "task": "token_classify", "use_activation": use_activation}
        answer = httpx.post(token_classifier_server + "/openai/pooling", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        data = sorted(answer.json()["data"], key=lambda item: item["index"])
        for row, (item, length) in enumerate(zip(data, lengths, strict=True)):
            expected = logits[row, :length].softmax(-1) if use_activation else logits[row, :length]
            got = torch.tensor(item["data"])
            assert got.shape == expected.shape == (length, model.config.num_labels)
            assert torch.allclose(got, expected, atol=1e-4), (use_activation, row, (got - expected).abs().max())

    # KServe V1 on the same server is our runtime's (transformers): a class id per token of the padded batch.
    answer = httpx.post(token_classifier_server + "/v1/models/tiny:predict", json={"instances": TEXTS}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": [[row] for row in logits.argmax(-1).tolist()]}


def vllm_prompt_tokens(url: str) -> float:
    """vLLM's own counter of prompt tokens its engine ran (our runtime's requests never reach it)."""
    metrics = httpx.get(url + "/metrics", timeout=30).text
    counts = re.findall(r"^vllm:prompt_tokens_total\{[^}]*\} (\S+)$", metrics, flags=re.MULTILINE)
    assert counts, "vLLM's metrics are not in /metrics"
    return sum(float(count) for count in counts)


def wait_for_prompt_tokens(url: str, expected: float, timeout: float = 10) -> float:
    """vLLM's counter once it reaches `expected` (its stats are recorded as outputs are processed), or at timeout."""
    deadline = time.monotonic() + timeout
    while (counted := vllm_prompt_tokens(url)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return counted


@pytest.mark.slow
def test_rerank_under_openai_is_vllms_and_v1_rerank_is_ours(cross_encoder_server: str) -> None:
    """/openai/*rerank is answered by vLLM's app on its engine, not shadowed by routes/rerank.py: each answer moves
    vLLM's prompt-token counter by its usage. /v1/rerank is ours (transformers) and leaves the counter alone."""
    body = {"model": "tiny", "query": QUERY, "documents": TEXTS}
    before = vllm_prompt_tokens(cross_encoder_server)
    ours = httpx.post(cross_encoder_server + "/v1/rerank", json=body, timeout=60)
    assert ours.status_code == 200, ours.text
    time.sleep(1)  # room for a count that should not come
    assert vllm_prompt_tokens(cross_encoder_server) == before

    for path in ("/openai/rerank", "/openai/v1/rerank", "/openai/v2/rerank"):
        answer = httpx.post(cross_encoder_server + path, json=body, timeout=60)
        assert answer.status_code == 200, (path, answer.text)
        prompt_tokens = answer.json()["usage"]["prompt_tokens"]
        assert prompt_tokens > 0
        counted = wait_for_prompt_tokens(cross_encoder_server, before + prompt_tokens)
        assert counted == before + prompt_tokens, (path, before, prompt_tokens, counted)
        before = counted

    # Nor does our OpenAPI document claim the route vLLM answers.
    paths = httpx.get(cross_encoder_server + "/openapi.json", timeout=30).json()["paths"]
    assert "/v1/rerank" in paths and "/openai/v1/rerank" not in paths


@pytest.mark.slow
def test_the_encoder_runtime_still_serves_the_other_protocols(embedding_server: str) -> None:
    """KServe V1 and vLLM's /openai on the same server, for the same model."""
    answer = httpx.post(embedding_server + "/v1/models/tiny:predict", json={"instances": TEXTS[:1]}, timeout=60)
    assert answer.status_code == 200, answer.text
    wrong_model = httpx.post(
        embedding_server + "/openai/v1/embeddings", json={"model": "nope", "input": "x"}, timeout=60
    )
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["message"]


def test_fill_mask_on_vllm_is_refused_at_start(tiny_models: dict[str, Path]) -> None:
    done = run_to_exit({"model_dir": str(tiny_models["fill_mask"]), "backend": "vllm"})
    assert done.returncode == 2
    assert "backend 'vllm' was asked for but cannot serve this model" in done.stderr
    assert "not fill_mask" in done.stderr


def test_an_encoder_head_size_vllm_cpu_cannot_run_is_refused_at_start(tiny_models: dict[str, Path]) -> None:
    done = run_to_exit({"model_dir": str(tiny_models["sentence_transformers"]), "backend": "vllm"})
    assert done.returncode == 2
    assert "this model's is 16" in done.stderr
