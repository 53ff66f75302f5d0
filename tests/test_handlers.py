"""The predictive handlers, built as the server builds them, against direct transformers calls.

Each handler comes from parse_arguments -> inspect_model -> handler_class_for(task)(source, args) -> load(),
on the tiny offline models of tests/tiny_models.py; its answers must equal what transformers itself
gives on the same folder (same tokenizer, padding=True, truncation, lower-casing).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)

from handlers.base import PredictiveHandler
from handlers.errors import InvalidInput
from handlers.registry import handler_class_for
from handlers.requests import PredictOptions, RequestOptions, TaskResult
from settings.arguments import ArgumentError, parse_arguments
from settings.loading import ModelLoadError, inspect_model
from settings.tasks import Task, TaskError, infer_task
from tests.tiny_models import NER_LABELS, SENTIMENT_LABELS

MAX_LEN = 128  # the tiny models' max_position_embeddings: the handlers' default max_model_len

SENTENCES = [
    "Paris is the capital of France.",
    "John Smith lives in Paris and works in London, a parisian xylophone!",
    "I hate the rain.",
]
SHORT = ["Hello world!", "Good night."]
LONG = ["Mary Jones was born in Berlin and visited Rome last summer with friends from Madrid."]


# --- building handlers as the server does, and the direct transformers answers ---

_handlers: dict[tuple[str, tuple[tuple[str, Any], ...]], PredictiveHandler] = {}


def make_handler(path: Path, **given: Any) -> PredictiveHandler:
    key = (str(path), tuple(sorted(given.items())))
    if key not in _handlers:
        args = parse_arguments({"model_dir": str(path), "device": "cpu", **given}, environ={})
        source = inspect_model(args)
        handler = handler_class_for(source.task)(source, args)
        handler.load()
        _handlers[key] = handler
    return _handlers[key]


def assert_close(got: Any, want: Any, atol: float) -> None:
    """Nested lists of numbers equal within atol (pytest.approx takes flat lists only)."""
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=0, atol=atol)


def predict(handler: PredictiveHandler, texts: list[str], **options: Any) -> TaskResult:
    [result] = handler.predict_many([(texts, PredictOptions(**options))])
    assert isinstance(result, TaskResult), result
    return result


@cache
def direct_tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(path))


@cache
def direct_model(path: Path, kind: type) -> Any:
    return kind.from_pretrained(str(path)).eval()


def encode(path: Path, texts: list[str], **kwargs: Any) -> dict[str, torch.Tensor]:
    return dict(
        direct_tokenizer(path)(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt", **kwargs)
    )


@torch.inference_mode()
def direct_logits(path: Path, kind: type, texts: list[str]) -> torch.Tensor:
    return direct_model(path, kind)(**encode(path, texts)).logits


@pytest.fixture(scope="module")
def paths(tiny_models: dict[str, Path]) -> dict[str, Path]:
    return tiny_models


# --- sequence classification ---


def test_sequence_classification_argmax_equals_transformers(paths):
    path = paths["sequence_classification"]
    handler = make_handler(path)
    logits = direct_logits(path, AutoModelForSequenceClassification, SENTENCES)
    result = predict(handler, SENTENCES)
    assert result.predictions == logits.argmax(dim=-1).tolist()
    assert result.token_count == int(encode(path, SENTENCES)["attention_mask"].sum())


def test_sequence_classification_label_names(paths):
    path = paths["sequence_classification"]
    logits = direct_logits(path, AutoModelForSequenceClassification, SENTENCES)
    result = predict(make_handler(path), SENTENCES, labels=True)
    assert result.predictions == [SENTIMENT_LABELS[i] for i in logits.argmax(dim=-1).tolist()]


def test_sequence_classification_probabilities_4_decimals(paths):
    path = paths["sequence_classification"]
    probs = torch.softmax(direct_logits(path, AutoModelForSequenceClassification, SENTENCES), dim=-1)
    result = predict(make_handler(path), SENTENCES, return_probabilities=True)
    assert result.predictions == [{j: round(float(p), 4) for j, p in enumerate(row)} for row in probs]
    assert_close(result.outputs["probabilities"], probs.tolist(), 1e-6)
    labelled = predict(make_handler(path), SENTENCES, return_probabilities=True, labels=True)
    assert labelled.predictions == [
        {SENTIMENT_LABELS[j]: round(float(p), 4) for j, p in enumerate(row)} for row in probs
    ]


def test_sequence_classification_raw_logits(paths):
    path = paths["sequence_classification"]
    logits = direct_logits(path, AutoModelForSequenceClassification, SENTENCES)
    result = predict(make_handler(path), SENTENCES, return_raw_logits=True)
    assert [list(row.keys()) for row in result.predictions] == [[0, 1, 2]] * len(SENTENCES)
    assert_close([list(row.values()) for row in result.predictions], logits.tolist(), 1e-5)
    assert_close(result.outputs["logits"], logits.tolist(), 1e-5)


def test_server_arguments_set_the_default_output(paths):
    """return_probabilities / disable_postprocess as server arguments, merged into each request's options."""
    path = paths["sequence_classification"]
    logits = direct_logits(path, AutoModelForSequenceClassification, SENTENCES[:1])
    handler = make_handler(path, return_probabilities=True)
    [result] = handler.predict_many([(SENTENCES[:1], PredictOptions.merge(handler.args, None))])
    assert result.predictions == [{j: round(float(p), 4) for j, p in enumerate(torch.softmax(logits[0], -1))}]
    # A request's explicit choice wins over the server default.
    [result] = handler.predict_many(
        [(SENTENCES[:1], PredictOptions.merge(handler.args, RequestOptions(return_raw_logits=True)))]
    )
    assert list(result.predictions[0].values()) == pytest.approx(logits[0].tolist(), abs=1e-5)
    handler = make_handler(path, disable_postprocess=True)
    [result] = handler.predict_many([(SENTENCES[:1], PredictOptions.merge(handler.args, None))])
    assert list(result.predictions[0].values()) == pytest.approx(logits[0].tolist(), abs=1e-5)


