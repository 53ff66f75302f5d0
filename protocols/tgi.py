"""text-generation-inference (TGI)'s `/generate` and `/generate_stream` over any GenerationBackend (no torch).

Shapes follow TGI's OpenAPI document (GenerateRequest, GenerateParameters, GenerateResponse, StreamResponse).
Sampling is TGI's: greedy unless `do_sample` or a sampling parameter (temperature, top_k, top_p below 1)
is set; max_new_tokens defaults to the model's generation_config, else 100. Parameters this server cannot
honour (grammar, best_of > 1, watermark, typical_p, top_n_tokens, decoder_input_details, adapter_id) are
a 400 naming them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from engines.generation.backend import (
    ChoiceDelta,
    GenerationBackend,
    GenerationRequest,
    SamplingOptions,
    check_sampling,
)
from handlers.errors import InvalidInput, ServingError

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 100

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class GenerateParameters(BaseModel):
    # Unknown fields are accepted and logged, as TGI ignores them.
    model_config = ConfigDict(extra="allow")

    adapter_id: str | None = Field(None, description="Not served: a 400 when set.")
    best_of: int | None = Field(None, gt=0, description="Only 1 is served.")
    decoder_input_details: bool = Field(False, description="Not served: a 400 when true.")
    details: bool = Field(True, description="Return finish reason, token ids, texts and logprobs.")
    do_sample: bool = Field(False, description="Sample; greedy otherwise (unless a sampling parameter is set).")
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    grammar: dict[str, Any] | None = Field(None, description="Not served: a 400 when set.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default: generation_config's, else 100.")
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool | None = Field(None, description="Prefix the prompt to generated_text (default false).")
    seed: int | None = Field(None, ge=0)
    stop: list[str] = Field(default_factory=list, description="Stop sequences, kept out of the text.")
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, gt=0, description="Not served: a 400 when set.")
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, ge=1, description="Keep only the last n prompt tokens.")
    typical_p: float | None = Field(None, gt=0, le=1, description="Not served: a 400 when below 1.")
    watermark: bool = Field(False, description="Not served: a 400 when true.")

    def refuse_unsupported(self) -> None:
        if self.model_extra:
            logger.info("generate request: ignored parameters %s", sorted(self.model_extra))
        unsupported = {
            "adapter_id": self.adapter_id is not None,
            "best_of": (self.best_of or 1) > 1,
            "decoder_input_details": self.decoder_input_details,
            "grammar": self.grammar is not None,
            "top_n_tokens": self.top_n_tokens is not None,
            "typical_p": self.typical_p is not None and self.typical_p < 1,
            "watermark": self.watermark,
        }
        for name, asked in unsupported.items():
            if asked:
                raise InvalidInput(f"'{name}' is not supported by this server", param=name)


class GenerateRequest(BaseModel):
    inputs: str = Field(examples=["My name is Olivier and I"])
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    """`POST /` on generative models: /generate, or /generate_stream with `stream`."""

    stream: bool | None = Field(False, description="Answer as /generate_stream does.")


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[dict[str, Any]] = Field(default_factory=list, description="Always empty here.")
    tokens: list[Token]


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


def _sampling(backend: GenerationBackend, parameters: GenerateParameters) -> SamplingOptions:
    sample = (
        parameters.do_sample
        or (parameters.temperature is not None and parameters.temperature != 1.0)
        or parameters.top_k is not None
        or (parameters.top_p is not None and parameters.top_p < 1.0)
    )
    max_tokens = parameters.max_new_tokens or backend.sampling_defaults.get("max_tokens", DEFAULT_MAX_NEW_TOKENS)
    return SamplingOptions(
        max_tokens=int(max_tokens),
        temperature=(parameters.temperature or 1.0) if sample else 0.0,
        top_p=parameters.top_p or 1.0,
        top_k=parameters.top_k or 0,
        seed=parameters.seed,
        stop=tuple(parameters.stop),
        frequency_penalty=parameters.frequency_penalty or 0.0,
        repetition_penalty=parameters.repetition_penalty or 1.0,
        logprobs=0 if parameters.details else None,
    )


async def _generation_request(backend: GenerationBackend, request: GenerateRequest) -> tuple[GenerationRequest, int]:
    parameters = request.parameters
    parameters.refuse_unsupported()
    sampling = _sampling(backend, parameters)
    check_sampling(backend, sampling)
    ids: list[int] = (await asyncio.to_thread(backend.tokenizer, request.inputs))["input_ids"]
    if parameters.truncate is not None:
        ids = ids[-parameters.truncate :]
    if len(ids) + sampling.max_tokens > backend.max_model_len:
        raise InvalidInput(
            f"`inputs` tokens + `max_new_tokens` must be <= {backend.max_model_len}. "
            f"Given: {len(ids)} `inputs` tokens and {sampling.max_tokens} `max_new_tokens`",
            param="max_new_tokens",
        )
    return GenerationRequest(f"generate-{uuid.uuid4().hex}", tuple(ids), sampling), len(ids)


@dataclass
class _Progress:
    """What one generation produced so far."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    finished: bool = False


