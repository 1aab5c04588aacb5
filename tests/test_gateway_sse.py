"""Issue 23: `gateway/sse.py`, sse-starlette's EventSourceResponse in one task per stream.

What the lean response does (batches in one chunk, the end of a stream on a disconnect, on a
send that times out, on the server's exit, its one extra task) and what it reads of
sse-starlette's internals: a failure in the last test means an sse-starlette upgrade moved them
and `LeanEventSourceResponse` must follow. Unit tests, under a second in all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest
import sse_starlette
import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.event import ensure_bytes
from sse_starlette.sse import AppStatus, SendTimeoutError
from starlette.background import BackgroundTask

from gateway import sse
from gateway.sse import LeanEventSourceResponse

SCOPE: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": []}


class Client:
    """An ASGI server's side: records what is sent; disconnects when told to."""

    def __init__(self, block_body: bool = False) -> None:
        self.sent: list[MutableMapping[str, Any]] = []
        self.gone = asyncio.Event()
        self.block_body = block_body
        self._requested = False

    async def receive(self) -> MutableMapping[str, Any]:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if self.block_body and message["type"] == "http.response.body":
            await asyncio.Event().wait()  # a client that stopped reading
        self.sent.append(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def ev(i: int) -> ServerSentEvent:
    return ServerSentEvent(data=f'{{"seq":{i}}}', event="vision", id=str(i))


class Probe:
    """A body iterator that records how it ended, waiting forever after its batches."""

    def __init__(self, batches: list[Any], then_wait: bool = True) -> None:
        self.batches = batches
        self.then_wait = then_wait
        self.closed = False
        self.finished = False  # ran to its end (not closed while suspended at a yield)
        self.tasks_while_streaming = 0

    async def run(self) -> AsyncIterator[Any]:
        try:
            for b in self.batches:
                yield b
            self.tasks_while_streaming = sum(
                1 for t in asyncio.all_tasks() if t.get_name() != "sse-exit-watch"
            )
            if self.then_wait:
                await asyncio.Event().wait()
            self.finished = True
        finally:
            self.closed = True


def response(probe: Probe, released: list[int], **kw: Any) -> LeanEventSourceResponse:
    async def release() -> None:
        released.append(1)

    return LeanEventSourceResponse(
        probe.run(),
        ping=0,
        send_timeout=kw.pop("send_timeout", 5.0),
        background=BackgroundTask(release),
        **kw,
    )


async def test_batches_go_out_as_one_chunk_each_then_the_end() -> None:
    released: list[int] = []
    probe = Probe([[ev(1), ev(10), ev(11)], [ev(20)]], then_wait=False)
    client = Client()
    await response(probe, released)(SCOPE, client.receive, client.send)
    assert client.sent[0]["type"] == "http.response.start" and client.sent[0]["status"] == 200
    assert client.bodies == [
        b"".join(ensure_bytes(e, "\r\n") for e in (ev(1), ev(10), ev(11))),
        ensure_bytes(ev(20), "\r\n"),
        b"",
    ]
    assert client.sent[-1]["more_body"] is False
    assert probe.closed and released == [1]


async def test_a_last_chunk_goes_out_with_the_end_of_the_body_in_one_message() -> None:
    """Encoded frames (bytes) go out as they are; a `LastChunk` ends the body in the same message;
    the body iterator still runs to its end (not left to the async-generator finalizer), and
    nothing it yields after the last chunk is sent."""
    released: list[int] = []
    first = ensure_bytes(ev(1), "\r\n")
    probe = Probe([first, sse.LastChunk(ensure_bytes(ev(51), "\r\n")), b"never sent"], then_wait=False)
    client = Client()
    await asyncio.wait_for(response(probe, released)(SCOPE, client.receive, client.send), 1.0)
    assert client.bodies == [first, ensure_bytes(ev(51), "\r\n")]
    assert [m["more_body"] for m in client.sent[1:]] == [True, False]
    assert probe.closed and probe.finished and released == [1]


async def test_one_extra_task_per_stream_and_a_disconnect_ends_it_at_once() -> None:
    released: list[int] = []
    probe = Probe([[ev(1)]])
    client = Client()
    before = sum(1 for t in asyncio.all_tasks() if t.get_name() != "sse-exit-watch")
    task = asyncio.create_task(response(probe, released)(SCOPE, client.receive, client.send))
    for _ in range(100):
        if probe.tasks_while_streaming:
            break
        await asyncio.sleep(0.001)
    assert probe.tasks_while_streaming == before + 2  # the response's task + its disconnect listener
    client.gone.set()
    await asyncio.wait_for(task, 1.0)  # returns normally: a disconnect is no error
    assert probe.closed and released == [1]
    assert client.bodies == [ensure_bytes(ev(1), "\r\n")]  # nothing more written to a gone client
    assert sum(1 for t in asyncio.all_tasks() if t.get_name() != "sse-exit-watch") == before


async def test_a_client_that_stops_reading_ends_its_stream_after_send_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "SWEEP_S", 0.01)
    probe = Probe([[ev(1)]])
    client = Client(block_body=True)
    with pytest.raises(SendTimeoutError):
        await asyncio.wait_for(response(probe, [], send_timeout=0.05)(SCOPE, client.receive, client.send), 2)
    assert probe.closed  # suspended at its yield during the send: closed all the same


