"""BentoML's own protocol: typed `@bentoml.api` endpoints, mixed into HuggingFaceService.

They run on the same runtime, batcher and generation backend as the KServe and OpenAI routes (one copy
of the model): every endpoint is `async` and awaits the batcher or the backend, so torch never runs on
the event loop. `bentoml.SyncHTTPClient(url).embed(texts=[...])` and friends find them through
`/schema.json`. An endpoint the served task cannot answer gives a 400 that names the task.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from http import HTTPStatus
from typing import Annotated, Any, TypeVar

import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import Field

from engines.encoder_runtime import PredictiveRuntime
from engines.generation.backend import GenerationRequest, check_sampling
from handlers.errors import InvalidInput, ServingError
from handlers.requests import RequestOptions, TaskResult
from protocols import bentoml_api as schema
from routes.common import ServedModel, predict
from settings.tasks import Task

T = TypeVar("T")
R = TypeVar("R", bound=schema.SamplingFields)

Texts = Annotated[
    list[str],
    Field(description="The input texts, one result per text.", min_length=1, examples=[["Paris is lovely in spring."]]),
]


def bentoml_error(error: ServingError) -> BentoMLException:
    """BentoML's endpoint wrapper renders BentoMLExceptions with their status; ServingErrors keep theirs."""
    return BentoMLException(error.message, error_code=HTTPStatus(error.status_code))


async def _answer(work: Coroutine[Any, Any, T]) -> T:
    try:
        return await work
    except ServingError as error:
        raise bentoml_error(error) from None


async def _stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """BentoML awaits the first chunk before it answers, so an error raised before it is a 4xx response."""
    try:
        async with aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                yield chunk
    except ServingError as error:
        raise bentoml_error(error) from None


class TypedApis:
    """The typed endpoints; `self` is the HuggingFaceService instance (a `ServedModel`)."""

    # --- encoders: through the runtime's batcher ---

    @bentoml.api(route=f"{schema.API_PREFIX}/embed")
    async def embed(self: ServedModel, texts: Texts) -> schema.Embeddings:
        """Sentence embeddings (text_embedding models), as /openai/v1/embeddings computes them."""
        return await _answer(_encode(self, "embed", Task.text_embedding, texts, None, schema.embeddings))

    @bentoml.api(route=f"{schema.API_PREFIX}/classify")
    async def classify(self: ServedModel, texts: Texts) -> schema.Classifications:
        """Every class with its probability, most likely first (sequence_classification models)."""
        options = RequestOptions(labels=True, return_probabilities=True)
        work = _encode(self, "classify", Task.sequence_classification, texts, options, schema.classifications)
        return await _answer(work)

    @bentoml.api(route=f"{schema.API_PREFIX}/token_classify")
    async def token_classify(self: ServedModel, texts: Texts) -> schema.TokenClassifications:
        """Named entities with character offsets, tokens merged into spans (token_classification models)."""
        options = RequestOptions(labels=True, aggregation_strategy="simple")
        task = Task.token_classification
        return await _answer(_encode(self, "token_classify", task, texts, options, schema.token_classifications))

    @bentoml.api(route=f"{schema.API_PREFIX}/fill_mask")
    async def fill_mask(
        self: ServedModel,
        texts: Annotated[
            list[str],
            Field(
                description="Texts holding the tokenizer's mask token.",
                min_length=1,
                examples=[["Paris is the [MASK] of France."]],
            ),
        ],
        top_k: Annotated[int, Field(gt=0, le=100, description="Candidates per mask.")] = 5,
    ) -> schema.FillMaskResults:
        """The top_k tokens for every mask token, with probabilities (fill_mask models)."""
        options = RequestOptions(top_k=top_k)
        return await _answer(_encode(self, "fill_mask", Task.fill_mask, texts, options, schema.fill_mask_results))

    @bentoml.api(route=f"{schema.API_PREFIX}/rerank")
    async def rerank(
        self: ServedModel,
        query: Annotated[str, Field(description="What the documents are ranked against.", examples=["capital city"])],
        documents: Annotated[list[str], Field(description="The texts to rank.", min_length=1)],
        top_n: Annotated[int | None, Field(gt=0, description="Return only the n best; default all.")] = None,
        return_documents: Annotated[bool, Field(description="Add each document's text.")] = False,
    ) -> schema.Rerankings:
        """Documents ordered by relevance to the query (rerank models)."""

        async def work() -> schema.Rerankings:
            scores = await rerank_scores(self, query, documents)
            return schema.rerankings(self.args.model_name, documents, scores, top_n, return_documents)

        return await _answer(work())

    # --- generation: through the generation backend, streamed ---

    @bentoml.api(route=f"{schema.API_PREFIX}/generate", input_spec=schema.GenerateInput)
    async def generate(self: ServedModel, **body: Any) -> AsyncGenerator[str, None]:
        """Continue the prompt; the text streams back as it is generated (text_generation models)."""
        # BentoML validated the body against input_spec and passes its fields as keywords.
        request = schema.GenerateInput.model_construct(**body)
        async for text in _stream(_generate(self, "generate", request, _prompt_ids)):
            yield text

    @bentoml.api(route=f"{schema.API_PREFIX}/chat", input_spec=schema.ChatInput)
    async def chat(self: ServedModel, **body: Any) -> AsyncGenerator[str, None]:
        """The assistant's reply by the model's chat template, streamed as it is generated."""
        request = schema.ChatInput.model_construct(**body)
        async for text in _stream(_generate(self, "chat", request, _chat_prompt_ids)):
            yield text


