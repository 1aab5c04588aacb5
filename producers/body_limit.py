"""The scan API's request body limit, as a plain ASGI middleware.

A `@app.middleware("http")` function runs on Starlette's BaseHTTPMiddleware, which hands every
request to the app through an anyio task group and memory streams: a few hundred microseconds
of the API's CPU per POST and a task switch more on its latency (issue 19's POST profile). This
one only looks at the headers, and reads a chunked body itself to measure it.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """413 (from `too_large`) for a body over `max_bytes`: by its Content-Length, or, when a POST
    has none (chunked), by reading it; the body read is then replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int, too_large: Callable[[], Response]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await self.too_large()(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # disconnected: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self.too_large()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)