def test_several_requests_in_one_forward_equal_each_alone(paths):
    path = paths["sequence_classification"]
    handler = make_handler(path)
    together = handler.predict_many(
        [(SHORT, PredictOptions(return_raw_logits=True)), (LONG, PredictOptions()), (SENTENCES, PredictOptions())]
    )
    alone = [
        predict(handler, SHORT, return_raw_logits=True),
        predict(handler, LONG),
        predict(handler, SENTENCES),
    ]
    assert [r.predictions for r in together[1:]] == [r.predictions for r in alone[1:]]
    assert_close(
        [list(d.values()) for d in together[0].predictions], [list(d.values()) for d in alone[0].predictions], 1e-5
    )
    assert [r.token_count for r in together] == [r.token_count for r in alone]


# --- token classification ---


def expected_token_ids(path: Path, texts: list[str]) -> list[list[list[int]]]:
    """KServe's shape: per input [[id, ...]] over the request's padded length, special tokens included."""
    return [[row] for row in direct_logits(path, AutoModelForTokenClassification, texts).argmax(dim=-1).tolist()]


def test_token_classification_ids_over_the_padded_length(paths):
    path = paths["token_classification"]
    expected = expected_token_ids(path, SENTENCES)
    result = predict(make_handler(path), SENTENCES)
    assert result.predictions == expected
    padded = encode(path, SENTENCES)["input_ids"].shape[1]
    assert {len(row[0]) for row in result.predictions} == {padded}


def test_token_classification_requests_of_different_lengths_keep_their_own_padding(paths):
    path = paths["token_classification"]
    handler = make_handler(path)
    short, long = handler.predict_many([(SHORT, PredictOptions()), (LONG, PredictOptions())])
    assert short.predictions == expected_token_ids(path, SHORT)
    assert long.predictions == expected_token_ids(path, LONG)
    assert {len(row[0]) for row in short.predictions} == {encode(path, SHORT)["input_ids"].shape[1]}
    assert {len(row[0]) for row in long.predictions} == {encode(path, LONG)["input_ids"].shape[1]}
    assert short.predictions == predict(handler, SHORT).predictions
    assert long.predictions == predict(handler, LONG).predictions
    # Scores too: a request batched with a longer one equals the request alone.
    short_probs, _ = handler.predict_many([(SHORT, PredictOptions(return_raw_logits=True)), (LONG, PredictOptions())])
    alone = predict(handler, SHORT, return_raw_logits=True)
    assert_close(
        [[list(t.values()) for t in row] for row in short_probs.predictions],
        [[list(t.values()) for t in row] for row in alone.predictions],
        1e-5,
    )


