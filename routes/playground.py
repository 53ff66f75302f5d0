"""The playground page (/playground), its info route, the API docs page (/docs) and BentoML's index.

The page is plain HTML/JS from web/ (no build step, no CDN). It asks /playground/info what the model
serves and calls the matching typed BentoML endpoint. /docs is Swagger UI from BentoML's own bundled
assets over BentoML's OpenAPI document (/docs.json), which merges these FastAPI routes with the
`@bentoml.api` endpoints, so every route is on one page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import FileResponse

from protocols.bentoml_api import API_PREFIX, PlaygroundInfo
from routes.common import OPENAI_PREFIX, ServedModel
from settings.tasks import Task
from web import WEB_DIR

# The typed endpoint the page calls, and the other routes that serve the same task.
_TASK_ROUTES: dict[str, tuple[str, list[str]]] = {
    Task.text_embedding: ("embed", [f"{OPENAI_PREFIX}/v1/embeddings"]),
    Task.sequence_classification: ("classify", []),
    Task.token_classification: ("token_classify", []),
    Task.fill_mask: ("fill_mask", []),
    "rerank": ("rerank", []),
    Task.text_generation: (
        "chat",
        ["/generate", f"{OPENAI_PREFIX}/v1/chat/completions", f"{OPENAI_PREFIX}/v1/completions"],
    ),
    Task.text2text_generation: ("generate", [f"{OPENAI_PREFIX}/v1/completions"]),
}
_ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}


def bentoml_index() -> FileResponse:
    """BentoML's own index page (its Swagger UI, or the new UI when that feature is enabled)."""
    import _bentoml_impl.server as bentoml_server
    from bentoml._internal.configuration.containers import BentoMLContainer

    name = "main-ui.html" if BentoMLContainer.new_index else "main-openapi.html"
    return FileResponse(Path(bentoml_server.__file__).parent / name, media_type="text/html")


def build_router(served: ServedModel) -> APIRouter:
    router = APIRouter()
    args = served.args

    @router.get("/playground", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(WEB_DIR / "playground.html", media_type="text/html")

    @router.get("/playground/info", tags=["playground"])
    async def playground_info() -> PlaygroundInfo:
        """The served model, its task, the typed endpoint the page calls and every route for that task."""
        task = served.runtime.source.task.value
        endpoint, others = _TASK_ROUTES.get(task, ("", []))
        kserve = [f"/v1/models/{args.model_name}:predict", f"/v2/models/{args.model_name}/infer"]
        tokenizer = getattr(served.runtime.handler, "tokenizer", None)
        return PlaygroundInfo(
            model=args.model_name,
            task=task,
            endpoint=endpoint,
            endpoint_path=f"{API_PREFIX}/{endpoint}",
            ready=served.runtime.ready,
            backend=served.generation.name if served.generation is not None else None,
            mask_token=getattr(tokenizer, "mask_token", None) if task == Task.fill_mask else None,
            routes=[f"{API_PREFIX}/{endpoint}", *others, *kserve],
        )

    @router.get("/playground/{asset}", include_in_schema=False)
    async def playground_asset(asset: Literal["playground.js", "playground.css"]) -> FileResponse:
        return FileResponse(WEB_DIR / asset, media_type=_ASSETS[asset])

    @router.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(WEB_DIR / "docs.html", media_type="text/html")

    return router
