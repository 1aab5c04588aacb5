"""A small client of the scan API, used by `eco2 scan`, the tests and the load benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx


class ScanError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class RateLimited(ScanError):
    """A 429: one of the user's quotas refused the scan; nothing was queued, so posting again
    after `retry_after_s` is safe."""

    def __init__(self, status: int, body: Any, retry_after_s: float) -> None:
        super().__init__(status, body)
        self.retry_after_s = retry_after_s
        self.limit = body.get("limit", "?") if isinstance(body, dict) else "?"
        self.message = body.get("message", "") if isinstance(body, dict) else ""


def retry_after(resp: httpx.Response, default: float = 1.0) -> float:
    """Seconds from a response's Retry-After (delta-seconds form, the only one this API sends)."""
    try:
        return max(float(resp.headers.get("Retry-After", default)), 0.0)
    except ValueError:
        return default


async def submit(
    http: httpx.AsyncClient,
    image_url: str,
    user: str,
    *,
    user_input: str | None = None,
    model: str | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    headers = {"X-User-ID": user}
    if idempotency_key:
        headers["X-Idempotency-Key"] = idempotency_key
    body: dict[str, Any] = {"image_url": image_url}
    if user_input is not None:
        body["user_input"] = user_input
    if model is not None:
        body["model"] = model
    resp = await http.post("/api/v1/scan", json=body, headers=headers)
    if resp.status_code == 429:
        raise RateLimited(resp.status_code, resp.json() if resp.content else None, retry_after(resp))
    if resp.status_code != 202:
        raise ScanError(resp.status_code, resp.json() if resp.content else None)
    return resp.json()  # type: ignore[no-any-return]


async def submit_when_allowed(
    http: httpx.AsyncClient,
    image_url: str,
    user: str,
    *,
    max_wait_s: float = 120.0,
    on_wait: Callable[[RateLimited], None] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """`submit`, waiting out 429s for their Retry-After (told to `on_wait` first) for at most
    `max_wait_s` in all; then the last RateLimited is raised."""
    deadline = time.monotonic() + max_wait_s
    while True:
        try:
            return await submit(http, image_url, user, **kw)
        except RateLimited as exc:
            if time.monotonic() + exc.retry_after_s > deadline:
                raise
            if on_wait is not None:
                on_wait(exc)
            await asyncio.sleep(exc.retry_after_s)


async def wait_result(
    http: httpx.AsyncClient,
    job_id: str,
    user: str,
    *,
    timeout_s: float = 120.0,
    interval_s: float | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], int]:
    """Poll the result until it is final; returns (result, polls). Honours Retry-After unless
    `interval_s` is given; a 503 with Retry-After (the view rebuilding, an outage) is waited out."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    while True:
        resp = await http.get(f"/api/v1/scan/{job_id}/result", headers={"X-User-ID": user})
        polls += 1
        if resp.status_code == 200:
            return resp.json(), polls
        retry = resp.status_code == 503 and "Retry-After" in resp.headers  # rebuilding, or an outage
        if resp.status_code != 202 and not retry:
            raise ScanError(resp.status_code, resp.json() if resp.content else None)
        if on_progress and not retry:
            on_progress(resp.json())
        if time.monotonic() > deadline:
            raise TimeoutError(f"scan {job_id} not finished after {timeout_s:.0f}s")
        wait = interval_s if interval_s is not None else float(resp.headers.get("Retry-After", "2"))
        await asyncio.sleep(wait)