def test_token_classification_labels_probabilities_and_logits(paths):
    path = paths["token_classification"]
    handler = make_handler(path)
    logits = direct_logits(path, AutoModelForTokenClassification, SENTENCES)
    labels = predict(handler, SENTENCES, labels=True)
    assert labels.predictions == [[[NER_LABELS[i] for i in row]] for row in logits.argmax(dim=-1).tolist()]
    probs = predict(handler, SENTENCES, return_probabilities=True)
    assert probs.predictions == [
        [{j: round(float(p), 4) for j, p in enumerate(token)} for token in row] for row in torch.softmax(logits, -1)
    ]
    raw = predict(handler, SENTENCES, return_raw_logits=True)
    assert_close([[list(t.values()) for t in row] for row in raw.predictions], logits.tolist(), 1e-5)


def test_token_classification_offsets(paths):
    path = paths["token_classification"]
    result = predict(make_handler(path), SENTENCES, return_offsets_mapping=True)
    assert (
        result.outputs["offset_mapping"]
        == encode(path, SENTENCES, return_offsets_mapping=True)["offset_mapping"].tolist()
    )


def test_token_classification_simple_aggregation_equals_pipeline(paths):
    path = paths["token_classification"]
    ner = pipeline("token-classification", model=str(path), aggregation_strategy="simple", device="cpu")
    texts = [*SENTENCES, *SHORT, *LONG, "PETER MILLER, EMMA and ALICE sailed to DUBLIN. Bob: 'hello'?"]
    result = predict(make_handler(path), texts, aggregation_strategy="simple")
    found = 0
    for text, got in zip(texts, result.predictions, strict=True):
        want = ner(text)
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in got] == [
            (e["entity_group"], e["start"], e["end"], e["word"]) for e in want
        ], text
        assert [e["score"] for e in got] == pytest.approx([float(e["score"]) for e in want], abs=1e-4)
        found += len(got)
    assert found > 0, "the random model should tag at least one entity in these texts"


# --- fill mask ---

MASKED = ["The capital of France is [MASK].", "[MASK] is the capital of [MASK].", "hello [MASK]!"]


@torch.inference_mode()
def direct_mask_logits(path: Path, texts: list[str]) -> list[torch.Tensor]:
    encoding = encode(path, texts)
    logits = direct_model(path, AutoModelForMaskedLM)(**encoding).logits
    mask_id = direct_tokenizer(path).mask_token_id
    return [logits[row, (encoding["input_ids"][row] == mask_id).nonzero().flatten()] for row in range(len(texts))]


def test_fill_mask_argmax_token(paths):
    path = paths["fill_mask"]
    tokenizer = direct_tokenizer(path)
    expected = [tokenizer.decode(logits.argmax(dim=-1).tolist()) for logits in direct_mask_logits(path, MASKED)]
    assert predict(make_handler(path), MASKED).predictions == expected


def test_fill_mask_top_k_equals_pipeline(paths):
    path = paths["fill_mask"]
    fill = pipeline("fill-mask", model=str(path), top_k=4, device="cpu")
    result = predict(make_handler(path), MASKED, top_k=4)
    for text, got in zip(MASKED, result.predictions, strict=True):
        want = fill(text)
        # One mask: a flat list; several: one list per mask, as the pipeline returns them.
        if text.count("[MASK]") == 1:
            got, want = [got], [want]
        assert len(got) == len(want) == text.count("[MASK]")
        for got_mask, want_mask in zip(got, want, strict=True):
            assert [(g["token"], g["token_str"]) for g in got_mask] == [(w["token"], w["token_str"]) for w in want_mask]
            assert [g["score"] for g in got_mask] == pytest.approx([float(w["score"]) for w in want_mask], abs=1e-6)


def test_fill_mask_probabilities_per_mask_over_the_vocabulary(paths):
    path = paths["fill_mask"]
    result = predict(make_handler(path), MASKED[:2], return_probabilities=True)
    for got, logits in zip(result.predictions, direct_mask_logits(path, MASKED[:2]), strict=True):
        assert got == [[{j: f"{float(p):.4f}"} for j, p in enumerate(mask)] for mask in torch.softmax(logits, -1)]


