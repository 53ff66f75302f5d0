"""TEI's and TGI's routes through `bentoml serve`, driven by huggingface_hub.InferenceClient(model=URL) itself
and compared with direct transformers calls (and transformers' pipelines where the client expects their shape)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import InferenceClient
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

from tests.server_process import ServerProcess

TEXTS = ["The capital of France is Paris.", "hello world", "John Smith lives in Paris and works in London."]
PROMPT = "The capital of France is"


@pytest.fixture(autouse=True)
def loopback_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 makes huggingface_hub refuse every request, loopback ones too; these tests only talk
    to the local server, so the client is let through (models still load from local folders)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One server per task, started together."""
    logs = tmp_path_factory.mktemp("tei-server-logs")
    models = {
        "sequence_classification": {"model_dir": str(tiny_models["sequence_classification"])},
        "token_classification": {"model_dir": str(tiny_models["token_classification"])},
        "fill_mask": {"model_dir": str(tiny_models["fill_mask"])},
        "embedding": {"model_dir": str(tiny_models["sentence_transformers"])},
        "llama": {"model_dir": str(tiny_models["llama"]), "backend": "huggingface"},
    }
    started = {name: ServerProcess(args, logs / f"{name}.log") for name, args in models.items()}
    try:
        yield {name: server.wait_ready().url for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@torch.inference_mode()
def cls_hidden(path: Path, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    encoding = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    return AutoModel.from_pretrained(str(path)).eval()(**encoding).last_hidden_state, encoding


# --- embeddings ---


def test_feature_extraction_equals_the_folders_pooling(servers, tiny_models):
    path = tiny_models["sentence_transformers"]  # CLS pooling + Normalize
    hidden, _ = cls_hidden(path, TEXTS)
    client = InferenceClient(model=servers["embedding"])
    got = client.feature_extraction(TEXTS[0])
    assert got.shape == (1, 32) and np.allclose(got[0], F.normalize(hidden[:1, 0], dim=1)[0].numpy(), atol=1e-5)
    raw = client.feature_extraction(TEXTS, normalize=False)
    assert np.allclose(raw, hidden[:, 0].numpy(), atol=1e-5)
    cut = client.feature_extraction(TEXTS, dimensions=8)
    assert np.allclose(cut, F.normalize(hidden[:, 0, :8], dim=1).numpy(), atol=1e-5)


def test_embed_all_gives_each_tokens_hidden_state(servers, tiny_models):
    hidden, encoding = cls_hidden(tiny_models["sentence_transformers"], TEXTS)
    got = httpx.post(servers["embedding"] + "/embed_all", json={"inputs": TEXTS}, timeout=60).json()
    lengths = encoding["attention_mask"].sum(dim=1).tolist()
    assert [len(rows) for rows in got] == lengths
    for row, length, vectors in zip(hidden, lengths, got, strict=True):
        assert np.allclose(vectors, row[:length].numpy(), atol=1e-5)


# --- classification ---


@torch.inference_mode()
def classifier_logits(path: Path, texts: list[str]) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    return model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits


def test_text_classification_and_tei_predict(servers, tiny_models):
    path = tiny_models["sequence_classification"]
    logits = classifier_logits(path, TEXTS)
    id2label = AutoModelForSequenceClassification.from_pretrained(str(path)).config.id2label
    client = InferenceClient(model=servers["sequence_classification"])
    for text, row in zip(TEXTS, logits, strict=True):
        probs = torch.softmax(row, -1)
        got = client.text_classification(text)
        assert [g.label for g in got] == [id2label[int(i)] for i in probs.argsort(descending=True)]
        assert np.allclose([g.score for g in got], probs.sort(descending=True).values.numpy(), atol=1e-5)
        assert len(client.text_classification(text, top_k=1)) == 1

    batch = httpx.post(servers["sequence_classification"] + "/predict", json={"inputs": [[t] for t in TEXTS]}).json()
    raw = httpx.post(servers["sequence_classification"] + "/predict", json={"inputs": TEXTS[1], "raw_scores": True})
    assert len(batch) == 3 and all(len(p) == 3 for p in batch)
    top = raw.json()[0]
    assert top["label"] == id2label[int(logits[1].argmax())] and top["score"] == pytest.approx(
        float(logits[1].max()), abs=1e-5
    )


def test_token_classification_equals_the_simple_pipeline(servers, tiny_models):
    ner = pipeline(
        "token-classification", model=str(tiny_models["token_classification"]), aggregation_strategy="simple"
    )
    client = InferenceClient(model=servers["token_classification"])
    for text in TEXTS:
        got, want = client.token_classification(text), ner(text)
        assert [(g.entity_group, g.word, g.start, g.end) for g in got] == [
            (w["entity_group"], w["word"], w["start"], w["end"]) for w in want
        ]
        assert np.allclose([g.score for g in got], [w["score"] for w in want], atol=1e-5)


def test_fill_mask_equals_the_pipeline(servers, tiny_models):
    fill = pipeline("fill-mask", model=str(tiny_models["fill_mask"]))  # top_k 5, as the client's default
    client = InferenceClient(model=servers["fill_mask"])
    for text in ["The capital of France is [MASK].", "hello [MASK] how are you"]:
        got, want = client.fill_mask(text), fill(text)
        assert [(g.token, g.token_str, g.sequence) for g in got] == [
            (w["token"], w["token_str"], w["sequence"]) for w in want
        ]
        assert np.allclose([g.score for g in got], [w["score"] for w in want], atol=1e-5)


# --- tokenizer routes, info, health, errors ---


def test_tokenize_decode_info_and_health(servers, tiny_models):
    url = servers["token_classification"]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["token_classification"]))
    tokens = httpx.post(url + "/tokenize", json={"inputs": TEXTS[2]}).json()[0]
    encoding = tokenizer(TEXTS[2], return_offsets_mapping=True)
    assert [t["id"] for t in tokens] == encoding["input_ids"]
    assert [t["special"] for t in tokens] == [True] + [False] * (len(tokens) - 2) + [True]
    assert [t["text"] for t in tokens[1:-1]] == [TEXTS[2][a:b] for a, b in encoding["offset_mapping"][1:-1]]
    decoded = httpx.post(url + "/decode", json={"ids": [encoding["input_ids"]]}).json()
    assert decoded == [tokenizer.decode(encoding["input_ids"], skip_special_tokens=True)]
    for bad in ([-1, 5], [len(tokenizer)]):  # found by the fuzz test: was a 500 from the tokenizer
        refused = httpx.post(url + "/decode", json={"ids": bad})
        assert refused.status_code == 400 and "vocabulary" in refused.json()["error"], refused.text

    client = InferenceClient(model=url, provider="hf-inference")  # health and info need the provider named
    assert client.health_check() is True
    info = client.get_endpoint_info()
    assert info["max_input_length"] == 128 and "classifier" in info["model_type"]


