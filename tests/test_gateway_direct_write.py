"""Issue 23: `gateway/direct_write.py` against a real uvicorn (httptools), on loopback.

The direct writer reaches into uvicorn's `RequestResponseCycle` (its transport, its chunked
framing, its disconnect / completion / flow-control state). These tests fail when a uvicorn
upgrade moves any of that: then the writer must follow, or return None so that every stream
takes ASGI's `send`. About a second in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.direct_write import body_writer

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(app: App, http: str = "httptools") -> AsyncIterator[str]:
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True  # not handle_exit: that would set sse-starlette's AppStatus
        await asyncio.wait_for(task, 5)


async def test_chunks_written_directly_interleave_with_asgi_sends_in_order() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert body_writer(send) is None  # nothing before the response's start
        await send(START)
        write = body_writer(send)
        assert write is not None
        seen["a"] = write(b"a")
        await send({"type": "http.response.body", "body": b"b", "more_body": True})
        seen["c"] = write(b"c" * 17)  # 0x11 bytes: the size line is hex
        seen["empty"] = write(b"")  # an empty chunk would end a chunked body: refused
        cycle = send.__self__
        cycle.flow.pause_writing()  # what the transport calls over its high-water mark
        seen["paused"] = write(b"x")
        cycle.flow.resume_writing()
        seen["resumed"] = write(b"d")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        seen["complete"] = write(b"y")

    async with serving(app) as url, httpx.AsyncClient() as client:
        r = await client.get(url)
    assert r.status_code == 200 and r.headers["transfer-encoding"] == "chunked"
    assert r.content == b"ab" + b"c" * 17 + b"d"
    assert seen == {"a": True, "c": True, "empty": False, "paused": False, "resumed": True, "complete": False}


async def test_a_gone_client_is_refused() -> None:
    result: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(START)
        write = body_writer(send)
        assert write is not None and write(b"first")
        while (await receive())["type"] != "http.disconnect":
            pass
        result.set_result(write(b"after"))

    async with serving(app) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"first" not in got:
            got += await asyncio.wait_for(reader.read(1024), 2)
        assert b"5\r\nfirst\r\n" in got  # uvicorn's chunked framing
        writer.close()
        assert await asyncio.wait_for(result, 2) is False


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_no_writer_where_it_cannot_write_as_send_would(http: str) -> None:
    writers: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if http == "httptools":  # a body with a length: not chunked
            await send({**START, "headers": [(b"content-length", b"2")]})
        else:
            await send(START)
        writers.append(body_writer(send))

        async def wrapped(message: Any) -> None:  # a middleware's send
            await send(message)

        writers.append(body_writer(wrapped))
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    async with serving(app, http) as url, httpx.AsyncClient() as client:
        assert (await client.get(url)).content == b"ok"
    assert writers == [None, None]


async def test_the_lean_response_hands_out_its_writer_and_takes_it_back_when_the_client_goes() -> None:
    """`LeanEventSourceResponse(on_writer=...)`: the writer once the response has started (its
    chunks reach the client in order with the response's own), None as soon as the stream ends."""
    from gateway.sse import LeanEventSourceResponse

    hooks: list[Any] = []
    ended = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        assert hooks[-1] is not None and hooks[-1](b"data: direct\r\n\r\n")
        yield b"data: sent\r\n\r\n"
        await asyncio.Event().wait()  # until the disconnect ends the stream

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await LeanEventSourceResponse(body(), ping=0, send_timeout=5.0, on_writer=hooks.append)(
            scope, receive, send
        )
        ended.set()

    async with serving(app) as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"sent" not in got:
            got += await asyncio.wait_for(reader.read(1024), 2)
        assert got.index(b"data: direct") < got.index(b"data: sent")
        writer.close()
        await asyncio.wait_for(ended.wait(), 2)
    assert hooks[0] is not None and len(hooks) >= 2 and all(h is None for h in hooks[1:])