async def _encode(
    served: ServedModel,
    endpoint: str,
    task: Task,
    texts: list[str],
    options: RequestOptions | None,
    shape: Callable[[str, TaskResult], T],
) -> T:
    served_task = served.runtime.source.task
    if served_task != task:
        raise schema.wrong_task(served.args.model_name, served_task.value, endpoint, task.value)
    schema.check_texts(texts)
    result = await predict(served, texts, served.runtime.options_for(options))
    return shape(served.args.model_name, result)


async def rerank_scores(served: ServedModel, query: str, documents: list[str]) -> list[float]:
    """One relevance score per document, in document order: the cross-encoder's scores in the shared batcher."""
    task = served.runtime.source.task.value
    if task != "rerank" or not isinstance(served.runtime, PredictiveRuntime):
        raise schema.wrong_task(served.args.model_name, task, "rerank", "rerank (cross-encoder)")
    result = await served.timer.run("predict", lambda: served.runtime.rerank(query, documents))  # type: ignore[union-attr]
    return result.scores


def _prompt_ids(tokenizer: Any, request: schema.GenerateInput) -> list[int]:
    return list(tokenizer(request.prompt)["input_ids"])


def _chat_prompt_ids(tokenizer: Any, request: schema.ChatInput) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput("this model has no chat template; use the 'generate' endpoint", param="messages")
    conversation = [message.model_dump() for message in request.messages]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def _generate(
    served: ServedModel,
    endpoint: str,
    request: R,
    prompt_ids: Callable[[Any, R], list[int]],
) -> AsyncIterator[str]:
    """The text of one generation as it comes; `prompt_ids(tokenizer, request)` tokenizes the endpoint's input."""
    backend = served.generation
    if backend is None:
        task = served.runtime.source.task.value
        raise schema.wrong_task(served.args.model_name, task, endpoint, "text_generation")
    if not served.runtime.ready:
        raise served.runtime.not_ready_error()
    ids = await asyncio.to_thread(prompt_ids, backend.tokenizer, request)  # tokenizers stay off the event loop
    if not ids:
        raise InvalidInput("the prompt is empty after tokenization")
    defaults = backend.sampling_defaults
    max_tokens = schema.max_tokens_for(request.max_tokens, defaults, len(ids), backend.max_model_len)
    sampling = schema.sampling_options(defaults, request, max_tokens)
    check_sampling(backend, sampling)
    generation_request = GenerationRequest(f"bento-{uuid.uuid4().hex}", tuple(ids), sampling)
    # Closing the generator (the client left) aborts the request in the backend and frees its slot.
    async with aclosing(backend.generate(generation_request)) as outputs:  # type: ignore[type-var]
        async for output in outputs:
            for delta in output.choices:
                if delta.text:
                    yield delta.text