def test_fill_mask_without_mask_is_invalid_input(paths):
    handler = make_handler(paths["fill_mask"])
    handler.validate(MASKED, PredictOptions())
    with pytest.raises(InvalidInput, match=r"input 1 has no mask token \[MASK\]"):
        handler.validate(["the [MASK] is here", "no mask at all"], PredictOptions())


def test_fill_mask_truncated_mask_fails_only_its_request(paths):
    handler = make_handler(paths["fill_mask"], max_length=8)
    lost, kept = handler.predict_many(
        [
            (["one two three four five six seven eight nine [MASK]"], PredictOptions()),
            (["[MASK] world"], PredictOptions()),
        ]
    )
    assert isinstance(lost, InvalidInput) and "truncation" in lost.message
    assert isinstance(kept, TaskResult) and len(kept.predictions) == 1


# --- text embedding ---

EMBED = ["Paris is the capital of France.", "hello", "The quick brown fox jumps over the lazy dog near the old house."]


@torch.inference_mode()
def direct_hidden(path: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoding = encode(path, texts)
    return direct_model(path, AutoModel)(**encoding).last_hidden_state, encoding["attention_mask"]


def test_bare_encoder_embeds_with_mean_pooling_and_l2(paths):
    path = paths["bert_model"]
    handler = make_handler(path)
    assert (handler.pooling, handler.normalize) == ("mean", True)
    hidden, mask = direct_hidden(path, EMBED)
    mask = mask.unsqueeze(-1).float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), p=2, dim=1)
    result = predict(handler, EMBED)
    assert_close(result.predictions, expected.tolist(), 1e-6)
    assert [len(v) for v in result.predictions] == [32] * len(EMBED)


def test_sentence_transformers_folder_embeds_with_its_cls_pooling_and_normalize(paths):
    path = paths["sentence_transformers"]
    handler = make_handler(path)
    assert (handler.pooling, handler.normalize) == ("cls", True)
    hidden, _ = direct_hidden(path, EMBED)
    expected = F.normalize(hidden[:, 0], p=2, dim=1)
    assert_close(predict(handler, EMBED).predictions, expected.tolist(), 1e-6)


def test_sentence_transformers_library_agrees_when_installed(paths):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    path = paths["sentence_transformers"]
    model = sentence_transformers.SentenceTransformer(str(path), device="cpu")
    expected = model.encode(EMBED, convert_to_numpy=True)
    assert_close(predict(make_handler(path), EMBED).predictions, expected.tolist(), 1e-5)


@pytest.mark.parametrize("name", ["bert_model", "sentence_transformers"])
def test_embedding_batch_equals_single(paths, name):
    handler = make_handler(paths[name])
    batch = predict(handler, EMBED).predictions
    single = [predict(handler, [text]).predictions[0] for text in EMBED]
    assert_close(batch, single, 1e-5)
    # And across requests batched together in one forward pass.
    together = handler.predict_many([([text], PredictOptions()) for text in EMBED])
    assert_close([r.predictions[0] for r in together], single, 1e-5)


def test_small_token_budget_splits_the_forward_pass_without_changing_answers(paths):
    path = paths["bert_model"]
    split = make_handler(path, max_batch_tokens=16)  # one row per pass at this padded length
    assert_close(predict(split, EMBED).predictions, predict(make_handler(path), EMBED).predictions, 1e-6)


def test_every_handler_warms_up(paths):
    for name in ("sequence_classification", "token_classification", "fill_mask", "bert_model"):
        make_handler(paths[name]).warm_up()


# --- task inference ---


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("sequence_classification", Task.sequence_classification),
        ("token_classification", Task.token_classification),
        ("fill_mask", Task.fill_mask),
        ("bert_model", Task.text_embedding),
        ("sentence_transformers", Task.text_embedding),
        ("llama", Task.text_generation),
        ("t5", Task.text2text_generation),
    ],
)
def test_task_is_inferred_from_the_folder(paths, name, task):
    path = paths[name]
    architectures = AutoConfig.from_pretrained(str(path)).architectures
    assert infer_task(architectures, path) == task
    assert inspect_model(parse_arguments({"model_dir": str(path), "device": "cpu"}, environ={})).task == task


