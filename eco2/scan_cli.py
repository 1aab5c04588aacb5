"""`eco2 scan`: submit one scan and wait for it, printing the stages as they happen."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import httpx
import typer

from contract.events import ScanEvent
from contract.settings import Settings, get_settings
from gateway.client import ProgressPrinter, render_event, render_result, token_of
from gateway.client import follow as follow_stream
from producers.client import RateLimited, ScanError, submit_when_allowed, wait_result


def _poll_line(p: dict[str, Any], t0: float) -> str:
    """A progress line from a 202 poll, in the same form as the live (SSE) lines."""
    ev = ScanEvent(
        event_id="",
        job_id=p["job_id"],
        user_id="",
        stage=p["current_stage"],
        status="completed",
        seq=0,
        ts=0,
        progress=int(p["progress"]),
    )
    return f"{time.monotonic() - t0:6.1f}s " + render_event(ev)


def rate_limited_line(exc: RateLimited) -> str:
    """What a 429 tells the user: which limit, why, and how long we wait before posting again."""
    why = exc.message or "a per-user quota refused the scan"
    return f"rate limited ({exc.limit}): {why}; posting again in {exc.retry_after_s:g} s (Retry-After)"


def stream_wait_line(status: int, wait_s: float, body: str) -> str:
    """What a refused stream tells the user before we reconnect after its Retry-After."""
    try:
        detail = json.loads(body)
        why = detail.get("detail") or detail.get("message") or body
    except (ValueError, AttributeError):
        why = body
    kind = "rate limited" if status == 429 else "stream unavailable"
    return f"{kind} (HTTP {status}): {why}; reconnecting in {wait_s:g} s (Retry-After)"


async def run_scan(
    s: Settings,
    image_url: str,
    user: str,
    user_input: str | None,
    follow: bool,
    quiet: bool,
    max_wait_s: float = 120.0,
) -> dict[str, Any]:
    t0 = time.monotonic()
    echo = (lambda _m: None) if quiet else typer.echo

    def warn(line: str) -> None:
        typer.secho(line, fg=typer.colors.YELLOW, err=True)

    async with httpx.AsyncClient(base_url=s.api_url, timeout=30) as http:
        accepted = await submit_when_allowed(
            http,
            image_url,
            user,
            user_input=user_input,
            max_wait_s=max_wait_s,
            on_wait=lambda exc: warn(rate_limited_line(exc)),
        )
        job_id = accepted["job_id"]
        echo(f"job {job_id} queued ({(time.monotonic() - t0) * 1000:.0f} ms)")
        if follow:
            # As the app does: the stream URL's token, not the user id, authenticates the stream.
            await follow_stream(
                s.gateway_url,
                job_id,
                None,
                token=token_of(accepted["stream_url"]),
                on_event=None if quiet else ProgressPrinter(),
                on_wait=lambda status, wait_s, body: warn(stream_wait_line(status, wait_s, body)),
            )
        else:
            last: list[str] = [""]

            def progress(p: dict[str, Any]) -> None:
                if p["current_stage"] != last[0]:
                    last[0] = p["current_stage"]
                    echo(_poll_line(p, t0))

            await wait_result(
                http, job_id, user, interval_s=0.5, on_progress=progress, timeout_s=s.max_stream_s
            )
        result, _ = await wait_result(http, job_id, user, interval_s=0.2, timeout_s=30)
    return result


def scan(
    image_url: Annotated[str, typer.Argument(help="http(s) URL of the photo")],
    user: Annotated[str, typer.Option("--user", "-u", help="the X-User-ID to scan as")] = "demo-user",
    user_input: Annotated[
        str | None, typer.Option("--input", help="what the user says about the item")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="watch the stages live over SSE")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the final result as JSON")] = False,
    max_wait: Annotated[
        float, typer.Option("--max-wait", help="seconds to wait out 429s (Retry-After) before giving up")
    ] = 120.0,
) -> None:
    """Submit one scan and wait for its result (a 429 is waited out for its Retry-After)."""
    s = get_settings()
    try:
        result = asyncio.run(
            run_scan(s, image_url, user, user_input, follow, quiet=as_json, max_wait_s=max_wait)
        )
    except RateLimited as exc:
        typer.secho(
            f"scan refused, still rate limited after --max-wait {max_wait:g} s: {exc}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(4) from exc
    except ScanError as exc:
        typer.secho(f"scan refused: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from exc
    except TimeoutError as exc:
        typer.secho(f"gave up waiting: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    except (httpx.HTTPError, OSError) as exc:
        typer.secho(f"cannot reach the scan API at {s.api_url}: {exc} (is `eco2 stack up` done?)", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
    elif not follow:  # --follow already printed the result with the terminal event
        typer.echo("\n" + render_result(result))
    if result.get("status") != "completed":
        raise typer.Exit(3)


DEMO_IMAGE = "https://images.example.com/scans/clear_pet-water-bottle-label_attached.jpg"
