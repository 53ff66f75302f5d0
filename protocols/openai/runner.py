"""Running several GenerationRequests of one OpenAI request and collecting their outputs per choice;
`start` is the opening /completions and /chat/completions share."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from engines.generation.backend import (
    ChoiceDelta,
    GenerationBackend,
    GenerationOutput,
    GenerationRequest,
    TokenLogprobs,
)
from protocols.openai.generation_requests import new_id
from protocols.openai.schemas import SamplingFields

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=SamplingFields)


@dataclass
class Choice:
    text: str = ""
    token_count: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class Runner:
    """Runs several GenerationRequests concurrently and yields (request position, output) as they come.

    `start()` waits for every request's first output, so queue and validation errors surface before
    a response starts; closing the runner (or cancelling its consumer) aborts every request.
    """

    def __init__(self, backend: GenerationBackend, requests: list[GenerationRequest]) -> None:
        self.generators = [backend.generate(r) for r in requests]
        self.queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.first: list[GenerationOutput | None] = [None] * len(requests)

    async def start(self) -> None:
        firsts = [asyncio.ensure_future(anext(g)) for g in self.generators]  # type: ignore[arg-type]
        self.tasks = list(firsts)  # type: ignore[arg-type]
        try:
            await asyncio.gather(*firsts)
        except BaseException:
            await self.close()
            raise
        self.first = [f.result() for f in firsts]
        self.tasks = []
        if len(self.generators) == 1:
            return  # one stream: outputs() reads it directly, without a pump task and queue hop per token
        for position, generator in enumerate(self.generators):
            if not self.first[position].finished:  # type: ignore[union-attr]
                self.tasks.append(asyncio.create_task(self._pump(position, generator)))

    async def _pump(self, position: int, generator: AsyncIterator[GenerationOutput]) -> None:
        try:
            async for output in generator:
                self.queue.put_nowait((position, output))
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self.queue.put_nowait((position, error))
            return
        self.queue.put_nowait((position, None))

    async def outputs(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        for position, output in enumerate(self.first):
            if output is not None:
                yield position, output
        if len(self.generators) == 1:
            if self.first[0] is not None and not self.first[0].finished:
                async for output in self.generators[0]:
                    yield 0, output
            return
        running = len(self.tasks)
        while running:
            position, item = await self.queue.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield position, item
            if item.finished:
                running -= 1

    async def close(self) -> None:
        """Cancel the pumps first (an async generator cannot be closed while it runs), then close."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        for generator in self.generators:
            aclose = getattr(generator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # already failed; its error was reported
                    logger.debug("closing a generation stream failed", exc_info=True)


def collect(choice: Choice, delta: ChoiceDelta) -> None:
    choice.text += delta.text
    choice.token_count += len(delta.token_ids)
    if delta.logprobs:
        choice.logprobs.extend(delta.logprobs)
    if delta.finish_reason is not None:
        choice.finish_reason = delta.finish_reason
        choice.stop_reason = delta.stop_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def off_loop(function: Any, *args: Any) -> Any:
    """Tokenization and chat templates run on a worker thread, off the event loop."""
    return await asyncio.to_thread(function, *args)


@dataclass
class Started(Generic[RequestT]):
    """An OpenAI request past the opening /completions and /chat/completions share."""

    request: RequestT
    request_id: str
    generation_requests: list[GenerationRequest]
    model: str
    runner: Runner
    created: int


async def start(
    backend: GenerationBackend,
    body: Mapping[str, Any],
    model_name: str | None,
    parse: Callable[[Mapping[str, Any]], RequestT],
    id_prefix: str,
    build: Callable[[GenerationBackend, RequestT, str], list[GenerationRequest]],
) -> Started[RequestT]:
    """Parse the body, build its GenerationRequests off the loop and start them: a bad body, an unfit
    sampling option or a full queue raises here, before the response (or its stream) begins."""
    request = parse(body)
    request_id = new_id(id_prefix)
    generation_requests = await off_loop(build, backend, request, request_id)
    model = model_name or request.model or "model"
    runner = Runner(backend, generation_requests)
    await runner.start()
    return Started(request, request_id, generation_requests, model, runner, int(time.time()))