async def test_the_servers_exit_ends_every_stream_with_a_complete_response(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "SWEEP_S", 0.01)
    probe = Probe([[ev(1)]])
    client = Client()
    task = asyncio.create_task(response(probe, [])(SCOPE, client.receive, client.send))
    await asyncio.sleep(0.05)
    monkeypatch.setattr(AppStatus, "should_exit", True)
    await asyncio.wait_for(task, 1.0)
    assert probe.closed
    assert client.bodies[-1] == b"" and client.sent[-1]["more_body"] is False


async def test_a_timeout_of_the_stream_itself_is_not_swallowed() -> None:
    async def failing() -> AsyncIterator[Any]:
        yield [ev(1)]
        raise TimeoutError("the stream's own")

    client = Client()
    resp = LeanEventSourceResponse(failing(), ping=0, send_timeout=5.0)
    with pytest.raises(TimeoutError, match="the stream's own"):
        await resp(SCOPE, client.receive, client.send)


async def test_head_and_a_ping_interval_are_upstreams() -> None:
    probe = Probe([[ev(1)]])
    client = Client()
    await response(probe, [])({**SCOPE, "method": "HEAD"}, client.receive, client.send)
    assert client.bodies == [b""] and probe.tasks_while_streaming == 0  # the iterator never ran


def test_the_upstream_internals_it_relies_on_are_there() -> None:
    """Fails when an sse-starlette upgrade moves what `LeanEventSourceResponse` reads."""
    resp = LeanEventSourceResponse(Probe([]).run(), ping=0, send_timeout=3.0, sep="\n")
    assert isinstance(resp, EventSourceResponse)
    assert resp.ping_interval == 0 and resp.send_timeout == 3.0 and resp.sep == "\n"
    assert resp.data_sender_callable is None and resp.client_close_handler_callable is None
    assert resp.background is None and resp.active is True and resp.status_code == 200
    assert hasattr(resp.body_iterator, "__anext__")
    headers = dict(resp.raw_headers)
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"x-accel-buffering"] == b"no" and headers[b"cache-control"] == b"no-store"
    # The server's exit reaches AppStatus.should_exit through sse-starlette's patch of uvicorn.
    assert uvicorn.Server.handle_exit is AppStatus.handle_exit
    assert AppStatus.should_exit is False
    # The wire format is sse-starlette's encoding of each event.
    assert ensure_bytes(ev(7), "\r\n") == ev(7).encode()
    assert sse_starlette.__name__ == "sse_starlette"


