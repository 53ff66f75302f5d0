"""vLLM's pooling runner for an encoder model (`--arg backend=vllm`): its OpenAI pooling routes under /openai.

The engine is an AsyncLLM started with `runner="pooling"`, and vLLM's own app serves it (the same two steps
as generation, engines/generation/vllm_openai.py): /openai/v1/embeddings for an embedding model,
/openai/classify for a sequence classifier, /openai/score, /openai/v1/score and /openai/v1/rerank for a
one-label cross-encoder, /openai/pooling for all; which of them vLLM registers follows the tasks the engine
reports. The project's encoder runtime still serves KServe V1/V2, gRPC, TEI and the rerank routes, so
the model is loaded twice: once per runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from engines.generation.select import vllm_unavailable_reason
from engines.generation.vllm_backend import CPU_ENV_DEFAULTS, build_engine, serve_namespace
from engines.generation.vllm_openai import start_openai_app
from handlers.errors import NotReady
from settings.arguments import ServerArguments
from settings.loading import ModelLoadError, ModelSource
from settings.tasks import Task

logger = logging.getLogger(__name__)

# The encoder tasks vLLM's pooling runner serves. fill_mask has no vLLM pooling task.
POOLING_TASKS = (Task.text_embedding, Task.sequence_classification, Task.rerank, Task.token_classification)


def pooling_unavailable_reason(source: ModelSource) -> str | None:
    """Why vLLM cannot serve this encoder model (None when it can)."""
    if source.task not in POOLING_TASKS:
        served = ", ".join(task.value for task in POOLING_TASKS)
        return f"vLLM's pooling runner serves {served}; not {source.task.value}"
    return vllm_unavailable_reason(source)


class VLLMPoolingEngine:
    """An AsyncLLM with the pooling runner, and vLLM's OpenAI app on it once started."""

    def __init__(self, source: ModelSource, args: ServerArguments) -> None:
        reason = pooling_unavailable_reason(source)
        if reason:
            raise ModelLoadError(f"backend 'vllm' was asked for but cannot serve this model: {reason}")
        self.source = source
        self.args = args
        self.engine: Any = None
        self.openai_app: Any = None
        self._openai_lifespan = contextlib.AsyncExitStack()  # the app's, entered at start, left at stop
        self.load_error: str | None = None
        self._loading: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.openai_app is not None

    def not_ready_error(self) -> NotReady:
        return NotReady.for_model(self.args.model_name, self.load_error)

    def start_loading(self) -> asyncio.Task[None]:
        """Start the engine in the running loop; `ready` follows when vLLM's app is built."""
        self._loading = asyncio.create_task(self._start())
        return self._loading

    async def _start(self) -> None:
        try:
            await self.start()
        except Exception as error:  # reported by readiness and every /openai answer, not lost in a task
            self.load_error = f"{type(error).__name__}: {error}"
            logger.exception("vLLM's pooling engine for '%s' did not start", self.args.model_name)

    async def start(self) -> None:
        if self.source.device.type == "cpu":
            for name, value in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(name, value)
        namespace = serve_namespace(self.source, self.args, runner="pooling")
        # Building the engine blocks for seconds: off the event loop.
        self.engine = await asyncio.to_thread(build_engine, namespace, self.args.engine_nice)
        try:
            self.openai_app = await start_openai_app(self.engine, namespace, self._openai_lifespan)
        except Exception as error:
            await self._shutdown()
            raise ModelLoadError(f"vLLM's OpenAI layer did not start: {type(error).__name__}: {error}") from error
        tasks = await self.engine.get_supported_tasks()
        logger.info("vLLM pooling engine started: %s, tasks %s", self.source.path, ", ".join(tasks))

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await self._shutdown()

    async def _shutdown(self) -> None:
        self.openai_app = None
        await self._openai_lifespan.aclose()
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