def test_task_inference_failures_name_the_architecture():
    with pytest.raises(TaskError, match="question_answering"):
        infer_task(["BertForQuestionAnswering"])
    with pytest.raises(TaskError, match="couldn't be inferred from WeirdNet"):
        infer_task(["WeirdNet"])
    with pytest.raises(TaskError, match="no architectures"):
        infer_task(None)


def test_explicit_task_overrides_inference(paths):
    args = parse_arguments({"model_dir": str(paths["fill_mask"]), "task": "text_embedding"}, environ={})
    assert inspect_model(args).task == Task.text_embedding
    with pytest.raises(TaskError, match="unknown task 'summarize'"):
        inspect_model(parse_arguments({"model_dir": str(paths["fill_mask"]), "task": "summarize"}, environ={}))


# --- arguments ---


def test_unknown_argument_names_the_closest_valid_one():
    with pytest.raises(ArgumentError, match=r"'model_nmae' \(did you mean 'model_name'\?\)"):
        parse_arguments({"model_nmae": "x"}, environ={})
    with pytest.raises(ArgumentError, match=r"'return_probability' \(did you mean 'return_probabilities'\?\)"):
        parse_arguments({}, environ={"HF_SERVE_RETURN_PROBABILITY": "1"})


def test_argument_aliases():
    args = parse_arguments({"max_length": 64, "disable_postprocess": True}, environ={})
    assert args.max_model_len == 64
    assert args.return_raw_logits is True
    assert parse_arguments({"max_model_len": "32"}, environ={}).max_model_len == 32


def test_arguments_from_environment():
    env = {"HF_SERVE_MODEL_ID": "org/model", "HF_SERVE_RETURN_PROBABILITIES": "true", "OTHER": "x"}
    args = parse_arguments({}, environ=env)
    assert args.model_id == "org/model"
    assert args.return_probabilities is True
    # Given arguments win over the environment, an alias included.
    args = parse_arguments(
        {"model_id": "org/other", "max_length": 16}, environ={**env, "HF_SERVE_MAX_MODEL_LEN": "100"}
    )
    assert (args.model_id, args.max_model_len) == ("org/other", 16)


def test_probabilities_and_raw_logits_exclude_each_other():
    with pytest.raises(ArgumentError, match="exclude each other"):
        parse_arguments({"return_probabilities": True, "return_raw_logits": True}, environ={})
    with pytest.raises(ArgumentError, match="exclude each other"):
        parse_arguments({"disable_postprocess": True}, environ={"HF_SERVE_RETURN_PROBABILITIES": "1"})
    with pytest.raises(InvalidInput, match="exclude each other"):
        PredictOptions.merge(
            parse_arguments({}, environ={}), RequestOptions(return_probabilities=True, return_raw_logits=True)
        )


def test_max_model_len_truncates_and_cannot_exceed_the_model(paths):
    path = paths["token_classification"]
    result = predict(make_handler(path, max_length=8), SENTENCES[1:2])
    assert len(result.predictions[0][0]) == 8
    with pytest.raises(ModelLoadError, match="longer than the model allows"):
        inspect_model(parse_arguments({"model_dir": str(path), "max_model_len": 4096}, environ={}))


# --- lower-casing ---


def test_disable_lower_case_keeps_the_case(paths):
    path = paths["sequence_classification"]
    lowered = make_handler(path).tokenizer
    kept = make_handler(path, disable_lower_case=True).tokenizer
    text = "Paris is the capital of France"
    assert lowered(text)["input_ids"] == lowered(text.lower())["input_ids"]
    assert kept(text)["input_ids"] != lowered(text)["input_ids"]
    assert kept(text.lower())["input_ids"] == lowered(text.lower())["input_ids"]
    assert kept.tokenize(text)[:2] == ["[UNK]", "is"]  # the vocabulary is lower-case only
    # The handler runs with the case-keeping tokenizer: its tokens (and so its answer) differ.
    cased = predict(make_handler(path, disable_lower_case=True), [text], return_raw_logits=True)
    uncased = predict(make_handler(path), [text], return_raw_logits=True)
    assert list(cased.predictions[0].values()) != pytest.approx(list(uncased.predictions[0].values()), abs=1e-6)
