"""vLLM's own OpenAI server app, built on an engine this process already runs.

The two documented steps of `vllm serve` after its engine is up (vllm/entrypoints/launchers/api_server/
entry.py, `build_and_serve`), and nothing else: `build_app(args, supported_tasks, model_config)` makes the
FastAPI app with vLLM's routers, exception handlers and middleware, and `init_app_state(engine_client,
app.state, args, supported_tasks)` builds its serving classes (OpenAIServingChat, OpenAIServingCompletion,
OpenAIServingModels with the LoRA modules, ServingTokenization, OpenAIServingResponses, the pooling
classes of a pooling model) on that engine. `args` is the `vllm serve` Namespace (settings/vllm_serve_args.py).
`start_openai_app` then enters the app's own lifespan, as uvicorn does under `vllm serve`: with engine statistics
on, it logs them every VLLM_LOG_STATS_INTERVAL seconds (vLLM's "Avg prompt throughput ..." lines, from
`do_log_stats`), and it freezes the heap built so far out of the garbage collector's full collections.

tests/test_vllm_glue.py checks these entry points by name and signature, so an upgrade that moves them
fails there, naming the function.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

# The vLLM functions this module calls: (module, name, parameters the calls below pass).
ENTRY_POINTS = (
    ("vllm.entrypoints.launchers.app", "build_app", ("args", "supported_tasks", "model_config")),
    (
        "vllm.entrypoints.launchers.api_server.app_state",
        "init_app_state",
        ("engine_client", "state", "args", "supported_tasks"),
    ),
    ("vllm.entrypoints.launchers.cli_args", "make_arg_parser", ("parser",)),
    ("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args", ("args",)),
    ("vllm.engine.arg_utils.AsyncEngineArgs", "from_cli_args", ("args",)),
    ("vllm.v1.engine.async_llm.AsyncLLM", "from_engine_args", ("engine_args",)),
    ("vllm.v1.engine.async_llm.AsyncLLM", "get_supported_tasks", ()),
)  # fmt: skip


async def build_openai_app(engine: Any, args: argparse.Namespace) -> Any:
    """vLLM's FastAPI app serving its OpenAI API on `engine` (an AsyncLLM), as `vllm serve` builds it."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    supported_tasks = await engine.get_supported_tasks()
    app = build_app(args, supported_tasks, engine.model_config)
    await init_app_state(engine, app.state, args, supported_tasks)
    return app


async def start_openai_app(engine: Any, args: argparse.Namespace, lifespans: contextlib.AsyncExitStack) -> Any:
    """vLLM's app on `engine` (build_openai_app), its lifespan entered on `lifespans`: closing that leaves it."""
    app = await build_openai_app(engine, args)
    await lifespans.enter_async_context(app.router.lifespan_context(app))
    return app
