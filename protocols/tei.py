"""text-embeddings-inference (TEI) routes' wire shapes, and the Hugging Face Inference API shapes that
`huggingface_hub.InferenceClient(model=URL)` sends to `POST /` for tasks TEI does not serve
(text, token classification and fill-mask pipelines). No torch here: vectors and scores arrive as lists.

TEI's fields and defaults (router/src/http/types.rs) are kept; differences are named in each field's
description. Errors use TEI's body `{"error": ..., "error_type": ...}` (see `protocols.errors.tei_error_body`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from handlers.errors import InvalidInput

TruncationDirection = Literal["left", "right", "Left", "Right"]

_TRUNCATE = "Accepted; inputs longer than max_model_len are always truncated (KServe's behaviour, TEI's auto-truncate)."
_PROMPT_NAME = "A key of the sentence-transformers config's `prompts`, prepended to every input."


class EmbedRequest(BaseModel):
    """TEI's `POST /embed` (and `POST /` on embedding models); InferenceClient.feature_extraction sends it."""

    inputs: StrictStr | list[StrictStr] = Field(examples=["What is Deep Learning?"])
    truncate: bool | None = Field(None, description=_TRUNCATE)
    truncation_direction: TruncationDirection = Field("right", description="Only right truncation is served.")
    prompt_name: str | None = Field(None, description=_PROMPT_NAME)
    normalize: bool = Field(True, description="L2-normalise each vector (TEI's default: true).")
    dimensions: int | None = Field(
        None, gt=0, description="Keep the first n dimensions (Matryoshka), then normalise if `normalize`."
    )


class EmbedAllRequest(BaseModel):
    """TEI's `POST /embed_all`: every token's last hidden state, without pooling."""

    inputs: StrictStr | list[StrictStr]
    truncate: bool | None = Field(None, description=_TRUNCATE)
    truncation_direction: TruncationDirection = "right"
    prompt_name: str | None = Field(None, description=_PROMPT_NAME)


class PredictRequest(BaseModel):
    """TEI's `POST /predict`: a text, a pair [text, text], or a batch [[text], [text, text], ...]."""

    inputs: StrictStr | list[StrictStr] | list[list[StrictStr]] = Field(examples=["I like you."])
    truncate: bool | None = Field(None, description=_TRUNCATE)
    truncation_direction: TruncationDirection = "right"
    raw_scores: bool = Field(False, description="Logits instead of softmax (sigmoid for one label).")


class Prediction(BaseModel):
    score: float
    label: str


class TokenizeRequest(BaseModel):
    inputs: StrictStr | list[StrictStr]
    add_special_tokens: bool = True
    prompt_name: str | None = Field(None, description=_PROMPT_NAME)


class SimpleToken(BaseModel):
    id: int
    text: str = Field(description="The token's span of the input (special tokens: the token itself).")
    special: bool
    start: int | None = Field(None, description="Character offset of the span (None for special tokens).")
    stop: int | None = None


class DecodeRequest(BaseModel):
    ids: list[int] | list[list[int]]
    skip_special_tokens: bool = True


class Info(BaseModel):
    """TEI's `GET /info` for encoders (TGI's fields for generative models are added beside them)."""

    model_config = ConfigDict(extra="allow")

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    served_model_name: str
    model_type: dict[str, Any] = Field(description='{"embedding": ...}, {"classifier": ...} or {"reranker": ...}')
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool = True
    tokenization_workers: int = 1
    version: str
    sha: str | None = None
    docker_label: str | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


# --- the Hugging Face Inference API's pipeline shapes, for POST / ---


class PipelineParameters(BaseModel):
    """Parameters InferenceClient sends for text_classification, token_classification and fill_mask."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(None, gt=0, description="text_classification: best k labels; fill_mask: k tokens.")
    function_to_apply: Literal["sigmoid", "softmax", "none"] | None = Field(
        None, description="text_classification: default softmax (sigmoid for one label)."
    )
    aggregation_strategy: Literal["simple"] | None = Field(
        None, description="token_classification: entity spans, as transformers' pipeline ('simple', the default)."
    )
    ignore_labels: list[str] | None = Field(None, description="token_classification: labels left out (default O).")
    stride: int | None = Field(None, description="token_classification: not served (a 400 when set).")
    targets: list[str] | None = Field(None, description="fill_mask: not served (a 400 when set).")


class PipelineRequest(BaseModel):
    """`{"inputs": ..., "parameters": {...}}`, as InferenceClient posts to `/` for classification pipelines."""

    inputs: StrictStr | list[StrictStr]
    parameters: PipelineParameters | None = None


# --- translation ---


def texts_of(inputs: str | list[str]) -> tuple[list[str], bool]:
    """(texts, single): a string is one input whose answer is not wrapped in a batch."""
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not texts:
        raise InvalidInput("`inputs` cannot be empty")
    return texts, isinstance(inputs, str)


def predict_inputs(inputs: str | list[str] | list[list[str]]) -> tuple[list[Any], bool]:
    """TEI's PredictInput: (texts or (a, b) pairs, single)."""
    if isinstance(inputs, str):
        return [inputs], True
    if not inputs:
        raise InvalidInput("`inputs` cannot be empty")
    if all(isinstance(item, str) for item in inputs):
        return [_sequence(list(inputs))], True  # type: ignore[arg-type]
    return [_sequence(item) for item in inputs], False  # type: ignore[arg-type]


def _sequence(parts: list[str]) -> str | tuple[str, str]:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise InvalidInput(f"an input is a string or a pair of strings; got {len(parts)} strings")


def scores(logits: list[float], function: str) -> list[float]:
    """softmax, sigmoid or the logits as they are."""
    if function == "none":
        return [float(v) for v in logits]
    if function == "sigmoid":
        return [1.0 / (1.0 + math.exp(-v)) for v in logits]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [v / total for v in exps]


def default_function(num_labels: int, raw: bool = False) -> str:
    """TEI's and the pipeline's rule: softmax, or sigmoid for one label."""
    if raw:
        return "none"
    return "sigmoid" if num_labels == 1 else "softmax"


def ranked_predictions(logits: list[float], labels: list[str], function: str, top_k: int | None = None) -> list[dict]:
    """[{label, score}] most likely first, as TEI's /predict and the text-classification pipeline."""
    values = scores(logits, function)
    order = sorted(range(len(values)), key=lambda index: -values[index])
    return [{"label": labels[index], "score": values[index]} for index in order[:top_k]]


def embeddings(vectors: list[list[float]], dimensions: int | None, normalize: bool) -> list[list[float]]:
    """Vectors cut to `dimensions`, then L2-normalised when asked."""
    array = np.asarray(vectors, dtype=np.float32)
    if dimensions is not None:
        if dimensions > array.shape[1]:
            raise InvalidInput(f"dimensions {dimensions} is larger than the model's {array.shape[1]}")
        array = array[:, :dimensions]
    if normalize:
        array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)
    return array.tolist()


def tokens(input_ids: list[int], offsets: list[tuple[int, int]], special: list[int], text: str, names: list[str]):
    """TEI's SimpleTokens of one input: special tokens by name, others as their span of the text."""
    result = []
    for token_id, (start, stop), is_special, name in zip(input_ids, offsets, special, names, strict=True):
        if is_special:
            result.append({"id": token_id, "text": name, "special": True, "start": None, "stop": None})
        else:
            result.append({"id": token_id, "text": text[start:stop], "special": False, "start": start, "stop": stop})
    return result
