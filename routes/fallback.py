"""The last router: paths no route serves get a 404 (or 405 for a known path) in the protocol's shape.

BentoML mounts the app without a catch-all, so without this its own server answers unknown paths with a
text/plain 404 that neither the request guard nor the error handlers ever see.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.routing import Match

from routes.common import ServedModel


class _AnyPath(Convertor[str]):
    """Starlette's `path` convertor stops at a newline (`.*`); a hostile path may hold one (%0A).

    BentoML's own outer routes that it adds after mounting this app (the OpenAPI document and the UI's
    static files) are left to BentoML: a match here would hide them.
    """

    regex = r"(?!docs\.json$|static_content/|assets/)[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())

_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def build_router(served: ServedModel) -> APIRouter:
    """Register it last: it matches every path."""
    router = APIRouter()

    @router.api_route("/{path:anypath}", methods=_METHODS, include_in_schema=False)
    async def no_such_route(path: str, request: Request) -> None:
        allowed: set[str] = set()
        for route in request.app.router.routes:
            if getattr(route, "endpoint", None) is no_such_route:
                continue
            for method in getattr(route, "methods", None) or ():
                if route.matches({**request.scope, "method": method})[0] == Match.FULL:
                    allowed.add(method)
        if allowed:
            raise HTTPException(405, headers={"allow": ", ".join(sorted(allowed))})
        raise HTTPException(404)

    return router
