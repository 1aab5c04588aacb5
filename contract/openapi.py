"""Helpers shared by the two HTTP services' OpenAPI documents (producers/openapi.py, gateway/openapi.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi


def install_openapi(app: FastAPI, complete: Callable[[dict[str, Any]], None]) -> None:
    """Serve FastAPI's generated document after `complete` filled in what routes cannot say
    (limits enforced in code, links, stream semantics); built once, then cached."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            complete(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
