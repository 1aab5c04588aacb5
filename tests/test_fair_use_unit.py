"""The clients' side of a 429 (unit, fake transports): `eco2 scan` and the SSE client wait out a
refusal for its Retry-After, say so, and give up only after their bound."""

from __future__ import annotations

import json

import httpx
import pytest

from contract.events import ScanJob, make_event, now
from eco2.scan_cli import rate_limited_line, stream_wait_line
from gateway.client import follow
from producers.client import RateLimited, submit_when_allowed

REFUSAL = {
    "error": "rate_limited",
    "message": "too many scans: at most 5 at once and 6 a minute per user; retry after Retry-After seconds",
    "limit": "scans",
    "retry_after_s": 1,
}
ACCEPTED = {"job_id": "j1", "stream_url": "/api/v1/scan/j1/events", "result_url": "/api/v1/scan/j1/result"}


async def test_submit_waits_out_a_429_then_posts_again() -> None:
    answers = [
        httpx.Response(429, json=REFUSAL, headers={"Retry-After": "0.05"}),
        httpx.Response(429, json=REFUSAL, headers={"Retry-After": "0.05"}),
        httpx.Response(202, json=ACCEPTED),
    ]
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        return answers[len(posts) - 1]

    waits: list[RateLimited] = []
    async with httpx.AsyncClient(base_url="http://api", transport=httpx.MockTransport(handler)) as http:
        got = await submit_when_allowed(http, "https://x.example.com/a.jpg", "alice", on_wait=waits.append)
    assert got == ACCEPTED and len(posts) == 3
    assert [(w.limit, w.retry_after_s) for w in waits] == [("scans", 0.05), ("scans", 0.05)]
    line = rate_limited_line(waits[0])
    assert line.startswith("rate limited (scans): too many scans") and "posting again in 0.05 s" in line


async def test_submit_gives_up_when_retry_after_passes_the_bound() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json=REFUSAL, headers={"Retry-After": "30"})

    async with httpx.AsyncClient(base_url="http://api", transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(RateLimited) as info:
            await submit_when_allowed(http, "https://x.example.com/a.jpg", "alice", max_wait_s=5)
    assert info.value.status == 429 and info.value.retry_after_s == 30


async def test_follow_waits_out_a_refused_stream_for_its_retry_after() -> None:
    job = ScanJob(job_id="j1", user_id="alice", image_url="https://x.example.com/a.jpg", created_at=now())
    done = make_event(job, "done", "completed")
    body = {"detail": "too many open streams: at most 5 per user across all gateways", "limit": "streams"}
    calls: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Last-Event-ID"))
        if len(calls) == 1:
            return httpx.Response(429, json=body, headers={"Retry-After": "0.05"})
        text = f"event: done\r\nid: {done.seq}\r\ndata: {done.model_dump_json()}\r\n\r\n"
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    waits: list[tuple[int, float, str]] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        events = await follow(
            "http://gw", "j1", "alice", client=client, on_wait=lambda *a: waits.append(a), retry_s=10
        )
    assert [e.seq for e in events] == [done.seq] and len(calls) == 2
    assert [(s, w) for s, w, _ in waits] == [(429, 0.05)]
    assert json.loads(waits[0][2])["limit"] == "streams"
    line = stream_wait_line(*waits[0])
    assert line == (
        "rate limited (HTTP 429): too many open streams: at most 5 per user across all gateways;"
        " reconnecting in 0.05 s (Retry-After)"
    )


def test_every_quota_setting_is_carried_into_the_deployment_with_its_default() -> None:
    """deploy/app/config.yaml spells out each quota and identity bound, equal to contract's default."""
    from pathlib import Path

    import yaml

    from contract.settings import Settings

    config = yaml.safe_load((Path(__file__).parent.parent / "deploy/app/config.yaml").read_text())["data"]
    fields = ["scan_burst", "scan_rate_per_min", "inflight_max", "inflight_lease_s", "streams_max"]
    fields += ["stream_lease_s", "quota_timeout_s", "max_user_id_len", "max_idempotency_key_len"]
    for f in fields:
        default = Settings.model_fields[f].default
        assert f"ECO2_{f.upper()}" in config, f
        assert type(default)(config[f"ECO2_{f.upper()}"]) == default, f
