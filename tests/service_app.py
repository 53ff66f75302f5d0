"""The real service imported in-process with its arguments set, as `bentoml serve --arg ...` would.

`service.py` reads its arguments at import (`bentoml.use_arguments()`), so the module is imported
afresh for each call; the returned instance has its routers mounted on `service.app` and its model
started (a generative model's engine, or an encoder's weights). Tests drive `app` with httpx's ASGI
transport or a uvicorn thread: the same routes, error handlers and runtime as `bentoml serve`, without a
subprocess.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from types import ModuleType
from typing import Any

from bentoml._internal.utils.args import set_arguments


def load_service(arguments: dict[str, str]) -> tuple[ModuleType, Any]:
    """(the service module, a started HuggingFaceService instance) for these `--arg` values."""
    set_arguments(dict(arguments))
    sys.modules.pop("service", None)
    try:
        service = importlib.import_module("service")
    finally:
        set_arguments({})  # BentoML keeps them process-wide: a later import must not see this test's model
    instance = service.HuggingFaceService.inner()

    async def start() -> None:
        await instance.runtime.start_loading()

    if instance.generation is None:  # an encoder's weights load on a thread started by the instance
        deadline = time.monotonic() + 120
        while not instance.runtime.ready and instance.runtime.load_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        asyncio.run(start())
    if not instance.runtime.ready:
        raise RuntimeError(f"the service did not become ready: {instance.runtime.load_error}")
    return service, instance


def stop_service(instance: Any) -> None:
    if instance.generation is not None:  # an encoder's threads are daemons, left to the process
        asyncio.run(instance.runtime.stop())
