"""Whole sentence-transformers stacks, Matryoshka `dimensions` and token-id inputs.

The folder is built by sentence-transformers itself (tests/sentence_stack_models.py): BERT, mean pooling,
two Dense layers with their activations, Normalize, max_seq_length 16 and prompts. Every vector must equal
`SentenceTransformer.encode` on the same folder, in the handler and through `bentoml serve` with the
openai client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from handlers.errors import InvalidInput
from handlers.registry import handler_class_for
from handlers.requests import PredictOptions
from handlers.text_embedding import TextEmbeddingHandler
from settings.arguments import parse_arguments
from settings.loading import inspect_model
from settings.tasks import Task
from tests.sentence_stack_models import DEFAULT_PROMPT, MAX_SEQ_LENGTH, cached_stack
from tests.server_process import ServerProcess

TEXTS = [
    "Paris is the capital of France.",
    "hello",
    "a much longer sentence about the weather in paris that goes on well past sixteen tokens of the tiny model",
]


@pytest.fixture(scope="module")
def stack(tiny_models: dict[str, Path]) -> Path:
    return cached_stack(tiny_models["bert_model"])


@pytest.fixture(scope="module")
def encoder(stack: Path) -> SentenceTransformer:
    return SentenceTransformer(str(stack), device="cpu")


@pytest.fixture(scope="module")
def handler(stack: Path) -> TextEmbeddingHandler:
    args = parse_arguments({"model_dir": str(stack), "device": "cpu"}, environ={})
    source = inspect_model(args)
    built = handler_class_for(source.task)(source, args)
    assert isinstance(built, TextEmbeddingHandler)
    built.load()
    return built


def embed(handler: TextEmbeddingHandler, texts: list, **options: object) -> np.ndarray:
    result = handler.predict_many([(texts, PredictOptions(**options))])[0]
    assert not isinstance(result, Exception), result
    return np.asarray(result.predictions)


def test_the_stack_is_read_from_the_folder(handler, encoder):
    assert encoder.max_seq_length == MAX_SEQ_LENGTH and handler.max_length == MAX_SEQ_LENGTH
    assert [layer.activation.rsplit(".", 1)[-1] for layer in handler.stack.dense] == ["GELU", "Tanh"]
    assert handler.stack.normalize and handler.stack.default_prompt_name == DEFAULT_PROMPT
    assert handler.dimensions == encoder.get_embedding_dimension() == 24


def test_handler_equals_sentence_transformers_encode(handler, encoder):
    # The default prompt, then each named prompt; the long text is cut at max_seq_length as encode cuts it.
    assert np.allclose(embed(handler, TEXTS), encoder.encode(TEXTS), atol=1e-5)
    for name in encoder.prompts:
        got = embed(handler, TEXTS, prompt_name=name)
        assert np.allclose(got, encoder.encode(TEXTS, prompt_name=name), atol=1e-5), name
    # One batch mixing prompts gives each request its own.
    mixed = handler.predict_many([(TEXTS[:1], PredictOptions(prompt_name="passage")), (TEXTS[1:], PredictOptions())])
    assert np.allclose(mixed[0].predictions, encoder.encode(TEXTS[:1], prompt_name="passage"), atol=1e-5)
    assert np.allclose(mixed[1].predictions, encoder.encode(TEXTS[1:]), atol=1e-5)


def test_dimensions_truncate_then_renormalise_as_sentence_transformers_does(handler, encoder):
    got = embed(handler, TEXTS, dimensions=8)
    assert np.allclose(got, encoder.encode(TEXTS, truncate_dim=8, normalize_embeddings=True), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    with pytest.raises(InvalidInput, match="dimensions=25 is larger than this model's 24"):
        handler.validate(TEXTS, PredictOptions(dimensions=25))
    with pytest.raises(InvalidInput, match=r"'nope' is not one of this model's prompts \(document, passage, query\)"):
        handler.validate(TEXTS, PredictOptions(prompt_name="nope"))


def test_token_ids_give_the_vectors_of_their_text(handler, encoder):
    # The ids of the text as the model sees it (default prompt included), from the model's own tokenizer.
    ids = [encoder.tokenize([encoder.prompts[DEFAULT_PROMPT] + text])["input_ids"][0].tolist() for text in TEXTS]
    mixed = embed(handler, [ids[0], TEXTS[1], ids[2]])
    assert np.allclose(mixed, encoder.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_pooling_without_the_prompt_tokens_equals_sentence_transformers(tiny_models, pooling):
    """include_prompt=false (INSTRUCTOR-style): the prompt is read by the model but left out of the pooling."""
    folder = cached_stack(tiny_models["bert_model"], pooling=pooling, include_prompt=False)
    args = parse_arguments({"model_dir": str(folder), "device": "cpu"}, environ={})
    built = handler_class_for(Task.text_embedding)(inspect_model(args), args)
    assert isinstance(built, TextEmbeddingHandler) and not built.stack.include_prompt
    built.load()
    encoder = SentenceTransformer(str(folder), device="cpu")
    assert np.allclose(embed(built, TEXTS), encoder.encode(TEXTS), atol=1e-5)
    mixed = built.predict_many([(TEXTS[:2], PredictOptions(prompt_name="passage")), (TEXTS[2:], PredictOptions())])
    assert np.allclose(mixed[0].predictions, encoder.encode(TEXTS[:2], prompt_name="passage"), atol=1e-5)
    assert np.allclose(mixed[1].predictions, encoder.encode(TEXTS[2:]), atol=1e-5)


# --- through the service ---


@pytest.fixture(scope="module")
def server(stack: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("st-stack") / "server.log"
    process = ServerProcess({"model_dir": str(stack), "model_name": "stack"}, log)
    try:
        yield process.wait_ready().url
    finally:
        process.stop()


def test_openai_embeddings_with_dimensions_prompts_and_token_ids(server, encoder):
    client = openai.OpenAI(base_url=f"{server}/openai/v1", api_key="unused")
    full = client.embeddings.create(model="stack", input=TEXTS)
    assert np.allclose([d.embedding for d in full.data], encoder.encode(TEXTS), atol=1e-5)
    short = client.embeddings.create(model="stack", input=TEXTS, dimensions=8)
    expected = encoder.encode(TEXTS, truncate_dim=8, normalize_embeddings=True)
    assert np.allclose([d.embedding for d in short.data], expected, atol=1e-5)
    passage = client.embeddings.create(model="stack", input=TEXTS, extra_body={"prompt_name": "passage"})
    assert np.allclose([d.embedding for d in passage.data], encoder.encode(TEXTS, prompt_name="passage"), atol=1e-5)
    ids = [encoder.tokenize([encoder.prompts[DEFAULT_PROMPT] + t])["input_ids"][0].tolist() for t in TEXTS]
    by_ids = client.embeddings.create(model="stack", input=ids)
    assert np.allclose([d.embedding for d in by_ids.data], encoder.encode(TEXTS), atol=1e-5)
    one = client.embeddings.create(model="stack", input=ids[0], encoding_format="float")
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, encoder.encode(TEXTS[:1])[0], atol=1e-5)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"input": ["a"], "dimensions": 25}, "dimensions=25 is larger than this model's 24"),
        ({"input": ["a"], "prompt_name": "nope"}, "prompt_name 'nope' is not one of this model's prompts"),
        ({"input": [[1, 2, 10**9]]}, "outside this model's vocabulary"),
        ({"input": [list(range(2, 40))]}, "has 38 token ids; this model takes at most 16"),
        ({"input": [[]]}, "empty list of token ids"),
        ({"input": [[2, 3]], "prompt_name": "query"}, "prompt_name applies to texts"),
    ],
)
def test_bad_embedding_requests_get_400_naming_the_reason(server, body, needle):
    response = httpx.post(f"{server}/openai/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


def test_v1_and_v2_take_dimensions_and_prompt_name(server, encoder):
    body = {"instances": TEXTS, "parameters": {"dimensions": 8, "prompt_name": "passage"}}
    got = httpx.post(f"{server}/v1/models/stack:predict", json=body, timeout=30).json()["predictions"]
    expected = F.normalize(
        encoder.encode(TEXTS, prompt_name="passage", convert_to_tensor=True)[:, :8], p=2, dim=1
    ).numpy()
    assert np.allclose(got, expected, atol=1e-5)
    v2 = {
        "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [3], "data": TEXTS}],
        "parameters": {"dimensions": 8},
    }
    output = httpx.post(f"{server}/v2/models/stack/infer", json=v2, timeout=30).json()["outputs"][0]
    assert output["shape"] == [3, 8]
    assert np.allclose(
        np.reshape(output["data"], (3, 8)), encoder.encode(TEXTS, truncate_dim=8, normalize_embeddings=True), atol=1e-5
    )


def test_tei_embed_takes_prompt_name(server, encoder):
    """TEI's /embed puts the named prompt before each text, as TEI and `encode(prompt_name=...)` do."""
    got = httpx.post(f"{server}/embed", json={"inputs": TEXTS, "prompt_name": "query"}, timeout=30)
    assert got.status_code == 200, got.text
    assert np.allclose(got.json(), encoder.encode(TEXTS, prompt_name="query"), atol=1e-5)
    unknown = httpx.post(f"{server}/embed", json={"inputs": TEXTS, "prompt_name": "nope"}, timeout=30)
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]
