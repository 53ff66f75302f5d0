"""One served predictive model: its handler, its batcher and whether it is ready yet.

Start-up reads the config and tokenizer at once (a bad model fails the start with its reason),
then loads weights on a background thread, so health routes answer 503 instead of hanging.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Callable

import torch

from engines.batch_metrics import pass_observer
from engines.batcher import MicroBatcher
from engines.memory import freeze_startup_objects
from handlers.base import PredictiveHandler, is_pair
from handlers.encoding import Encoded, first_cut
from handlers.errors import InvalidInput, NotReady, PayloadTooLarge, ServingError
from handlers.registry import handler_class_for
from handlers.requests import (
    GENERATION_ONLY_OPTIONS,
    PredictOptions,
    RequestOptions,
    RerankResult,
    TaskResult,
    TextInput,
)
from settings.arguments import ServerArguments
from settings.loading import ModelSource, forward_thread_setup, inspect_model
from settings.tasks import Task

logger = logging.getLogger(__name__)

Work = tuple[list[TextInput], PredictOptions]
# Tasks whose inputs may be text pairs (query + document, premise + hypothesis).
_PAIR_TASKS = (Task.rerank, Task.sequence_classification)


def input_size(item: TextInput | tuple[str, str]) -> int:
    """Characters of a text or of both texts of a pair; a token-id input counts its ids."""
    if isinstance(item, str):
        return len(item)
    return sum(len(part) if isinstance(part, str) else 1 for part in item)


class PredictiveRuntime:
    def __init__(
        self,
        args: ServerArguments,
        source: ModelSource | None = None,
        requests_in_flight: Callable[[], int] | None = None,
    ) -> None:
        """`requests_in_flight`: the server's requests being answered, so the batcher can fill a batch with
        those already received (engines/batcher.py); without it batches take what is queued."""
        self.args = args
        self.requests_in_flight = requests_in_flight
        self.source = source or inspect_model(args)
        self.handler: PredictiveHandler = handler_class_for(self.source.task)(self.source, args)
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._batcher: MicroBatcher[Work, TaskResult] | None = None

    @property
    def ready(self) -> bool:
        """Loaded and warmed up; with enable_predictor_health_check, the remote predictor ready too."""
        remote = self.handler.remote
        return self._ready.is_set() and (remote is None or remote.healthy)

    def start_loading(self) -> threading.Thread:
        thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        thread.start()
        return thread

    def load(self) -> None:
        """Load weights, warm up and start batching, on the calling thread."""
        started = time.perf_counter()
        self.handler.load()
        self.handler.warm_up()
        # The large lane tokenizes with its own copy: a fast tokenizer must not be reconfigured (truncation)
        # by two threads at once.
        tokenizers = [self.handler.tokenizer, copy.deepcopy(self.handler.tokenizer)]
        large_chars = 4 * first_cut(self.source.max_model_len)

        def prepare(work: Work, lane: int) -> Encoded:
            texts, options = work
            return self.handler.encode(texts, options, tokenizers[lane])

        # The express lane: a small request (a few short sentences) runs beside a batch costing over half a
        # full-length row, instead of waiting for all of it (see engines/batcher.py).
        express_after = max(1, self.source.max_model_len // 2)
        express = self.handler.concurrent_forward
        lanes = self.forward_lanes()
        self._batcher = MicroBatcher(
            self.handler.run,
            express_cost=max(1, express_after // 4) if express else None,
            express_after_cost=express_after,
            thread_setup=forward_thread_setup(),
            forward_lanes=lanes,
            prepare=prepare,
            cost=lambda encoded: encoded.cost,
            is_large=lambda work: sum(map(input_size, work[0])) > large_chars,
            max_batch_tokens=self.args.max_batch_tokens,
            streams_results=True,
            max_batch_size=self.args.max_batch_size,
            max_wait_s=self.args.max_wait_ms / 1000,
            max_queue_size=self.args.max_queue_size,
            arriving=self.requests_in_flight,
            on_pass=pass_observer(self.args.model_name),
            name=f"batcher-{self.args.model_name}",
        )
        freeze_startup_objects()
        self._ready.set()
        logger.info(
            "model '%s' (%s) ready in %.1f s: %s, %d forward lane(s)",
            self.args.model_name,
            self.source.task.value,
            time.perf_counter() - started,
            "traced (TorchScript)" if self.handler.traced is not None else "eager",
            lanes,
        )

    def forward_lanes(self) -> int:
        """Forward passes at once: the argument, else one per torch thread when passes are traced (they hold no
        GIL, handlers/traced.py), else 1. Only a model whose passes may run concurrently gets more than one."""
        if not self.handler.concurrent_forward:
            return 1
        if self.args.forward_lanes is not None:
            return self.args.forward_lanes
        return torch.get_num_threads() if self.handler.traced is not None else 1

    def _load(self) -> None:
        try:
            self.load()
        except Exception as error:  # any failure must be reported, not end the thread silently
            self.load_error = f"{type(error).__name__}: {error}"
            logger.exception("model '%s' failed to load", self.args.model_name)

    def not_ready_error(self) -> NotReady:
        return NotReady.for_model(self.args.model_name, self.load_error)

    def options_for(self, request: RequestOptions | None) -> PredictOptions:
        misplaced = request.fields_set_among(GENERATION_ONLY_OPTIONS) if request else []
        if misplaced:
            raise InvalidInput(
                f"{', '.join(misplaced)} apply to text generation; this model serves {self.source.task.value}"
            )
        options = PredictOptions.merge(self.args, request)
        if options.top_k is not None and self.source.task.value != "fill_mask":
            raise InvalidInput("top_k applies to fill_mask models only", param="top_k")
        if options.aggregation_strategy != "none" and self.source.task.value != "token_classification":
            raise InvalidInput("aggregation_strategy applies to token_classification models only")
        for name in ("dimensions", "prompt_name"):
            if getattr(options, name) is not None and self.source.task.value != "text_embedding":
                raise InvalidInput(f"{name} applies to text_embedding models only", param=name)
        return options

    async def predict(self, texts: list[TextInput], options: PredictOptions) -> TaskResult:
        if self._batcher is None or not self.ready:
            raise self.not_ready_error()
        self.check_limits(texts)
        if self.source.task not in _PAIR_TASKS and any(map(is_pair, texts)):
            raise InvalidInput("text pairs are served by rerank and sequence_classification models; send strings")
        self.handler.validate(texts, options)
        self._log_request(texts)
        result = await self._batcher.submit((texts, options), size=len(texts))
        if isinstance(result, ServingError):
            raise result
        return result

    def check_limits(self, texts: list[TextInput]) -> None:
        """413 for a request over an input limit, before any work; the limit's argument is named."""
        if len(texts) > self.args.max_client_batch_size:
            raise PayloadTooLarge(
                f"{len(texts)} inputs in one request is more than max_client_batch_size="
                f"{self.args.max_client_batch_size}; split the request",
                param="inputs",
            )
        if len(texts) > self.args.max_queue_size:
            # Never queueable, so not the batcher's 429 (retrying would not help).
            raise PayloadTooLarge(
                f"{len(texts)} inputs in one request is more than max_queue_size={self.args.max_queue_size}",
                param="inputs",
            )
        limit = self.args.max_input_characters
        for index, text in enumerate(texts):
            if input_size(text) > limit:
                raise PayloadTooLarge(
                    f"input {index} has {input_size(text)} characters, more than max_input_characters={limit}",
                    param="inputs",
                )

    async def rerank(self, query: str, documents: list[str], *, raw_scores: bool | None = None) -> RerankResult:
        """Score each document against the query with the cross-encoder, batched with other requests.

        Scores are sigmoid(logit) (sentence-transformers' CrossEncoder default), or raw logits with
        `raw_scores=True`; None takes the server's `return_raw_logits`. Any route may call this.
        """
        if self.source.task != Task.rerank:
            raise InvalidInput(
                f"model '{self.args.model_name}' serves {self.source.task.value}; reranking needs a cross-encoder "
                "(serve one with task=rerank)"
            )
        if not documents:
            raise InvalidInput("'documents' is empty: send at least one document", param="documents")
        options = self.options_for(RequestOptions(return_raw_logits=raw_scores) if raw_scores is not None else None)
        result = await self.predict([(query, document) for document in documents], options)  # type: ignore[misc]
        return RerankResult(scores=list(result.predictions), token_count=result.token_count)

    async def token_embeddings(self, texts: list[str]) -> list[list[list[float]]]:
        """Every token's last hidden state per input (TEI's /embed_all), on a worker thread."""
        if self.source.task != Task.text_embedding:
            raise InvalidInput(
                f"model '{self.args.model_name}' serves {self.source.task.value}; not an embedding model"
            )
        if self._batcher is None or not self.ready:
            raise self.not_ready_error()
        if len(texts) > self.args.max_batch_size:
            raise InvalidInput(f"batch size {len(texts)} > maximum allowed batch size {self.args.max_batch_size}")
        return await asyncio.to_thread(self.handler.hidden_states, texts)

    def _log_request(self, texts: list[TextInput]) -> None:
        if self.args.disable_log_requests or not logger.isEnabledFor(logging.INFO):
            return
        limit = self.args.max_log_len
        shown = [text if limit is None else text[:limit] for text in texts]
        logger.info("request to '%s': %d input(s) %r", self.args.model_name, len(texts), shown)