def _finish_reason(delta: ChoiceDelta) -> FinishReason:
    if delta.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(delta.stop_reason, str) else "eos_token"


def _delta_tokens(backend: GenerationBackend, delta: ChoiceDelta) -> list[Token]:
    """One Token per new id; the delta's text goes on its last token, so the texts add up to the output."""
    special_ids = set(getattr(backend.tokenizer, "all_special_ids", []))
    logprobs = delta.logprobs or ()
    tokens = []
    for position, token_id in enumerate(delta.token_ids):
        last = position == len(delta.token_ids) - 1
        logprob = logprobs[position].chosen.logprob if position < len(logprobs) else None
        tokens.append(
            Token(id=token_id, text=delta.text if last else "", logprob=logprob, special=token_id in special_ids)
        )
    return tokens


async def _run(
    backend: GenerationBackend, generation: GenerationRequest
) -> AsyncIterator[tuple[list[Token], _Progress]]:
    progress = _Progress()
    generator = backend.generate(generation)
    async with contextlib.aclosing(generator):  # type: ignore[type-var]
        async for output in generator:
            for delta in output.choices:
                new = _delta_tokens(backend, delta)
                progress.text += delta.text
                progress.tokens.extend(new)
                if delta.finished:
                    progress.finish_reason = _finish_reason(delta)
                    progress.finished = True
                yield new, progress


async def generate(backend: GenerationBackend, request: GenerateRequest) -> GenerateResponse:
    """POST /generate."""
    generation, _ = await _generation_request(backend, request)
    progress = _Progress()
    async for step in _run(backend, generation):
        progress = step[1]
    prefix = request.inputs if request.parameters.return_full_text else ""
    details = None
    if request.parameters.details:
        details = Details(
            finish_reason=progress.finish_reason,
            generated_tokens=len(progress.tokens),
            seed=request.parameters.seed,
            tokens=progress.tokens,
        )
    return GenerateResponse(generated_text=prefix + progress.text, details=details)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data:" + orjson.dumps(payload) + b"\n\n"


async def generate_stream(backend: GenerationBackend, request: GenerateRequest) -> AsyncIterator[bytes]:
    """POST /generate_stream: validation errors raise before the stream starts; later ones become an
    `{"error", "error_type": "generation"}` event, as TGI sends them."""
    generation, input_length = await _generation_request(backend, request)
    events = _run(backend, generation)
    try:
        first = await anext(events, None)  # queue and engine errors surface as an HTTP status
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    prefix = request.inputs if request.parameters.return_full_text else ""

    async def stream() -> AsyncIterator[bytes]:
        index = 0
        item = first
        try:
            while item is not None:
                new, progress = item
                if progress.finished and not new and progress.tokens:
                    new = [progress.tokens[-1].model_copy(update={"text": ""})]
                for position, token in enumerate(new):
                    index += 1
                    event = StreamResponse(index=index, token=token)
                    if progress.finished and position == len(new) - 1:
                        event.generated_text = prefix + progress.text
                        event.details = StreamDetails(
                            finish_reason=progress.finish_reason,
                            generated_tokens=len(progress.tokens),
                            seed=request.parameters.seed,
                            input_length=input_length,
                        )
                    yield _event(event.model_dump())
                item = await anext(events, None)
        except ServingError as error:
            yield _event({"error": error.message, "error_type": "generation"})
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return stream()
