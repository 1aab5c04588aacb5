"""sse-starlette's `EventSourceResponse`, driven lean: one task per stream instead of four.

Upstream runs every stream in an anyio task group of three to four tasks (the stream, a ping
task, a server-exit watcher, a disconnect listener, each under `cancel_on_finish`) and wraps
every send in its own anyio cancel scope (`move_on_after(send_timeout)`). In the gateway's churn
profile (issue 23) that machinery, with anyio's `current_task` lookups, was the largest share of
the cost of a stream. `LeanEventSourceResponse` keeps what the gateway uses of it, the same way:

- the response start, the body chunks (`sse_starlette.event.ensure_bytes`, so the wire format is
  sse-starlette's) and the final empty chunk; the background task after the stream;
- the disconnect listener: the one extra task, it ends the stream as soon as the client is gone
  (started once the stream may wait: after its first chunk when that is ready at once,
  `first_ready`, and not at all when that chunk ends the stream);
- the per-send timeout (`send_timeout`): a client that stops reading ends its stream (within
  `SWEEP_S` after the timeout: one watcher per process looks at the streams that are in a send,
  instead of a timer set and cancelled around every send);
- the end of every stream when the server exits (sse-starlette's `AppStatus.should_exit`, which
  sse-starlette sets from uvicorn's exit handler), by the same one watcher.

All of these end the stream through one `asyncio.timeout` per stream, which the disconnect
listener and the watcher reschedule to now. No ping task (the gateway's stream writes its own
keepalive comment, `gateway/stream.py`). A body item may be a list of events: they go out as one
body chunk (one write for everything that was ready at once); or bytes, frames already encoded
(the gateway encodes each event once for all the streams that follow it); or a `LastChunk`, the
stream's last bytes, sent together with the end of the body (one write, not two). Between its
items the body's owner may also write chunks straight to the socket (`on_writer`,
`gateway/direct_write.py`): the gateway's stream does so for an event that arrives while it is
idle, so such an event costs no task wake-up and no trip through ASGI `send`.

Anything this does not cover (a ping interval, a `data_sender_callable`, HEAD, a websocket scope)
falls back to upstream's `__call__`. What it reads of upstream's internals is checked by
`tests/test_gateway_sse.py`, which fails when an sse-starlette upgrade moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal

from sse_starlette import EventSourceResponse
from sse_starlette.event import ensure_bytes
from sse_starlette.sse import AppStatus, SendTimeoutError
from starlette.types import Receive, Scope, Send

from .direct_write import BodyWriter, body_writer

log = logging.getLogger("eco2.gateway.sse")

SWEEP_S = 0.5  # how often the one watcher looks at sends and the server's exit (as upstream polls)
SHUTDOWN_SEND_S = 1.0  # the final chunk of a stream ended by the server's exit

Ending = Literal["disconnect", "send-timeout", "shutdown"]
WriterHook = Callable[[BodyWriter | None], None]


class LastChunk(bytes):
    """A body item that ends the stream: sent with the end of the body, in one write instead of
    two. It must be the iterator's last item (anything after it is dropped); the iterator is
    still run to its end, so its generators finish there and then: one left suspended would be
    closed later by the loop's async-generator finalizer, a task and a loop wake-up each."""


