"""BentoML's typed endpoints through `bentoml serve`, with BentoML's own clients, and the playground page in
headless Chromium. Answers are compared with direct transformers calls on the same model folders.

Set UPDATE_SCREENSHOTS=1 to refresh docs/playground-*.png from the browser tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest
import torch
from bentoml.exceptions import BentoMLException
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from settings.loading import default_model_dir
from tests import reference
from tests.server_process import PROJECT_DIR, ServerProcess

MINILM = Path(default_model_dir())
ENDPOINTS = {"embed", "classify", "token_classify", "fill_mask", "rerank", "generate", "chat"}
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def chat_model(tiny_models: dict[str, Path]) -> Path:
    """Tiny Llama with a chat template: cheap; the slow test below chats with SmolLM2 for a real answer."""
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def servers(
    tiny_models: dict[str, Path], chat_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """One `bentoml serve` per task, started together and stopped together."""
    logs = tmp_path_factory.mktemp("bentoml-api-logs")
    models = {
        "text_embedding": {"model_name": "minilm"},  # the embedded all-MiniLM-L6-v2
        "sequence_classification": {"model_dir": str(tiny_models["sequence_classification"]), "model_name": "sst"},
        "token_classification": {"model_dir": str(tiny_models["token_classification"]), "model_name": "ner"},
        "fill_mask": {"model_dir": str(tiny_models["fill_mask"]), "model_name": "bert"},
        "text_generation": {"model_dir": str(chat_model), "model_name": "chat", "backend": "huggingface"},
    }
    started = {task: ServerProcess(args, logs / f"{task}.log") for task, args in models.items()}
    try:
        yield {task: server.wait_ready().url for task, server in started.items()}
    finally:
        with ThreadPoolExecutor(len(started)) as pool:  # each takes seconds to drain; stop them side by side
            list(pool.map(ServerProcess.stop, started.values()))


def test_clients_and_schema_list_every_endpoint(servers):
    url = servers["text_embedding"]
    schema = httpx.get(f"{url}/schema.json").json()
    assert {route["name"] for route in schema["routes"]} == ENDPOINTS
    streams = {route["name"] for route in schema["routes"] if route["output"].get("is_stream")}
    assert streams == {"generate", "chat"}
    with bentoml.SyncHTTPClient(url) as client:
        assert set(client.endpoints) == ENDPOINTS


def test_embed_equals_transformers_and_openai_route(servers):
    texts = ["The capital of France is Paris.", "hello world"]
    expected = reference.mean_pooled_embeddings(MINILM, texts).numpy()
    url = servers["text_embedding"]
    with bentoml.SyncHTTPClient(url) as client:
        answer = client.embed(texts=texts)
    assert answer["model"] == "minilm" and answer["usage"]["prompt_tokens"] > 0
    assert np.allclose(np.array(answer["embeddings"]), expected, atol=1e-5)
    openai = httpx.post(f"{url}/openai/v1/embeddings", json={"input": texts}).json()
    assert [item["embedding"] for item in openai["data"]] == answer["embeddings"]  # one model, one batcher


def test_classify_equals_softmax_with_labels(servers, tiny_models):
    path = tiny_models["sequence_classification"]
    texts = ["a fine film", "a dull one, really"]
    probabilities = torch.softmax(reference.classification_logits(path, texts), dim=-1).tolist()
    id2label = reference.model(path, reference.AutoModelForSequenceClassification).config.id2label
    with bentoml.SyncHTTPClient(servers["sequence_classification"]) as client:
        answer = client.classify(texts=texts)
    for row, expected in zip(answer["results"], probabilities, strict=True):
        assert [item["score"] for item in row] == sorted((item["score"] for item in row), reverse=True)
        got = {item["label"]: item["score"] for item in row}
        assert set(got) == set(id2label.values())
        assert np.allclose([got[id2label[i]] for i in range(len(expected))], expected, atol=1e-6)


def test_token_classify_equals_pipeline(servers, tiny_models):
    text = "Angela Merkel met Emmanuel Macron in Paris."
    model = str(tiny_models["token_classification"])
    ner = pipeline("token-classification", model=model, aggregation_strategy="simple")
    expected = ner(text)
    with bentoml.SyncHTTPClient(servers["token_classification"]) as client:
        (got,) = client.token_classify(texts=[text])["results"]
    assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in got] == [
        (e["entity_group"], e["start"], e["end"], e["word"]) for e in expected
    ]
    assert np.allclose([e["score"] for e in got], [float(e["score"]) for e in expected], atol=1e-4)


def test_fill_mask_equals_pipeline_per_mask(servers, tiny_models):
    fill = pipeline("fill-mask", model=str(tiny_models["fill_mask"]), top_k=3)
    texts = ["the capital of france is [MASK].", "[MASK] is the capital of [MASK]."]
    with bentoml.SyncHTTPClient(servers["fill_mask"]) as client:
        answer = client.fill_mask(texts=texts, top_k=3)
    one_mask, two_masks = answer["results"]
    assert len(one_mask) == 1 and len(two_masks) == 2
    for got, want in zip([*one_mask, *two_masks], [fill(texts[0]), *fill(texts[1])], strict=True):
        assert [(g["token"], g["token_str"]) for g in got] == [(w["token"], w["token_str"]) for w in want]
        assert np.allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)


@pytest.mark.parametrize(
    ("endpoint", "payload"),
    [
        ("classify", {"texts": ["x"]}),
        ("token_classify", {"texts": ["x"]}),
        ("fill_mask", {"texts": ["x [MASK]"]}),
        ("rerank", {"query": "q", "documents": ["d"]}),
        ("generate", {"prompt": "x"}),
        ("chat", {"messages": [{"role": "user", "content": "x"}]}),
    ],
)
def test_endpoint_the_task_cannot_answer_is_400_naming_the_task(servers, endpoint, payload):
    url = servers["text_embedding"]
    response = httpx.post(f"{url}/bentoml/{endpoint}", json=payload, timeout=30)
    assert response.status_code == 400, response.text
    assert "serves text_embedding" in response.text and f"'{endpoint}' endpoint" in response.text
    with bentoml.SyncHTTPClient(url) as client, pytest.raises(BentoMLException, match="serves text_embedding"):
        result = getattr(client, endpoint)(**payload)
        if endpoint in ("generate", "chat"):
            list(result)  # a stream's error surfaces when it is read


def test_embed_on_a_generation_model_is_400(servers):
    response = httpx.post(f"{servers['text_generation']}/bentoml/embed", json={"texts": ["x"]})
    assert response.status_code == 400 and "serves text_generation" in response.text


@cache
def _causal_lm(path: Path) -> tuple[Any, Any]:
    return AutoTokenizer.from_pretrained(str(path)), AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _greedy(path: Path, ids: list[int], max_new_tokens: int) -> str:
    tokenizer, model = _causal_lm(path)
    with torch.inference_mode():
        output = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)


def _chat_ids(path: Path, question: str) -> list[int]:
    tokenizer, _ = _causal_lm(path)
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_generate_and_chat_stream_greedy_answers(servers, chat_model):
    path = chat_model
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    messages = [{"role": "user", "content": "the capital of france is"}]
    chat_ids = _chat_ids(path, messages[0]["content"])
    prompt = "the capital of france is"

    async def run() -> tuple[list[str], list[str]]:
        async with bentoml.AsyncHTTPClient(servers["text_generation"]) as client:
            chat = [chunk async for chunk in client.chat(messages=messages, max_tokens=8, temperature=0)]
            generate = [chunk async for chunk in client.generate(prompt=prompt, max_tokens=8, temperature=0)]
        return chat, generate

    chat_chunks, generate_chunks = asyncio.run(run())
    assert len(chat_chunks) > 1, "the reply streams in pieces"
    assert "".join(chat_chunks) == _greedy(path, chat_ids, 8)
    assert "".join(generate_chunks) == _greedy(path, tokenizer(prompt)["input_ids"], 8)


def test_generation_errors_are_400(servers):
    url = servers["text_generation"]
    too_long = httpx.post(f"{url}/bentoml/generate", json={"prompt": "x", "max_tokens": 10**6})
    assert too_long.status_code == 400 and "max_tokens" in too_long.text
    bad = httpx.post(f"{url}/bentoml/chat", json={"messages": [{"role": "user", "content": "x"}], "temperature": -1})
    assert bad.status_code == 400 and "temperature" in bad.text


def test_kserve_openai_docs_and_index_still_answer(servers):
    url = servers["text_embedding"]
    assert httpx.get(f"{url}/").json() == {"status": "alive"}
    index = httpx.get(f"{url}/", headers={"accept": "text/html,application/xhtml+xml"})
    assert index.headers["content-type"].startswith("text/html") and "BentoML" in index.text
    predict = httpx.post(f"{url}/v1/models/minilm:predict", json={"instances": ["hello"]}, timeout=30)
    assert predict.status_code == 200 and len(predict.json()["predictions"][0]) == 384
    assert httpx.get(f"{url}/openai/v1/models").json()["data"][0]["id"] == "minilm"
    spec = httpx.get(f"{url}/docs.json").json()
    paths = ("/bentoml/embed", "/bentoml/chat", "/v1/models/{name}:predict", "/v2/models/{name}/infer")
    paths += ("/playground/info",)
    for path in paths:
        assert path in spec["paths"], f"{path} is missing from BentoML's OpenAPI document"
    assert spec["paths"]["/bentoml/embed"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    named = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert named - set(spec["components"]["schemas"]) == set(), "references to models the document lacks"
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200 and "/docs.json" in docs.text
    assert httpx.get(f"{url}/static_content/swagger-ui-bundle.js").status_code == 200  # offline assets
    info = httpx.get(f"{url}/playground/info").json()
    assert info == {
        "model": "minilm",
        "task": "text_embedding",
        "endpoint": "embed",
        "endpoint_path": "/bentoml/embed",
        "ready": True,
        "backend": None,
        "mask_token": None,
        "routes": ["/bentoml/embed", "/openai/v1/embeddings", "/v1/models/minilm:predict", "/v2/models/minilm/infer"],
    }


# --- the playground page in a real browser ---


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; scripts/test.sh does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open_playground(browser, url: str):
    page = browser.new_page(viewport={"width": 900, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{url}/playground")
    page.wait_for_selector("#send:not([disabled])")
    return page, errors


def _screenshot(page, name: str, tmp_path: Path) -> None:
    target = tmp_path / name
    page.screenshot(path=str(target), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copy(target, PROJECT_DIR / "docs" / name)


def test_playground_embeddings_similarity_matrix(servers, browser, tmp_path):
    page, errors = _open_playground(browser, servers["text_embedding"])
    assert page.inner_text("#model") == "minilm" and page.inner_text("#task") == "text_embedding"
    sentences = ["The cat sits on the mat.", "A cat is sitting on a rug.", "Stock markets fell sharply today."]
    page.fill("#input", "\n".join(sentences))
    page.click("#send")
    page.wait_for_selector("#result[data-done='1']", timeout=120_000)
    vectors = reference.mean_pooled_embeddings(MINILM, sentences).numpy()
    expected = vectors @ vectors.T
    cells = page.locator("#matrix td").all_inner_texts()
    assert np.allclose(np.array(cells, dtype=float).reshape(3, 3), expected, atol=1e-3)
    assert "curl -X POST" in page.inner_text("#curl") and "/embed" in page.inner_text("#curl")
    assert "/openai/v1/embeddings" in page.inner_text("#routes")
    assert errors == []
    _screenshot(page, "playground-embeddings.png", tmp_path)
    page.close()


@pytest.mark.parametrize(
    ("task", "shown"),
    [("sequence_classification", ".bar-row"), ("token_classification", "#entities"), ("fill_mask", ".bar-row")],
)
def test_playground_encoder_views(servers, browser, task, shown):
    """The page's default input for the task, sent: the task's view appears with the endpoint's numbers."""
    page, errors = _open_playground(browser, servers[task])
    assert page.inner_text("#task") == task
    page.click("#send")
    page.wait_for_selector("#result[data-done='1']", timeout=120_000)
    body = {"texts": [page.input_value("#input").strip()]}
    endpoint = {"sequence_classification": "classify", "token_classification": "token_classify"}.get(task, task)
    if task == "fill_mask":
        body["top_k"] = 5
    answer = httpx.post(f"{servers[task]}/bentoml/{endpoint}", json=body, timeout=60).json()["results"][0]
    if task == "token_classification":
        text = body["texts"][0]
        marked = page.locator("#entities mark").evaluate_all("marks => marks.map(m => m.firstChild.textContent)")
        assert marked == [text[entity["start"] : entity["end"]] for entity in answer]
        without_tags = (
            "e => { const c = e.cloneNode(true); c.querySelectorAll('small').forEach(s => s.remove()); "
            "return c.textContent; }"
        )
        assert page.eval_on_selector("#entities", without_tags) == text
    else:
        rows = answer if task == "sequence_classification" else answer[0]
        assert page.locator(shown).count() == len(rows)
        scores = [float(text) for text in page.locator(f"{shown} .num").all_inner_texts()]
        assert np.allclose(scores, [row["score"] for row in rows], atol=1e-4)
    assert f"/{endpoint}" in page.inner_text("#curl")
    assert errors == []
    page.close()


