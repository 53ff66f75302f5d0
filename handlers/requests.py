"""The typed values that pass between protocols and handlers; no torch here, so protocols may import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from handlers.errors import InvalidInput
from settings.arguments import ServerArguments

# One input of a predictive request: a text, or (OpenAI embeddings) the token ids to give the model as they are.
TextInput = str | list[int]


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output, described in the Open Inference Protocol's terms (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]
    # Not in KServe's answer: sent only when the request names it in `outputs` or sets `extra_outputs`.
    extra: bool = False


class RequestOptions(BaseModel):
    """Per-request options, read from the V1/V2 `parameters` object; unset ones take the server's."""

    model_config = ConfigDict(extra="forbid")

    return_probabilities: bool | None = Field(None, description="Softmax probabilities (4 decimals, as KServe).")
    return_raw_logits: bool | None = Field(None, description="Raw logits instead of the argmax.")
    return_offsets_mapping: bool | None = Field(None, description="Add the tokens' character offsets.")
    extra_outputs: bool = Field(
        False,
        description="V2: also send the extra tensors (e.g. the FP32 'probabilities' or 'logits' beside output-0) "
        "without naming them in `outputs`. Off by default, so a V2 answer is exactly KServe's.",
    )
    labels: bool = Field(False, description="Label names from the config's id2label instead of class indices.")
    top_k: int | None = Field(
        None, gt=0, description="fill_mask: the k best tokens per mask with scores; generation: top-k sampling."
    )
    aggregation_strategy: Literal["none", "simple"] = Field(
        "none", description="token_classification: 'simple' merges tokens into entity spans."
    )
    # text_embedding: Matryoshka truncation and sentence-transformers prompts.
    dimensions: int | None = Field(
        None,
        gt=0,
        description="text_embedding: keep the first `dimensions` values, then L2-normalise again when the model's "
        "vectors are normalised (OpenAI's `dimensions`); at most the model's own size.",
    )
    prompt_name: str | None = Field(
        None,
        description="text_embedding: a prompt of the folder's config_sentence_transformers.json, put before each "
        "text (TEI's prompt_name); the folder's default_prompt_name when unset.",
    )
    # Text generation over V1/V2, by OpenAI's completion names and meanings.
    max_tokens: int | None = Field(None, gt=0, description="generation: most tokens to generate.")
    temperature: float | None = Field(None, ge=0, description="generation: 0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1, description="generation: nucleus sampling.")
    seed: int | None = Field(None, description="generation: seed for reproducible sampling.")
    stop: str | list[str] | None = Field(None, description="generation: stop strings, left out of the text.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="generation: OpenAI's presence penalty.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="generation: OpenAI's frequency penalty.")

    def fields_set_among(self, names: frozenset[str]) -> list[str]:
        """Which of `names` the request set, for refusing options that do not apply to a task."""
        return sorted(name for name in self.model_fields_set if name in names)


PREDICTIVE_ONLY_OPTIONS = frozenset(
    {
        "return_probabilities",
        "return_raw_logits",
        "return_offsets_mapping",
        "labels",
        "aggregation_strategy",
        "dimensions",
        "prompt_name",
    }
)
GENERATION_ONLY_OPTIONS = frozenset(
    {"max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty"}
)


@dataclass(frozen=True)
class PredictOptions:
    """Server arguments and request options merged: what one request asks for."""

    return_probabilities: bool = False
    return_raw_logits: bool = False
    return_offsets_mapping: bool = False
    labels: bool = False
    top_k: int | None = None
    aggregation_strategy: str = "none"
    dimensions: int | None = None
    prompt_name: str | None = None
    normalize: bool | None = None  # text_embedding: L2-normalise; None: as the model folder says

    @classmethod
    def merge(cls, args: ServerArguments, request: RequestOptions | None) -> PredictOptions:
        request = request or RequestOptions()
        probabilities = _pick(request.return_probabilities, args.return_probabilities)
        raw_logits = _pick(request.return_raw_logits, args.return_raw_logits)
        if request.return_probabilities and request.return_raw_logits:
            raise InvalidInput("return_probabilities and return_raw_logits exclude each other")
        # A request's explicit choice wins over the server default of the other kind.
        if request.return_probabilities:
            raw_logits = False
        if request.return_raw_logits:
            probabilities = False
        return cls(
            return_probabilities=probabilities,
            return_raw_logits=raw_logits,
            return_offsets_mapping=_pick(request.return_offsets_mapping, args.return_offsets_mapping),
            labels=request.labels,
            top_k=request.top_k,
            aggregation_strategy=request.aggregation_strategy,
            dimensions=request.dimensions,
            prompt_name=request.prompt_name,
        )


def _pick(request_value: bool | None, server_value: bool) -> bool:
    return server_value if request_value is None else request_value


@dataclass
class TaskResult:
    """One request's answer: `outputs` maps output names to one value per input text.

    "output-0" holds the KServe-shaped prediction; other names are extra outputs.
    """

    outputs: dict[str, list[Any]]
    token_count: int

    @property
    def predictions(self) -> list[Any]:
        return self.outputs["output-0"]


@dataclass
class RerankResult:
    """Relevance scores of documents for one query, in the documents' order."""

    scores: list[float]
    token_count: int