class LeanEventSourceResponse(EventSourceResponse):
    """`EventSourceResponse` in one task per stream (module docstring). Construct it as upstream's,
    with `ping=0`."""

    _ending: Ending | None = None
    _deadline: asyncio.Timeout | None = None
    _sending_since: float | None = None  # loop time the current body send began

    _upstream: dict[str, Any] | None = None  # the arguments of a lean init (see `__init__`)

    def __init__(
        self,
        content: Any,
        *,
        on_writer: WriterHook | None = None,
        first_ready: bool = False,
        **kwargs: Any,
    ) -> None:
        """`on_writer`: called, once the response has started, with a function that writes a body
        chunk straight to the socket (`gateway/direct_write.py`; None where there is none), and
        with None when the response stops streaming. The body iterator's owner may use it
        between its items, never while the response is sending (it is then suspended in the
        iterator, not in a send).

        `first_ready`: the body's owner vouches that its first item is ready at once (the
        iterator yields it without waiting for anything): the disconnect listener is then started
        after that item is sent, and not at all when it ended the stream (a stream that delivers
        a finished job's history in one `LastChunk`: no task, no cancellation). Until the first
        send nothing waits, so nothing needs to notice a disconnect.

        With `ping=0` and at most `send_timeout` and `background` besides (what the gateway
        passes), the response is set up lean: the attributes upstream's `__init__` gives these
        arguments, its headers built by upstream once per process (`_sse_headers`) instead of a
        `MutableHeaders` per stream, and no anyio lock (only upstream's `__call__` uses it): that
        init was 10% of a stream's CPU in the issue 23 profile. Upstream's own init runs, with the
        same arguments, before anything falls back to upstream's `__call__` (HEAD)."""
        self.on_writer = on_writer
        self.first_ready = first_ready
        if kwargs.get("ping") == 0 and kwargs.keys() <= _LEAN_ARGS and hasattr(content, "__anext__"):
            self._upstream = kwargs
            self.body_iterator = content
            self.status_code = 200
            self.background = kwargs.get("background")
            self.send_timeout = kwargs.get("send_timeout")
            self.sep = self.DEFAULT_SEPARATOR
            self.media_type = "text/event-stream"
            self.raw_headers = list(_sse_headers())  # its own list: a middleware may add to it
            self.data_sender_callable = None
            self.client_close_handler_callable = None
            self._ping_interval = 0
            self.ping_message_factory = None
            self._shutdown_event = None
            self._shutdown_grace_period = 0
            self._cleanup_timeout = self.DEFAULT_CLEANUP_TIMEOUT
            self.active = True
        else:
            super().__init__(content, **kwargs)

    def _end(self, why: Ending) -> None:
        """End the stream now (from the disconnect listener or the exit watcher)."""
        if self._deadline is not None and self._ending is None:
            self._ending = why
            if self.on_writer is not None:
                self.on_writer(None)  # an ending stream writes nothing more directly
            self._deadline.reschedule(-1)  # in the past: the stream's task is cancelled at once

    def _chunk(self, data: Any) -> bytes:
        if type(data) is bytes:
            return data  # frames already encoded (`Item.frame`)
        if isinstance(data, list):
            return b"".join(ensure_bytes(ev, self.sep) for ev in data)
        return ensure_bytes(data, self.sep)

    async def _listen(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.active = False
                if self.client_close_handler_callable is not None:
                    await self.client_close_handler_callable(message)
                self._end("disconnect")
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"].upper() == "HEAD"
            or self.ping_interval > 0
            or self.data_sender_callable is not None
        ):
            if self._upstream is not None:  # set up lean: now as upstream sets itself up
                EventSourceResponse.__init__(self, self.body_iterator, **self._upstream)
                self._upstream = None
            await super().__call__(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        body = self.body_iterator
        deadline = asyncio.timeout(None)
        completed = False
        try:
            async with deadline:
                self._deadline = deadline
                _open(self)
                listener = None if self.first_ready else loop.create_task(self._listen(receive))
                try:
                    start = {"type": "http.response.start", "status": self.status_code}
                    await send({**start, "headers": self.raw_headers})
                    if self.on_writer is not None:
                        self.on_writer(body_writer(send))  # taken back in `_end` or below
                    async for data in body:
                        if completed:
                            continue  # after a LastChunk: let the iterator finish (see LastChunk)
                        last = isinstance(data, LastChunk)
                        chunk = data if isinstance(data, LastChunk) else self._chunk(data)
                        message = {"type": "http.response.body", "body": chunk, "more_body": not last}
                        self._sending_since = loop.time()  # the sweeper ends a send stuck for too long
                        _SENDING.add(self)
                        await send(message)
                        _SENDING.discard(self)
                        self._sending_since = None
                        completed = last
                        if listener is None and not completed:  # `first_ready`: it may wait now
                            listener = loop.create_task(self._listen(receive))
                    self.active = False
                    if not completed:
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                        completed = True
                finally:
                    if self.on_writer is not None:
                        self.on_writer(None)
                    if listener is not None:
                        listener.cancel()  # never runs again: it cannot reschedule a closed deadline
                    self._deadline = None
                    _OPEN.discard(self)
                    _SENDING.discard(self)
        except TimeoutError:
            if not deadline.expired():
                raise  # the stream's own TimeoutError, not this response's deadline
            if self._ending is None:
                self._ending = "send-timeout"
        finally:
            self.active = False
            aclose = getattr(body, "aclose", None)
            if aclose is not None:  # ended while suspended at a yield (a send): run its cleanup
                with contextlib.suppress(Exception):
                    await aclose()
        if self._ending == "send-timeout":
            raise SendTimeoutError()
        if self._ending == "shutdown" and not completed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(SHUTDOWN_SEND_S):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:
            await self.background()


_LEAN_ARGS = frozenset({"ping", "send_timeout", "background"})


class _NoBody:
    def __aiter__(self) -> _NoBody:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


@functools.cache
def _sse_headers() -> tuple[tuple[bytes, bytes], ...]:
    """The headers upstream's `__init__` gives a response without headers of its own (content
    type, `Cache-Control: no-store`, `Connection: keep-alive`, `X-Accel-Buffering: no`), built by
    upstream itself once per process."""
    return tuple(EventSourceResponse(_NoBody(), ping=0).raw_headers)


# --- the server's exit ends every open stream (one watcher per process) ---

_OPEN: set[LeanEventSourceResponse] = set()
# Those in a body send: the sweep looks at these only, not at every open stream (10,000 of them
# every SWEEP_S were 3% of a gateway's samples, issue 23).
_SENDING: set[LeanEventSourceResponse] = set()
_watcher: asyncio.Task[None] | None = None


def _open(response: LeanEventSourceResponse) -> None:
    global _watcher
    _OPEN.add(response)
    loop = asyncio.get_running_loop()
    if _watcher is None or _watcher.done() or _watcher.get_loop() is not loop:
        if AppStatus.should_exit:
            response._end("shutdown")
            return
        _watcher = loop.create_task(_watch_exit(), name="sse-exit-watch")


async def _watch_exit() -> None:
    """Every SWEEP_S: a send stuck longer than its response's `send_timeout` ends that stream;
    the server's exit (polled as upstream's own watcher does: AppStatus.should_exit is a flag,
    not an event) ends them all."""
    loop = asyncio.get_running_loop()
    while not AppStatus.should_exit:
        await asyncio.sleep(SWEEP_S)
        now = loop.time()
        for response in list(_SENDING):
            since, limit = response._sending_since, response.send_timeout
            if since is not None and limit is not None and now - since > limit:
                response._end("send-timeout")
    log.info("server exiting: ending %d open streams", len(_OPEN))
    for response in list(_OPEN):
        response._end("shutdown")