def test_playground_chat_streams_the_reply(servers, browser, chat_model):
    _chat_in_the_page(browser, servers["text_generation"], chat_model, screenshot=None)


@pytest.mark.slow
def test_playground_chat_with_smollm2(browser, smollm2, tmp_path):
    """A real chat model answers in the page (and makes docs/playground-chat.png)."""
    server = ServerProcess(
        {"model_dir": str(smollm2), "model_name": "smollm2", "backend": "huggingface"}, tmp_path / "smollm2.log"
    )
    try:
        reply = _chat_in_the_page(browser, server.wait_ready().url, smollm2, screenshot=tmp_path)
    finally:
        server.stop()
    assert reply == "The capital of France is Paris."


def _chat_in_the_page(browser, url: str, model: Path, screenshot: Path | None) -> str:
    page, errors = _open_playground(browser, url)
    assert page.inner_text("#task") == "text_generation"
    question = "What is the capital of France?"
    page.fill("#input", question)
    page.fill("#max-tokens", "24")
    page.fill("#temperature", "0")
    page.click("#send")
    page.wait_for_selector("#result[data-done='1']", timeout=120_000)
    reply = page.inner_text("#reply")
    assert reply == _greedy(model, _chat_ids(model, question), 24)
    assert page.locator(".msg.user").inner_text().endswith(question)
    assert "/chat" in page.inner_text("#curl") and "curl -N" in page.inner_text("#curl")
    assert errors == []
    if screenshot is not None:
        _screenshot(page, "playground-chat.png", screenshot)
    page.close()
    return reply