async def test_an_ending_stream_takes_its_direct_writer_back_at_once() -> None:
    """`on_writer(None)` within `_end`, before the stream's task runs again: nothing is written
    directly between the end (a disconnect, a send timeout, the server's exit) and the task's
    cancellation."""
    hooks: list[Any] = []
    probe = Probe([[ev(1)]])
    client = Client()
    resp = response(probe, [], on_writer=hooks.append)
    task = asyncio.create_task(resp(SCOPE, client.receive, client.send))
    await asyncio.sleep(0.02)
    assert hooks == [None]  # a fake server's send: no direct writer, the ASGI path only
    resp._end("shutdown")
    assert hooks == [None, None]
    await asyncio.wait_for(task, 1)
    assert probe.closed and hooks[-1] is None


@pytest.mark.parametrize("kw", [{}, {"send_timeout": 3.0}, {"send_timeout": None, "background": "bg"}])
async def test_a_lean_init_sets_what_upstreams_init_sets(kw: dict[str, Any]) -> None:
    """Fails when an sse-starlette upgrade changes what its `__init__` gives these arguments
    (an attribute, a value, a header): the lean init must follow. Only the anyio lock of
    upstream's own `__call__` is left out."""
    if kw.get("background"):
        kw = {**kw, "background": BackgroundTask(asyncio.sleep, 0)}
    body = Probe([]).run()
    lean = LeanEventSourceResponse(body, ping=0, **kw)
    upstream = EventSourceResponse(body, ping=0, **kw)
    assert lean._upstream is not None  # the lean init ran
    mine = {k: v for k, v in vars(lean).items() if k not in ("on_writer", "first_ready", "_upstream")}
    theirs = {k: v for k, v in vars(upstream).items() if k != "_send_lock"}
    assert mine == theirs
    assert lean.raw_headers is not sse._sse_headers()  # each response its own list


async def test_anything_else_is_set_up_by_upstream_and_head_after_a_lean_init_too() -> None:
    full = LeanEventSourceResponse(Probe([]).run(), ping=0, sep="\n")
    assert full._upstream is None and hasattr(full, "_send_lock") and full.sep == "\n"
    lean = response(Probe([[ev(1)]]), [])
    assert lean._upstream is not None and not hasattr(lean, "_send_lock")
    client = Client()
    await lean({**SCOPE, "method": "HEAD"}, client.receive, client.send)
    assert hasattr(lean, "_send_lock") and client.bodies == [b""]


async def test_first_ready_a_stream_ended_by_its_first_chunk_starts_no_listener() -> None:
    released: list[int] = []
    tasks: list[int] = []

    async def body() -> AsyncIterator[Any]:
        yield sse.LastChunk(b"all of it")
        tasks.append(sum(1 for t in asyncio.all_tasks() if t.get_name() != "sse-exit-watch"))

    async def release() -> None:
        released.append(1)

    client = Client()
    before = sum(1 for t in asyncio.all_tasks() if t.get_name() != "sse-exit-watch")
    resp = LeanEventSourceResponse(body(), ping=0, background=BackgroundTask(release), first_ready=True)
    await asyncio.create_task(resp(SCOPE, client.receive, client.send))
    assert tasks == [before + 1]  # the response's task alone: no disconnect listener
    assert client.bodies == [b"all of it"] and client.sent[-1]["more_body"] is False
    assert released == [1]


async def test_first_ready_the_listener_starts_after_the_first_chunk_and_a_disconnect_ends_it() -> None:
    released: list[int] = []
    probe = Probe([[ev(1)]])
    client = Client()
    before = sum(1 for t in asyncio.all_tasks() if t.get_name() != "sse-exit-watch")
    resp = response(probe, released, first_ready=True)
    task = asyncio.create_task(resp(SCOPE, client.receive, client.send))
    for _ in range(100):
        if probe.tasks_while_streaming:
            break
        await asyncio.sleep(0.001)
    assert probe.tasks_while_streaming == before + 2  # waiting now: the listener is there
    client.gone.set()
    await asyncio.wait_for(task, 1.0)
    assert probe.closed and released == [1] and client.bodies == [ensure_bytes(ev(1), "\r\n")]
