"""OpenAI's /v1/embeddings and /v1/models, in the shapes the official openai client parses."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handlers.errors import InvalidInput
from handlers.requests import TaskResult, TextInput
from protocols.errors import invalid_from_validation

logger = logging.getLogger(__name__)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; `input` as texts or as token ids (this model's own tokenizer's)."""

    # Unknown fields are accepted (clients add their own) but logged, as vLLM does.
    model_config = ConfigDict(extra="allow")

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, texts, one input's token ids, or several inputs' token ids. Token ids go to the "
        "model as they are (no special tokens or prompt added), so ids from this model's tokenizer give the "
        "same vector as their text."
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None,
        gt=0,
        description="Keep the first `dimensions` values of each vector, then L2-normalise them again when the "
        "model's vectors are normalised (Matryoshka). 400 when larger than the model's vectors.",
    )
    user: str | None = None
    prompt_name: str | None = Field(
        None,
        description="Extra field: a prompt of the model's config_sentence_transformers.json put before each text "
        "(TEI's prompt_name); the folder's default prompt when unset.",
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 values.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def parse_embedding_request(body: bytes) -> tuple[list[TextInput], EmbeddingRequest]:
    """The request and its inputs: texts, or lists of token ids."""
    try:
        request = EmbeddingRequest.model_validate_json(body)
    except ValidationError as error:
        raise invalid_from_validation(error, "embeddings request") from None
    if request.model_extra:
        # Field names come from the client: a few, each clipped, never the whole (possibly huge) list.
        names = [name[:64] for name in sorted(request.model_extra)[:10]]
        logger.info("embeddings request: ignored %d field(s) %s", len(request.model_extra), names)
    given = request.input
    inputs: list[TextInput]
    if isinstance(given, str):
        inputs = [given]
    elif given and all(isinstance(item, int) for item in given):
        inputs = [list(given)]  # type: ignore[arg-type]  # one input's token ids
    else:
        inputs = list(given)  # type: ignore[arg-type]
    if not inputs:
        raise InvalidInput("'input' is empty: send a string or a list of strings", param="input")
    if any(isinstance(item, list) and not item for item in inputs):
        raise InvalidInput("'input' has an empty list of token ids", param="input")
    return inputs, request


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def embedding_response(request: EmbeddingRequest, model_name: str, result: TaskResult) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": _encode(vector, request.encoding_format)}
            for index, vector in enumerate(result.predictions)
        ],
        "model": request.model or model_name,
        "usage": {"prompt_tokens": result.token_count, "total_tokens": result.token_count},
    }


def models_response(names: list[str], created: int | None = None) -> dict[str, Any]:
    created = int(time.time()) if created is None else created
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "hf-bentoml-server"} for name in names
        ],
    }
