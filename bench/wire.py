"""Minimal HTTP/1.1 and SSE clients on asyncio streams: the load generator's wire.

Why not httpx: the generator shares 2 cores with the whole stack it measures, and with thousands of
virtual users its per-request CPU decides whether the numbers describe the stack or the client. A
keep-alive connection per virtual user (as each phone holds its own) with hand-written framing
costs a fraction of a general-purpose client. Only what the scan API and gateway speak is handled:
Content-Length or chunked bodies, keep-alive, `Connection: close`.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from contract.pipeline import is_terminal
from gateway.client import SseDecoder


class StaleConnection(ConnectionError):
    """The server had closed a kept-alive connection before we reused it (safe to retry once)."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def _request_bytes(
    method: str, host: str, port: int, path: str, headers: dict[str, str] | None, body: bytes | None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise StaleConnection("connection closed before the response")
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ConnectionError(f"bad status line {line!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise ConnectionError("connection closed inside the response head")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The body of a chunked response, chunk by chunk (trailers skipped)."""
    while True:
        size_line = await reader.readline()
        if not size_line:
            raise ConnectionError("connection closed inside a chunked body")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)  # CRLF after the chunk
        yield data


class Connection:
    """One keep-alive HTTP/1.1 connection; reconnects transparently when the server closed it."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connects = 0

    async def _connect(self) -> None:
        self.close()
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self.connects += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        data = _request_bytes(method, self.host, self.port, path, headers, body)
        for attempt in (0, 1):
            reused = self._writer is not None and self._reader is not None and not self._reader.at_eof()
            try:
                async with asyncio.timeout(self.timeout_s):
                    if not reused:
                        await self._connect()
                    assert self._reader is not None and self._writer is not None
                    self._writer.write(data)
                    await self._writer.drain()
                    return await self._read_response(self._reader)
            except StaleConnection:
                self.close()
                if attempt == 0 and reused:
                    continue  # the server closed an idle connection; nothing was processed
                raise
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                self.close()
                raise
        raise AssertionError("unreachable")

    async def _read_response(self, reader: asyncio.StreamReader) -> Response:
        status, headers = await _read_head(reader)
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b"".join([c async for c in _chunks(reader)])
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:
            body = await reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, headers, body)


# --- SSE ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Follow:
    """What one client saw of one job's stream, reconnects included."""

    seqs: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    received: list[float] = field(default_factory=list)  # wall-clock receipt time per event
    reconnects: int = 0
    terminal: dict[str, Any] | None = None
    error: str | None = None
    opened_at: float | None = None  # when the first stream's response head arrived
    refusals: list[tuple[int, bool]] = field(default_factory=list)  # (HTTP status, had Retry-After)


OnEvent = Callable[[dict[str, Any], float], None]


