"""OpenAI's /v1/embeddings and /v1/models, in the shapes the official openai client parses."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handlers.errors import InvalidInput
from handlers.requests import TaskResult
from protocols.errors import invalid_from_validation

logger = logging.getLogger(__name__)


class EmbeddingRequest(BaseModel):
    # Unknown fields are accepted (clients add their own) but logged, as vLLM does.
    model_config = ConfigDict(extra="allow")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or little-endian float32 bytes in base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
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


def parse_embedding_request(body: bytes, hidden_size: int) -> tuple[list[str], EmbeddingRequest]:
    try:
        request = EmbeddingRequest.model_validate_json(body)
    except ValidationError as error:
        raise invalid_from_validation(error, "embeddings request") from None
    if request.model_extra:
        # Field names come from the client: a few, each clipped, never the whole (possibly huge) list.
        names = [name[:64] for name in sorted(request.model_extra)[:10]]
        logger.info("embeddings request: ignored %d field(s) %s", len(request.model_extra), names)
    texts = [request.input] if isinstance(request.input, str) else request.input
    if not texts:
        raise InvalidInput("'input' is empty: send a string or a list of strings", param="input")
    if not all(isinstance(text, str) for text in texts):
        raise InvalidInput(
            "'input' as token ids is not supported: this model's tokenizer differs from OpenAI's; send text",
            param="input",
        )
    if request.dimensions is not None and request.dimensions != hidden_size:
        raise InvalidInput(
            f"'dimensions' {request.dimensions} is not supported: this model's embeddings have {hidden_size}",
            param="dimensions",
        )
    return texts, request  # type: ignore[return-value]


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
