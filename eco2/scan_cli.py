"""`eco2 scan`: submit one scan and wait for it, printing the stages as they happen."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

import httpx
import typer

from contract.events import PIPELINE, ScanEvent
from contract.settings import Settings, get_settings
from producers.client import ScanError, submit, wait_result

BAR = 30


def _bar(progress: int) -> str:
    filled = BAR * progress // 100
    return "[" + "#" * filled + "." * (BAR - filled) + f"] {progress:3d}%"


def render_event(ev: ScanEvent, t0: float) -> str:
    label = {"started": "...", "completed": "ok", "failed": "FAILED"}[ev.status]
    return f"{time.monotonic() - t0:6.1f}s  {_bar(ev.progress)}  {ev.stage:<7} {label}"


def render_result(result: dict[str, Any]) -> list[str]:
    lines = [""]
    if result.get("status") == "failed":
        return lines + [f"scan failed in stage {result.get('failed_stage')}: {result.get('error')}"]
    cls = result.get("classification") or {}
    lines.append(
        f"item:     {cls.get('minor_category')}  ({cls.get('major_category')} / {cls.get('middle_category')})"
    )
    if cls.get("situation_tags"):
        lines.append(f"noticed:  {', '.join(cls['situation_tags'])}")
    answer = result.get("answer") or {}
    lines.append(f"answer:   {answer.get('user_answer', '')}")
    for i, step in enumerate(answer.get("disposal_steps") or [], 1):
        lines.append(f"  {i}. {step}")
    for w in answer.get("warnings") or []:
        lines.append(f"  ! {w}")
    reward = result.get("reward") or {}
    if reward.get("granted"):
        lines.append(f"reward:   {reward.get('character_name')} ({reward.get('character_code')})")
    else:
        lines.append(f"reward:   none ({reward.get('reason')})")
    return lines


async def _follow_sse(s: Settings, job_id: str, user: str, echo: Any, t0: float) -> None:
    from gateway.client import follow

    def on_event(ev: ScanEvent) -> None:
        echo(render_event(ev, t0))

    await follow(s.gateway_url, job_id, user, on_event=on_event)


async def run_scan(
    s: Settings, image_url: str, user: str, user_input: str | None, follow: bool, echo: Any
) -> dict[str, Any]:
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=s.api_url, timeout=30) as http:
        accepted = await submit(http, image_url, user, user_input=user_input)
        job_id = accepted["job_id"]
        echo(f"job {job_id} queued ({(time.monotonic() - t0) * 1000:.0f} ms)")
        if follow:
            await _follow_sse(s, job_id, user, echo, t0)
        else:
            last: list[str] = [""]

            def progress(p: dict[str, Any]) -> None:
                if p["current_stage"] != last[0]:
                    last[0] = p["current_stage"]
                    echo(f"{time.monotonic() - t0:6.1f}s  {_bar(p['progress'])}  {p['current_stage']}")

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
) -> None:
    """Submit one scan and wait for its result."""
    s = get_settings()
    echo = (lambda _m: None) if as_json else typer.echo
    try:
        result = asyncio.run(run_scan(s, image_url, user, user_input, follow, echo))
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
    else:
        for line in render_result(result):
            typer.echo(line)
    if result.get("status") != "completed":
        raise typer.Exit(3)


DEMO_IMAGE = "https://images.example.com/scans/clear_pet-water-bottle-label_attached.jpg"
__all__ = ["scan", "DEMO_IMAGE", "PIPELINE"]