async def _sse_fields(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[str]:
    """The `data` of each SSE event in the body (comments, keepalives and other fields skipped)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body: AsyncIterator[bytes] = _chunks(reader)
    else:
        body = _until_eof(reader)
    pending = b""
    decoder = SseDecoder()
    async for chunk in body:
        pending += chunk
        while True:
            nl = pending.find(b"\n")
            if nl < 0:
                break
            line = pending[:nl].rstrip(b"\r").decode()
            pending = pending[nl + 1 :]
            data = decoder.feed(line)
            if data is not None:
                yield data


async def _until_eof(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        data = await reader.read(65536)
        if not data:
            return
        yield data


async def follow(
    host: str,
    port: int,
    job_id: str,
    user_id: str,
    *,
    timeout_s: float,
    on_event: OnEvent | None = None,
    max_reconnects: int = 20,
    path_prefix: str = "/api/v1/scan",
    drop_after: int | None = None,
    stop_after: int | None = None,
) -> Follow:
    """Follow a job's SSE stream to its terminal event, resuming with Last-Event-ID after drops.

    Every event received is recorded as received (no de-duplication here: the caller checks the
    seq list, so a gateway that repeats or skips events shows up). A client misbehaving as phones
    do: `drop_after` N events the first connection is closed and resumed (a lost network);
    `stop_after` N events the client walks away for good (error "abandoned")."""
    out = Follow()
    last = 0
    dropped = False
    path = f"{path_prefix}/{job_id}/events"
    deadline = time.monotonic() + timeout_s
    while True:
        headers = {"X-User-ID": user_id, "Accept": "text/event-stream"}
        if last:
            headers["Last-Event-ID"] = str(last)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(_request_bytes("GET", host, port, path, headers, None))
                await writer.drain()
                status, rhead = await _read_head(reader)
                if out.opened_at is None:
                    out.opened_at = time.time()
                if status == 204:
                    return out  # finished and everything after `last` delivered
                if status != 200:
                    out.refusals.append((status, "retry-after" in rhead))
                    body = await reader.read(2048)
                    out.error = f"HTTP {status}: {body[-200:].decode(errors='replace')}"
                    if status == 503:  # gateway full: retry like EventSource would
                        raise ConnectionError(out.error)
                    return out
                if stop_after == 0:
                    out.error = "abandoned"
                    return out
                async for data in _sse_fields(reader, rhead):
                    now = time.time()
                    ev = json.loads(data)
                    seq = int(ev["seq"])
                    out.seqs.append(seq)
                    out.events.append(ev)
                    out.received.append(now)
                    last = max(last, seq)
                    if on_event is not None:
                        on_event(ev, now)
                    if is_terminal(ev.get("stage"), ev.get("status")):
                        out.terminal = ev
                        out.error = None
                        return out
                    if stop_after is not None and len(out.seqs) >= stop_after:
                        out.error = "abandoned"
                        return out
                    if drop_after is not None and not dropped and len(out.seqs) >= drop_after:
                        dropped = True
                        break
                out.error = "dropped by the client" if dropped else "stream ended before the terminal event"
        except TimeoutError:
            out.error = f"no terminal event after {timeout_s:.0f}s"
            return out
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        finally:
            if writer is not None:
                writer.close()
        out.reconnects += 1
        if out.reconnects > max_reconnects or time.monotonic() >= deadline:
            return out
        await asyncio.sleep(min(0.25 * out.reconnects, 2.0))


async def follow_centrifugo(
    host: str,
    port: int,
    token: str,
    *,
    timeout_s: float,
    on_event: OnEvent | None = None,
    on_connect: Callable[[], None] | None = None,
) -> Follow:
    """One client of Centrifugo's unidirectional SSE (`/connection/uni_sse`): the connect command
    (a JWT whose `channels` claim subscribes it to its job's channel on the server side) goes in
    the `cf_connect` URL parameter; the stream then carries a `connect` reply, `{}` pings and
    `{"channel": ..., "pub": {"data": <event>}}` pushes. Used by the fan-out benchmark's peer run
    (bench/peer.py) to compare the gateway with Centrifugo on the same clients and events. Its
    uni_sse has no Last-Event-ID, so a dropped stream is not resumed: it ends this follow."""
    out = Follow()
    path = "/connection/uni_sse?cf_connect=" + urllib.parse.quote(json.dumps({"token": token}))
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(_request_bytes("GET", host, port, path, {"Accept": "text/event-stream"}, None))
            await writer.drain()
            status, rhead = await _read_head(reader)
            out.opened_at = time.time()
            if status != 200:
                body = await reader.read(2048)
                out.error = f"HTTP {status}: {body[-200:].decode(errors='replace')}"
                return out
            async for data in _sse_fields(reader, rhead):
                now = time.time()
                push = json.loads(data)
                if "connect" in push:
                    if on_connect is not None:
                        on_connect()
                    continue
                pub = push.get("pub")
                if pub is None:
                    continue  # ping, join/leave, ...
                ev = pub["data"]
                out.seqs.append(int(ev["seq"]))
                out.events.append(ev)
                out.received.append(now)
                if on_event is not None:
                    on_event(ev, now)
                if is_terminal(ev.get("stage"), ev.get("status")):
                    out.terminal = ev
                    return out
            out.error = "stream ended before the terminal event"
    except TimeoutError:
        out.error = f"no terminal event after {timeout_s:.0f}s"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
    return out
