"""A stream's body chunk written straight to its socket, without a trip through ASGI `send`.

Most of a live event's cost in the gateway was not the write but getting to it: the hub sets the
stream's wake event, the loop runs the stream's task, which resumes five generators (the
response's body loop, `_guarded`, `batches`, `items`, the subscriber's wait with its timer) to
reach uvicorn's `send`, which frames the chunk and writes it (issue 23's profile, round 4). When a
stream is idle and the event is the next one in order, the hub's dispatch writes it right away
instead (`gateway/stream.py`, `JobStream._direct`): one `transport.write`, no task wake-up.

That means writing on uvicorn's connection beside its ASGI `send`, so this module is the one
place that reads uvicorn's internals: the `RequestResponseCycle` behind `send` (its bound
method's `__self__`; httptools only, as the gateway runs it), its `transport`, the chunked
framing it chose for a response without a length, and its state (`disconnected`,
`response_complete`, `flow.write_paused`). A write is refused (False; the caller then sends
through ASGI, which waits for the socket to drain) whenever `send` itself would not write at
once. `tests/test_gateway_direct_write.py` runs a real uvicorn and fails when an upgrade moves
any of this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

BodyWriter = Callable[[bytes], bool]


def body_writer(send: Any) -> BodyWriter | None:
    """For a response whose start has been sent through `send`: a function writing one more body
    chunk now (True), or refusing when it cannot (False: disconnected, complete, or the socket's
    buffer over its high-water mark). None when `send` is not uvicorn's httptools cycle (h11,
    a middleware's wrapper, a test's fake) or the body is not chunked."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle:
        return None
    if not cycle.response_started or cycle.response_complete or cycle.chunked_encoding is not True:
        return None
    transport = cycle.transport
    flow = cycle.flow

    def write(body: bytes) -> bool:
        if cycle.disconnected or cycle.response_complete or flow.write_paused or not body:
            return False
        transport.write(b"%x\r\n%b\r\n" % (len(body), body))  # as `send` frames a chunk
        return True

    return write
