"""The scan API's body limit (producers/body_limit.py), a plain ASGI middleware since issue 19."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from producers.body_limit import BodyLimit

LIMIT = 100


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"size": len(body), "body": body.decode()})


def client() -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/", echo, methods=["GET", "POST"])])
    app.add_middleware(
        BodyLimit, max_bytes=LIMIT, too_large=lambda: JSONResponse({"error": "body_too_large"}, 413)
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")


async def chunks(data: bytes, size: int = 30) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_content_length_over_the_limit_is_refused() -> None:
    async with client() as c:
        r = await c.post("/", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413 and r.json() == {"error": "body_too_large"}


async def test_a_body_within_the_limit_reaches_the_app() -> None:
    async with client() as c:
        r = await c.post("/", content=b"y" * LIMIT)
    assert r.status_code == 200 and r.json()["size"] == LIMIT


async def test_chunked_body_over_the_limit_is_refused() -> None:
    async with client() as c:
        r = await c.post("/", content=chunks(b"z" * (LIMIT + 1)))
    assert r.status_code == 413


async def test_chunked_body_within_the_limit_is_replayed_whole() -> None:
    data = bytes(range(48, 48 + 70)) + b"!" * 20
    async with client() as c:
        r = await c.post("/", content=chunks(data))
    assert r.status_code == 200 and r.json() == {"size": len(data), "body": data.decode()}


async def test_get_passes() -> None:
    async with client() as c:
        r = await c.get("/")
    assert r.status_code == 200 and r.json()["size"] == 0
