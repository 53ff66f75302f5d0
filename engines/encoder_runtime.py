"""One served predictive model: its handler, its batcher and whether it is ready yet.

Start-up reads the config and tokenizer at once (a bad model fails the start with its reason),
then loads weights on a background thread, so health routes answer 503 instead of hanging.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

from engines.batcher import MicroBatcher
from handlers.base import PredictiveHandler
from handlers.encoding import Encoded, first_cut
from handlers.errors import InputTooLarge, InvalidInput, NotReady, ServingError
from handlers.registry import handler_class_for
from handlers.requests import GENERATION_ONLY_OPTIONS, PredictOptions, RequestOptions, TaskResult
from settings.arguments import ServerArguments
from settings.loading import ModelSource, inspect_model

logger = logging.getLogger(__name__)

Work = tuple[list[str], PredictOptions]


class PredictiveRuntime:
    def __init__(self, args: ServerArguments, source: ModelSource | None = None) -> None:
        self.args = args
        self.source = source or inspect_model(args)
        self.handler: PredictiveHandler = handler_class_for(self.source.task)(self.source, args)
        self.load_error: str | None = None
        self._ready = threading.Event()
        self._batcher: MicroBatcher[Work, TaskResult] | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

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

        self._batcher = MicroBatcher(
            self.handler.run,
            prepare=prepare,
            cost=lambda encoded: encoded.cost,
            is_large=lambda work: sum(len(text) for text in work[0]) > large_chars,
            max_batch_tokens=self.args.max_batch_tokens,
            streams_results=True,
            max_batch_size=self.args.max_batch_size,
            max_wait_s=self.args.max_wait_ms / 1000,
            max_queue_size=self.args.max_queue_size,
            name=f"batcher-{self.args.model_name}",
        )
        self._ready.set()
        logger.info(
            "model '%s' (%s) ready in %.1f s",
            self.args.model_name,
            self.source.task.value,
            time.perf_counter() - started,
        )

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
        return options

    async def predict(self, texts: list[str], options: PredictOptions) -> TaskResult:
        if self._batcher is None or not self.ready:
            raise self.not_ready_error()
        self.check_limits(texts)
        self.handler.validate(texts, options)
        self._log_request(texts)
        result = await self._batcher.submit((texts, options), size=len(texts))
        if isinstance(result, ServingError):
            raise result
        return result

    def check_limits(self, texts: list[str]) -> None:
        """413 for a request over an input limit, before any work; the limit's argument is named."""
        if len(texts) > self.args.max_client_batch_size:
            raise InputTooLarge(
                f"{len(texts)} inputs in one request is more than max_client_batch_size="
                f"{self.args.max_client_batch_size}; split the request",
                param="inputs",
            )
        if len(texts) > self.args.max_queue_size:
            # Never queueable, so not the batcher's 429 (retrying would not help).
            raise InputTooLarge(
                f"{len(texts)} inputs in one request is more than max_queue_size={self.args.max_queue_size}",
                param="inputs",
            )
        limit = self.args.max_input_characters
        for index, text in enumerate(texts):
            if len(text) > limit:
                raise InputTooLarge(
                    f"input {index} has {len(text)} characters, more than max_input_characters={limit}",
                    param="inputs",
                )

    def _log_request(self, texts: list[str]) -> None:
        if self.args.disable_log_requests or not logger.isEnabledFor(logging.INFO):
            return
        limit = self.args.max_log_len
        shown = [text if limit is None else text[:limit] for text in texts]
        logger.info("request to '%s': %d input(s) %r", self.args.model_name, len(texts), shown)
