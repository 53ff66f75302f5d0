"""BentoML's typed API (`@bentoml.api` endpoints): response models and pure translation; no torch here.

Each endpoint's inputs are its keyword parameters (BentoML builds the request schema from them); its
output is one of the models below, so `/schema.json`, `/docs.json` and the BentoML clients see true types.
The translations read only `TaskResult`s, the same results the V1/V2/OpenAI routes format.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

from engines.generation.backend import SamplingOptions
from handlers.errors import InvalidInput
from handlers.requests import TaskResult


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens the model read, padding excluded.")


class Embeddings(BaseModel):
    model: str = Field(description="The served model's name.")
    embeddings: list[list[float]] = Field(description="One vector per input text, in input order.")
    usage: Usage


class LabelScore(BaseModel):
    label: str = Field(description="The class name from the model's id2label (LABEL_i when it has none).")
    score: float = Field(description="Softmax probability in [0, 1].")


class Classifications(BaseModel):
    model: str
    results: list[list[LabelScore]] = Field(description="Per input text, every class, most likely first.")
    usage: Usage


class Entity(BaseModel):
    entity_group: str = Field(description="The entity type (the B-/I- prefix removed).")
    score: float = Field(description="Mean probability of the entity's tokens.")
    word: str = Field(description="The entity's text as the tokenizer reads it back.")
    start: int = Field(description="Character offset of the entity's start in the input text.")
    end: int = Field(description="Character offset just past the entity's end.")


class TokenClassifications(BaseModel):
    model: str
    results: list[list[Entity]] = Field(description="Per input text, its entities in text order ('simple' merge).")
    usage: Usage


class MaskCandidate(BaseModel):
    token: int = Field(description="Token id.")
    token_str: str = Field(description="The token decoded.")
    score: float = Field(description="Softmax probability at the mask position.")


class FillMaskResults(BaseModel):
    model: str
    results: list[list[list[MaskCandidate]]] = Field(
        description="Per input text, per mask token in it, the top_k candidates, most likely first."
    )
    usage: Usage


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request's list.")
    score: float = Field(description="Relevance of the document to the query (higher is more relevant).")
    document: str | None = Field(None, description="The document's text, when return_documents is true.")


class Rerankings(BaseModel):
    model: str
    results: list[RerankResult] = Field(description="The documents, most relevant first (top_n of them).")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.", examples=["user"])
    content: str = Field(description="What they say.", examples=["What is the capital of France?"])


# ---------------------------------------------------------------------------------------------------
# Generation inputs: the request bodies of /generate and /chat
# ---------------------------------------------------------------------------------------------------


class SamplingFields(BaseModel):
    """The sampling options /generate and /chat share; `sampling_options` resolves their defaults."""

    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Most tokens to generate; default: the model's generation_config, else the rest of the context.",
    )
    temperature: float | None = Field(None, ge=0, description="0 is greedy; default: generation_config, else 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling; default: generation_config.")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    stop: list[str] | None = Field(None, description="Stop strings, left out of the text.")


# pydantic lists a base class's fields first, and the last base's before the others': SamplingFields comes
# first among the bases so the prompt (or messages) stays the first property. BentoML's clients map
# positional arguments onto the properties in order, so `client.generate("Once upon a")` keeps working.
class _Prompt(BaseModel):
    prompt: str = Field(
        description="The text to continue (special tokens added as in training).", examples=["Once upon a"]
    )


class _Messages(BaseModel):
    messages: list[ChatMessage] = Field(description="The conversation so far.", min_length=1)


class GenerateInput(SamplingFields, _Prompt):
    """The body of /generate."""


class ChatInput(SamplingFields, _Messages):
    """The body of /chat."""


# BentoML's typed endpoints live under this prefix: their default routes (/embed, /rerank, /generate) are
# TEI's and TGI's, whose clients post there in their own shapes. BentoML's clients find routes in /schema.json.
API_PREFIX = "/bentoml"


class PlaygroundInfo(BaseModel):
    """What the playground page needs to shape itself: the model, its task and the routes that serve it."""

    model: str = Field(description="The served model's name.")
    task: str = Field(description="The served task (text_embedding, sequence_classification, ...).")
    endpoint: str = Field(description="The typed BentoML endpoint the page calls for this task.")
    endpoint_path: str = Field(description="Its route, e.g. /bentoml/embed.")
    ready: bool = Field(description="Whether the model is loaded and warmed up.")
    backend: str | None = Field(None, description="Generation backend (huggingface or vllm); null for encoders.")
    mask_token: str | None = Field(None, description="fill_mask: the tokenizer's mask token to type.")
    routes: list[str] = Field(description="Every route that serves this model's task, BentoML's and the others.")


# ---------------------------------------------------------------------------------------------------
# TaskResult -> typed outputs
# ---------------------------------------------------------------------------------------------------


def embeddings(model: str, result: TaskResult) -> Embeddings:
    return Embeddings(model=model, embeddings=result.predictions, usage=Usage(prompt_tokens=result.token_count))


def classifications(model: str, result: TaskResult) -> Classifications:
    """From labels=True + return_probabilities: output-0 holds {label: 4-decimal probability} per text in
    class order, "probabilities" the full-precision rows in the same order."""
    rows = []
    for named, probabilities in zip(result.predictions, result.outputs["probabilities"], strict=True):
        scores = [LabelScore(label=str(label), score=p) for label, p in zip(named, probabilities, strict=True)]
        rows.append(sorted(scores, key=lambda item: item.score, reverse=True))
    return Classifications(model=model, results=rows, usage=Usage(prompt_tokens=result.token_count))


def token_classifications(model: str, result: TaskResult) -> TokenClassifications:
    rows = [[Entity(**entity) for entity in entities] for entities in result.predictions]
    return TokenClassifications(model=model, results=rows, usage=Usage(prompt_tokens=result.token_count))


def fill_mask_results(model: str, result: TaskResult) -> FillMaskResults:
    """With top_k the handler gives a flat list for a text with one mask (as transformers' pipeline) and a
    list per mask otherwise; here every text has a list per mask."""
    rows = []
    for prediction in result.predictions:
        per_mask = [prediction] if prediction and isinstance(prediction[0], Mapping) else prediction
        rows.append([[MaskCandidate(**candidate) for candidate in mask] for mask in per_mask])
    return FillMaskResults(model=model, results=rows, usage=Usage(prompt_tokens=result.token_count))


def rerankings(
    model: str, documents: list[str], scores: list[float], top_n: int | None, return_documents: bool
) -> Rerankings:
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)[:top_n]
    results = [
        RerankResult(index=i, score=scores[i], document=documents[i] if return_documents else None) for i in order
    ]
    return Rerankings(model=model, results=results)


def wrong_task(model: str, task: str, endpoint: str, needs: str) -> InvalidInput:
    """The 400 of an endpoint the served task cannot answer."""
    return InvalidInput(f"model '{model}' serves {task}; the '{endpoint}' endpoint needs a {needs} model")


def check_texts(texts: list[str], param: str = "texts") -> None:
    if not texts:
        raise InvalidInput(f"'{param}' must hold at least one text", param=param)


# ---------------------------------------------------------------------------------------------------
# Generation: sampling options by the written-down precedence
# ---------------------------------------------------------------------------------------------------


def sampling_options(defaults: Mapping[str, Any], request: SamplingFields, max_tokens: int) -> SamplingOptions:
    """request -> the model's generation_config (`defaults`) -> OpenAI's default, field by field;
    `max_tokens` comes resolved by `max_tokens_for`."""

    def pick(value: Any, key: str, fallback: Any) -> Any:
        if value is not None:
            return value
        return defaults.get(key, fallback)

    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=float(pick(request.temperature, "temperature", 1.0)),
        top_p=float(pick(request.top_p, "top_p", 1.0)),
        top_k=int(defaults.get("top_k", 0)),
        min_p=float(defaults.get("min_p", 0.0)),
        repetition_penalty=float(defaults.get("repetition_penalty", 1.0)),
        seed=request.seed,
        stop=tuple(request.stop or ()),
    )


def max_tokens_for(asked: int | None, defaults: Mapping[str, Any], prompt_len: int, max_model_len: int) -> int:
    """request -> generation_config's max_new_tokens -> the rest of the context; never past the context."""
    rest = max_model_len - prompt_len
    if rest < 1:
        raise InvalidInput(
            f"the prompt has {prompt_len} tokens; this model's context is {max_model_len}, nothing is left to generate"
        )
    if asked is not None:
        if asked > rest:
            raise InvalidInput(
                f"max_tokens={asked} with a prompt of {prompt_len} tokens passes this model's context of "
                f"{max_model_len} tokens; lower max_tokens or shorten the prompt",
                param="max_tokens",
            )
        return asked
    default = defaults.get("max_tokens")
    return int(min(default, rest)) if default else rest
