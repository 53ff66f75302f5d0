"""The vLLM backend's in-process ceiling, for benchmarks.vllm_side_by_side --ceiling.

On PYTHONPATH with BENCH_VLLM_CEILING_PORT set, this `sitecustomize` makes our worker serve vLLM's OpenAI app,
the same app on the same engine that /openai serves, a second time: bare, on its own uvicorn server at
127.0.0.1:PORT in the worker's own event loop, with nothing of BentoML's or ours in front (its lifespan is off:
the backend already runs it, engines/generation/vllm_openai.py). What the two ports
answer differs only by the layers in front of vLLM's app, measured in the same process on the same engine.

It waits for `engines.generation.vllm_openai` to be imported (a finder on sys.meta_path, so no other process
that Python starts under `bentoml serve` imports anything more) and wraps its `build_openai_app`. With
BENCH_LAYER_TIMES set too, layer_times.py times the layers in front of that app (benchmarks.layer_costs).
With BENCH_CEILING_SERVES=service, the second server serves our whole service app instead (the one BentoML's
worker hands to its uvicorn, everything of ours and BentoML's in front of vLLM's app): then the two ports
differ only by the server around the app, BentoML's worker and its socket against a plain uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

PORT_VARIABLE = "BENCH_VLLM_CEILING_PORT"
LAYER_TIMES_VARIABLE = "BENCH_LAYER_TIMES"  # also time each layer's entry (layer_times.py, benchmarks.layer_costs)
SERVES_VARIABLE = "BENCH_CEILING_SERVES"  # "service": serve our whole service app on the port instead
MODULE = "engines.generation.vllm_openai"


def serving_bare_too(build: Any, port: int) -> Any:
    """`build_openai_app` that also serves the app it built, bare, on `port`."""
    serving: list[asyncio.Task[None]] = []

    async def build_and_serve(engine: Any, args: Any) -> Any:
        import uvicorn

        app = served = await build(engine, args)
        if os.environ.get(SERVES_VARIABLE) == "service":
            served = SERVICE_APPS[0]  # handed to uvicorn before vLLM's app is built
        elif os.environ.get(LAYER_TIMES_VARIABLE):
            import layer_times

            layer_times.stamp_vllm_app(app)
            served = layer_times.with_times_route(app)
        config = uvicorn.Config(served, host="127.0.0.1", port=port, log_level="warning", loop="none", lifespan="off")
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # the worker's own stay
        serving.append(asyncio.get_running_loop().create_task(server.serve()))  # a reference, so it is not collected
        print(f"{PORT_VARIABLE}: vLLM's app served bare on 127.0.0.1:{port}", flush=True)
        return app

    return build_and_serve


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Calls `patch(module)` once the module `name` has been executed, wherever it is imported from; processes
    that never import it (BentoML's arbiter, vLLM's engine core) are left alone."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            self.patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


SERVICE_APPS: list[Any] = []  # the Starlette app BentoML's worker serves, once caught


def on_service_app(config_class: Any, uses: list[Callable[[Any], None]]) -> None:
    """Hand the first Starlette app given to uvicorn in this process (BentoML's worker's) to each of `uses`."""
    configure = config_class.__init__

    def catching_init(config: Any, app: Any, *args: Any, **kwargs: Any) -> None:
        if not SERVICE_APPS and hasattr(app, "build_middleware_stack"):
            SERVICE_APPS.append(app)
            for use in uses:
                use(app)
        configure(config, app, *args, **kwargs)

    config_class.__init__ = catching_init


def serve_bare_too(module: ModuleType) -> None:
    port = int(os.environ[PORT_VARIABLE])
    module.build_openai_app = serving_bare_too(module.build_openai_app, port)  # type: ignore[attr-defined]


if os.environ.get(PORT_VARIABLE):
    sys.meta_path.insert(0, PatchOnImport(MODULE, serve_bare_too))
    uses: list[Callable[[Any], None]] = []
    if os.environ.get(LAYER_TIMES_VARIABLE) and os.environ.get(SERVES_VARIABLE) != "service":
        import layer_times

        uses.append(layer_times.stamp_our_layers)  # BentoML's worker hands its app to uvicorn before vLLM's is built
    if uses or os.environ.get(SERVES_VARIABLE) == "service":
        sys.meta_path.insert(0, PatchOnImport("uvicorn.config", lambda config: on_service_app(config.Config, uses)))
