"""Server-sent events framing: `data: {json}\\n\\n` per chunk, errors after the first byte as an error
event, then `data: [DONE]`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from handlers.errors import ServingError
from protocols.errors import openai_error_body
from protocols.openai.runner import Runner

logger = logging.getLogger(__name__)


def sse_event(payload: Mapping[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return f"data: {data}\n\n"


async def sse_stream(events: AsyncIterator[dict[str, Any]], runner: Runner, what: str) -> AsyncIterator[str]:
    """SSE lines for a stream's chunks; an error after the first byte becomes an error event, then
    `[DONE]`; the requests are aborted however the stream ends (client gone included)."""
    try:
        async for event in events:
            yield sse_event(event)
    except ServingError as error:
        yield sse_event(openai_error_body(error))
    except asyncio.CancelledError:
        raise
    except Exception as error:
        logger.exception("%s stream failed", what)
        yield sse_event(openai_error_body(ServingError(f"generation failed: {error}")))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        await runner.close()
    yield sse_event("[DONE]")
