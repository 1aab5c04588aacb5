"""Async SSE client of the gateway: follows a job to its terminal event across disconnects.

Used by `eco2 scan --follow`, the tests and the load benchmarks: it reconnects with
`Last-Event-ID` after any disconnect, so the caller gets every event once, in order. For many
concurrent streams pass one shared `httpx.AsyncClient` (see `make_client`).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TextIO
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from contract import stream_token
from contract.events import ScanEvent, ScanResult

OnEvent = Callable[[ScanEvent], Awaitable[Any] | Any]


class StreamError(RuntimeError):
    """The gateway refused the stream (401/404) or it could not be resumed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def make_client(max_connections: int | None = None, read_timeout_s: float = 60.0) -> httpx.AsyncClient:
    """An httpx client for following streams; the read timeout must exceed the keepalive interval."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(10.0, read=read_timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


def token_of(stream_url: str) -> str | None:
    """The stream token in a POST's `stream_url` (None when it has none)."""
    values = parse_qs(urlsplit(stream_url).query).get(stream_token.QUERY_PARAM)
    return values[0] if values else None


async def follow(
    base_url: str,
    job_id: str,
    user_id: str | None,
    last_event_id: int | str | None = None,
    on_event: OnEvent | None = None,
    *,
    token: str | None = None,
    client: httpx.AsyncClient | None = None,
    max_retries: int = 20,
    retry_s: float = 0.25,
    max_retry_s: float = 5.0,
    on_wait: Callable[[int, float, str], None] | None = None,
) -> list[ScanEvent]:
    """Every event of the job after `last_event_id`, up to its terminal event.

    Authenticates as `user_id` (the auth proxy's X-User-ID) or with the stream `token` of the
    POST's stream_url. Reconnects (with backoff, `max_retries` times in a row without progress) on
    network errors, a 503 from a full gateway, or a stream that ended early; a refusal that names
    its Retry-After (429: the user's stream quota; 503: a full gateway or a view being rebuilt) is
    waited out for that long instead, told first to `on_wait(status, seconds, body)`. Raises
    StreamError on 401/404.
    """
    own = client is None
    http = client or make_client()
    events: list[ScanEvent] = []
    last = int(last_event_id) if last_event_id not in (None, "") else 0
    url = f"{base_url.rstrip('/')}/api/v1/scan/{job_id}/events"
    if token:
        url += "?" + urlencode({stream_token.QUERY_PARAM: token})
    failures = 0
    try:
        while True:
            headers = {"Accept": "text/event-stream"}
            if user_id:
                headers["X-User-ID"] = user_id
            if last:
                headers["Last-Event-ID"] = str(last)
            progressed = False
            wait_s: float | None = None  # what the server asked for, else our backoff
            try:
                async with http.stream("GET", url, headers=headers) as resp:
                    if resp.status_code == 204:
                        return events  # finished, nothing after last
                    if resp.status_code in (401, 403, 404):
                        body = (await resp.aread()).decode(errors="replace")
                        raise StreamError(f"{resp.status_code} for job {job_id}: {body}", resp.status_code)
                    if resp.status_code in (429, 503) and "Retry-After" in resp.headers:
                        body = (await resp.aread()).decode(errors="replace")
                        wait_s = _seconds(resp.headers["Retry-After"], max_retry_s)
                        if on_wait is not None:
                            on_wait(resp.status_code, wait_s, body)
                    if resp.status_code == 200:
                        async for ev in _parse(resp):
                            if ev.seq <= last:
                                continue
                            events.append(ev)
                            last = ev.seq
                            progressed = True
                            if on_event is not None:
                                res = on_event(ev)
                                if inspect.isawaitable(res):
                                    await res
                            if ev.terminal:
                                return events
            except httpx.TransportError:
                pass  # disconnected: resume below with Last-Event-ID
            failures = 0 if progressed else failures + 1
            if failures > max_retries:
                raise StreamError(f"job {job_id}: gave up after {max_retries} reconnects at seq {last}")
            if wait_s is not None:
                await asyncio.sleep(wait_s)
            elif not progressed:
                await asyncio.sleep(min(retry_s * 2 ** (failures - 1), max_retry_s))
    finally:
        if own:
            await http.aclose()


def _seconds(retry_after: str, default: float) -> float:
    """Retry-After in delta-seconds (the only form the gateway sends); `default` if unreadable."""
    try:
        return max(float(retry_after), 0.0)
    except ValueError:
        return default


class SseDecoder:
    """Turns SSE lines into the `data` of each complete event (comments and other fields skipped).

    Shared by this client (httpx lines) and the load generator (its own raw socket reader)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """One line without its newline; returns the event's data when the line ends an event."""
        if not line:
            done = "\n".join(self._data) if self._data else None
            self._data = []
            return done
        name, _, value = line.partition(":")
        if name == "data":  # a comment line (":...") has an empty name
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


async def _parse(resp: httpx.Response) -> Any:
    """ScanEvents of an SSE response (comments and keepalives skipped)."""
    decoder = SseDecoder()
    async for line in resp.aiter_lines():
        data = decoder.feed(line)
        if data is not None:
            yield ScanEvent.model_validate_json(data)


# --- rendering for `eco2 scan --follow` -------------------------------------------------------

BAR_WIDTH = 24


def render_event(ev: ScanEvent) -> str:
    """One progress line: bar, percent, stage and status."""
    filled = round(BAR_WIDTH * ev.progress / 100)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    what = f"{ev.stage} {ev.status}" + (f": {ev.error}" if ev.error else "")
    return f"[{bar}] {ev.progress:3d}%  {what}"


def render_result(result: dict[str, Any] | None) -> str:
    """The outcome in a few lines: category, answer, steps, reward (or the error)."""
    if not result:
        return "(no result)"
    if result.get("status") == "failed":
        return f"failed at {result.get('failed_stage') or '?'}: {result.get('error') or 'unknown error'}"
    lines: list[str] = []
    try:  # the contract's result fields (each a stage's output), not names spelled again here
        res = ScanResult.model_validate(result)
    except ValueError:
        return "(unreadable result)"
    c = res.classification or {}
    levels = ("major_category", "middle_category", "minor_category")
    category = " / ".join(str(c[k]) for k in levels if c.get(k))
    if category:
        lines.append(f"category: {category}")
    a = res.answer or {}
    if a.get("user_answer"):
        lines.append(f"answer:   {a['user_answer']}")
    for i, step in enumerate(a.get("disposal_steps") or [], 1):
        lines.append(f"  {i}. {step}")
    for w in a.get("warnings") or []:
        lines.append(f"  ! {w}")
    r = res.reward or {}
    if r:
        got = f"granted {r.get('character_name') or r.get('character_code')}" if r.get("granted") else "none"
        lines.append(f"reward:   {got} ({r.get('reason', '')})")
    return "\n".join(lines) or "(empty result)"


class ProgressPrinter:
    """An `on_event` callback: a live progress line (rewritten in place on a terminal), then the result."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()

    def __call__(self, ev: ScanEvent) -> None:
        line = render_event(ev)
        if self.tty:
            self.out.write("\r\x1b[2K" + line + ("\n" if ev.terminal else ""))
        else:
            self.out.write(line + "\n")
        if ev.terminal:
            self.out.write(render_result(ev.result) + "\n")
        self.out.flush()
