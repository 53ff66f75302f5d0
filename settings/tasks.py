"""Which task a model folder serves: KServe's architecture-suffix table, plus embedders it misses."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any


class Task(StrEnum):
    sequence_classification = "sequence_classification"
    token_classification = "token_classification"
    fill_mask = "fill_mask"
    text_embedding = "text_embedding"
    rerank = "rerank"
    text_generation = "text_generation"
    text2text_generation = "text2text_generation"

    @property
    def is_generative(self) -> bool:
        return self in (Task.text_generation, Task.text2text_generation)


class TaskError(ValueError):
    """The task cannot be served or inferred; the message says why."""


# KServe's order: the first suffix that matches wins. None marks tasks KServe names but cannot serve.
_SUFFIX_TASKS: list[tuple[str, Task | None, str]] = [
    ("TapasForQuestionAnswering", None, "table_qa"),
    ("ForQuestionAnswering", None, "question_answering"),
    ("ForTokenClassification", Task.token_classification, ""),
    ("ForSequenceClassification", Task.sequence_classification, ""),
    ("ForMultipleChoice", None, "multiple_choice"),
    ("ForMaskedLM", Task.fill_mask, ""),
    ("ForCausalLM", Task.text_generation, ""),
    ("LMHeadModel", Task.text_generation, ""),
    ("ForConditionalGeneration", Task.text2text_generation, ""),
    ("MTModel", Task.text2text_generation, ""),
    ("EncoderDecoderModel", Task.text2text_generation, ""),
]

# Bare encoders (BertModel, XLMRobertaModel, ...) produce hidden states only: embeddings are what
# they can serve. KServe demands --task for them.
_ENCODER_MODEL_SUFFIX = "Model"


def parse_task(name: str) -> Task:
    try:
        return Task(name)
    except ValueError:
        valid = ", ".join(t.value for t in Task)
        raise TaskError(f"unknown task '{name}'; supported tasks: {valid}") from None


def is_sentence_transformers_folder(model_path: Path) -> bool:
    return (model_path / "modules.json").is_file() or (model_path / "1_Pooling" / "config.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        parsed = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def cross_encoder_activation(model_path: Path) -> str | None:
    """The activation a sentence-transformers CrossEncoder folder names (None: not such a folder).

    Recognised: `config_sentence_transformers.json` with model_type "CrossEncoder" (v6), config.json's
    `sentence_transformers.activation_fn` (v4, v5) or `sbert_ce_default_activation_function` (older).

    "" means a CrossEncoder folder that names none (sentence-transformers then uses sigmoid for one label).
    """
    st_config = _read_json(model_path / "config_sentence_transformers.json")
    if st_config.get("model_type") == "CrossEncoder":
        return str(st_config.get("activation_fn") or "")
    config = _read_json(model_path / "config.json")
    nested = config.get("sentence_transformers")
    if isinstance(nested, dict) and "activation_fn" in nested:
        return str(nested["activation_fn"] or "")
    if config.get("sbert_ce_default_activation_function"):
        return str(config["sbert_ce_default_activation_function"])
    return None


def infer_task(architectures: list[str] | None, model_path: Path | None = None) -> Task:
    """The task for a model, from its folder layout and config.architectures[0]."""
    if model_path is not None and cross_encoder_activation(model_path) is not None:
        return Task.rerank
    if model_path is not None and is_sentence_transformers_folder(model_path):
        return Task.text_embedding
    if not architectures:
        raise TaskError("Task couldn't be inferred: the config names no architectures. Set the `task` argument.")
    architecture = architectures[0]
    for suffix, task, unsupported_name in _SUFFIX_TASKS:
        if architecture.endswith(suffix):
            if task is None:
                raise TaskError(
                    f"{architecture} is a {unsupported_name} model, which this server does not serve. "
                    f"Supported tasks: {', '.join(t.value for t in Task)}"
                )
            return task
    if architecture.endswith(_ENCODER_MODEL_SUFFIX):
        return Task.text_embedding
    raise TaskError(f"Task couldn't be inferred from {architecture}. Please manually set `task` option.")