def test_wrong_task_is_a_400_in_teis_error_shape(servers):
    response = httpx.post(servers["token_classification"] + "/embed", json={"inputs": "hello"})
    assert response.status_code == 400
    error = {"error": "model 'model' serves token_classification; /embed needs text_embedding"}
    assert response.json().items() >= {**error, "error_type": "validation"}.items()
    targets = httpx.post(servers["fill_mask"], json={"inputs": "a [MASK]", "parameters": {"targets": ["paris"]}})
    assert targets.status_code == 400
    error = {"error": "parameters targets are not supported by this server"}
    assert targets.json().items() >= {**error, "error_type": "validation"}.items()
    for path, name, value in (("/embed_all", "prompt_name", "query"), ("/embed", "truncation_direction", "left")):
        refused = httpx.post(servers["embedding"] + path, json={"inputs": "hello", name: value})
        assert refused.status_code == 400 and name in refused.json()["error"], refused.text
    generate = httpx.post(servers["embedding"] + "/generate", json={"inputs": "hello"})
    assert generate.status_code == 400 and generate.json()["error_type"] == "validation"


# --- TGI generation ---


@torch.inference_mode()
def greedy(path: Path, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def test_text_generation_streamed_or_not_equals_greedy_generate(servers, tiny_models):
    ids, text = greedy(tiny_models["llama"], PROMPT, 12)
    client = InferenceClient(model=servers["llama"])
    assert client.text_generation(PROMPT, max_new_tokens=12) == text
    assert "".join(client.text_generation(PROMPT, max_new_tokens=12, stream=True)) == text

    detailed = client.text_generation(PROMPT, max_new_tokens=12, details=True)
    assert detailed.generated_text == text
    assert [t.id for t in detailed.details.tokens] == ids
    assert detailed.details.generated_tokens == len(ids)
    assert detailed.details.finish_reason == ("length" if len(ids) == 12 else "eos_token")
    assert all(t.logprob is not None and t.logprob <= 0 for t in detailed.details.tokens)

    events = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True, details=True))
    assert [e.token.id for e in events] == ids
    assert events[-1].generated_text == text and events[-1].details.generated_tokens == len(ids)
    assert all(e.generated_text is None for e in events[:-1])

    full = httpx.post(servers["llama"] + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}})
    assert full.json()["generated_text"] == text
    with_prompt = client.text_generation(PROMPT, max_new_tokens=12, return_full_text=True)
    assert with_prompt == PROMPT + text


def test_generation_stop_sequence(servers, tiny_models):
    _, text = greedy(tiny_models["llama"], PROMPT, 12)
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a piece of the greedy answer: generation ends before it
    client = InferenceClient(model=servers["llama"])
    detailed = client.text_generation(PROMPT, max_new_tokens=12, stop=[stop], details=True)
    assert detailed.generated_text == text[: text.index(stop)]
    assert detailed.details.finish_reason == "stop_sequence"


def test_generation_refuses_what_it_cannot_honour(servers):
    response = httpx.post(servers["llama"] + "/generate", json={"inputs": PROMPT, "parameters": {"watermark": True}})
    assert response.status_code == 400
    expected = {"error": "'watermark' is not supported by this server", "error_type": "validation"}
    assert response.json().items() >= expected.items()
