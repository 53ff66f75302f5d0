"""KServe V1 / V2 (REST and gRPC) for generative models: texts in, generated texts out.

KServe's runtime answers 500 here; we run each text as an OpenAI completion prompt, so V1/V2
requests get the same sampling options, defaults and errors as /openai/v1/completions.
It offers the runtime interface the V1/V2 routes use (ready, options_for, predict, specs).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engines.generation.backend import GenerationBackend
from engines.memory import freeze_startup_objects
from handlers.errors import InvalidInput, NotReady
from handlers.requests import (
    GENERATION_ONLY_OPTIONS,
    PREDICTIVE_ONLY_OPTIONS,
    RequestOptions,
    TaskResult,
    TensorSpec,
)
from protocols.openai import create_completion
from settings.arguments import ServerArguments
from settings.loading import ModelSource

logger = logging.getLogger(__name__)

_TEXT_SPECS = [TensorSpec("input-0", "BYTES", [-1])], [TensorSpec("output-0", "BYTES", [-1])]


class GenerationSpecs:
    """The tensors a generative model takes and gives over V2."""

    def input_specs(self) -> list[TensorSpec]:
        return _TEXT_SPECS[0]

    def output_specs(self, options: Any = None) -> list[TensorSpec]:
        return _TEXT_SPECS[1]


class GenerativeRuntime:
    def __init__(self, backend: GenerationBackend, args: ServerArguments, source: ModelSource) -> None:
        self.backend = backend
        self.args = args
        self.source = source
        self.handler = GenerationSpecs()
        self.load_error: str | None = None
        self._started = False
        self._loading: asyncio.Task[None] | None = None

    def start_loading(self) -> asyncio.Task[None]:
        """Start the backend in the running loop; readiness follows when it is up."""
        self._loading = asyncio.create_task(self._start())
        return self._loading

    async def _start(self) -> None:
        try:
            await self.backend.start()
        except Exception as error:  # any failure must be reported, not lost in a task
            self.load_error = f"{type(error).__name__}: {error}"
            logger.exception("generation backend for '%s' failed to start", self.args.model_name)
            return
        freeze_startup_objects()
        self._started = True
        logger.info("model '%s' ready on the %s backend", self.args.model_name, self.backend.name)

    @property
    def ready(self) -> bool:
        """Started, and the engine has not died since (a dead engine turns readiness to 503)."""
        return self._started and self.dead_reason is None

    @property
    def dead_reason(self) -> str | None:
        """The backend's `dead_reason` (both backends have one; optional for other GenerationBackends)."""
        return getattr(self.backend, "dead_reason", None)

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._started:
            self._started = False
            await self.backend.stop()

    def not_ready_error(self) -> NotReady:
        dead = self.dead_reason if self._started else None
        if dead is not None:
            return NotReady(f"model '{self.args.model_name}': the generation engine died ({dead}); restart the server")
        return NotReady.for_model(self.args.model_name, self.load_error)

    def options_for(self, request: RequestOptions | None) -> dict[str, Any]:
        """The OpenAI completion fields a V1/V2 request's parameters set."""
        if request is None:
            return {}
        misplaced = request.fields_set_among(PREDICTIVE_ONLY_OPTIONS)
        if misplaced:
            raise InvalidInput(f"{', '.join(misplaced)} do not apply to text generation")
        names = GENERATION_ONLY_OPTIONS | {"top_k"}
        return {name: getattr(request, name) for name in request.fields_set_among(names)}

    async def predict(self, texts: list[str], options: dict[str, Any]) -> TaskResult:
        if not self.ready:
            raise self.not_ready_error()
        response = await create_completion(self.backend, {"prompt": texts, **options}, model_name=self.args.model_name)
        assert isinstance(response, dict), "a request without stream gets one response"
        choices = sorted(response["choices"], key=lambda choice: choice["index"])
        return TaskResult({"output-0": [choice["text"] for choice in choices]}, response["usage"]["prompt_tokens"])
