"""The rerank API of Cohere, Jina and vLLM (`POST /v1/rerank`, `/openai/v1/rerank`), and TEI's `POST /rerank`.

Both rank documents by a cross-encoder's relevance score, most relevant first. No torch here: the scores
come from `PredictiveRuntime.rerank` as a `RerankResult`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from handlers.errors import InvalidInput
from handlers.requests import RerankResult

logger = logging.getLogger(__name__)


# --- Cohere / Jina / vLLM ---


class RerankDocument(BaseModel):
    """A document as an object; only `text` is read (Cohere's and Jina's shape)."""

    model_config = ConfigDict(extra="allow")

    text: str


class RerankRequest(BaseModel):
    """Cohere's, Jina's and vLLM's rerank request. Unknown fields are accepted and logged."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="The served model's name; any other name is a 404.")
    query: str = Field(description="The query the documents are ranked for.")
    documents: list[str | RerankDocument] = Field(
        min_length=1, description="Texts, or objects with a `text` field, to rank."
    )
    top_n: int | None = Field(
        None, ge=0, description="Return only the n most relevant documents; unset or 0: all (vLLM's default)."
    )
    return_documents: bool = Field(
        True, description="Include each document as {text} in its result (Jina's and vLLM's default)."
    )
    raw_scores: bool = Field(False, description="Extension: raw logits instead of sigmoid relevance scores.")

    def texts(self) -> list[str]:
        return [document if isinstance(document, str) else document.text for document in self.documents]


class RerankResultDocument(BaseModel):
    text: str


class RerankResultItem(BaseModel):
    index: int = Field(description="The document's position in the request.")
    relevance_score: float = Field(description="sigmoid(logit) of the cross-encoder, or the logit with raw_scores.")
    document: RerankResultDocument | None = Field(None, description="The document, with return_documents.")


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResultItem] = Field(description="Most relevant first.")
    usage: RerankUsage


def ranked(scores: list[float], top_n: int | None) -> list[int]:
    """Document indices by descending score (stable for ties), cut to top_n when it is set and positive."""
    order = sorted(range(len(scores)), key=lambda index: -scores[index])
    return order[:top_n] if top_n else order


def rerank_response(request: RerankRequest, model_name: str, result: RerankResult) -> RerankResponse:
    if request.model_extra:
        logger.info("rerank request: ignored fields %s", sorted(request.model_extra))
    texts = request.texts()
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=request.model or model_name,
        results=[
            RerankResultItem(
                index=index,
                relevance_score=result.scores[index],
                document=RerankResultDocument(text=texts[index]) if request.return_documents else None,
            )
            for index in ranked(result.scores, request.top_n)
        ],
        usage=RerankUsage(prompt_tokens=result.token_count, total_tokens=result.token_count),
    )


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class OpenAIErrorResponse(BaseModel):
    """The error body of /v1/rerank and /openai/v1/rerank (OpenAI's shape, as vLLM answers there)."""

    error: OpenAIErrorDetail


# --- TEI ---


class TEIRerankRequest(BaseModel):
    """TEI's `POST /rerank` request."""

    query: str = Field(examples=["What is Deep Learning?"])
    texts: list[str] = Field(examples=[["Deep Learning is ..."]])
    truncate: bool | None = Field(
        None, description="Accepted; inputs longer than max_model_len are always truncated (KServe's behaviour)."
    )
    truncation_direction: Literal["left", "right", "Left", "Right"] = Field(
        "right", description="Only right truncation is served."
    )
    raw_scores: bool = Field(False, description="Raw logits instead of sigmoid scores.")
    return_text: bool = Field(False, description="Include each text in its rank.")


class TEIRank(BaseModel):
    index: int
    text: str | None = Field(None, description="Present with return_text.")
    score: float


def check_truncation_direction(direction: str) -> None:
    if direction.lower() != "right":
        raise InvalidInput("truncation_direction 'left' is not supported; inputs are truncated on the right")


def tei_rerank_response(request: TEIRerankRequest, result: RerankResult) -> list[dict[str, object]]:
    """TEI's ranks, most relevant first; `text` only with return_text (TEI leaves the key out)."""
    ranks = []
    for index in ranked(result.scores, None):
        rank: dict[str, object] = {"index": index, "score": result.scores[index]}
        if request.return_text:
            rank["text"] = request.texts[index]
        ranks.append(rank)
    return ranks
