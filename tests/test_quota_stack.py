"""Per-user quotas with real processes: two scan API processes and two gateway processes share
one limit through Redis, a gateway killed -9 leaks its stream slots for one lease only, the
pipeline's terminal event frees an in-flight slot, bad identities are 400s that reach nothing,
and a silent Redis lets scans through (fail open) instead of answering 5xx.

About 40 s on an idle box (process starts, one lease of 2 s, one job through the pipeline)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from playwright.async_api import Page
from prometheus_client.parser import text_string_to_metric_families

import view
from contract import keys
from contract.events import make_event
from contract.settings import Settings
from view import StateStore

from .gateway_support import Proc, RedisServer, gateway_proc, job, wait_ready
from .test_resilience import api_proc
from .test_web import page, watch_progress  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

IMAGE = "https://images.example.com/quota/clear_pet.jpg"


def with_env(proc: Proc, **env: str) -> Proc:
    proc.env.update(env)
    return proc


@contextlib.asynccontextmanager
async def running(*procs: Proc) -> AsyncIterator[list[str]]:
    """Start the processes, yield their URLs once each is ready, stop them (SIGTERM) after."""
    for p in procs:
        p.start()
    try:
        yield [await wait_ready(p) for p in procs]
    finally:
        for p in procs:
            p.kill(signal.SIGTERM)


async def post(http: httpx.AsyncClient, url: str, user: str | bytes, **headers: str) -> httpx.Response:
    raw = user if isinstance(user, bytes) else user.encode()  # bytes: a non-ASCII id as sent on the wire
    sent = [(b"X-User-ID", raw), *((k.encode(), v.encode()) for k, v in headers.items())]
    return await http.post(f"{url}/api/v1/scan", json={"image_url": IMAGE}, headers=sent)


def metric(text: str, name: str, **labels: str) -> float:
    """A sample of the Prometheus text exposition (prometheus_client's parser), 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


async def test_scan_quota_is_one_limit_across_two_api_processes(
    settings: Settings,
    stack_status: dict[str, object],
    own_redis: RedisServer,
    uid: str,
) -> None:
    r = aioredis.from_url(own_redis.url)
    await view.mark_ready(r)
    quota = {"ECO2_SCAN_BURST": "3", "ECO2_SCAN_RATE_PER_MIN": "0.6", "ECO2_INFLIGHT_MAX": "0"}
    apis = [with_env(api_proc(settings, own_redis.url), **quota) for _ in range(2)]
    try:
        async with running(*apis) as (a, b), httpx.AsyncClient(timeout=30) as http:
            first = [await post(http, url, uid) for url in (a, b, a)]
            assert [x.status_code for x in first] == [202, 202, 202], [x.text for x in first]
            assert first[-1].headers["RateLimit"].startswith('"scans";r=0;')
            refused = await post(http, b, uid)  # the other process: the bucket is the user's, not its own
            assert refused.status_code == 429, refused.text
            body = refused.json()
            assert body["error"] == "rate_limited" and body["limit"] == "scans"
            assert (
                int(refused.headers["Retry-After"]) == body["retry_after_s"] >= 90
            )  # 0.6/min: 100 s a token
            assert refused.headers["RateLimit-Policy"] == '"scans";q=3;w=300'
            assert (await post(http, a, f"{uid}-other")).status_code == 202  # another user is unaffected
            text = (await http.get(f"{b}/metrics")).text
            assert metric(text, "eco2_quota_refused_total", limit="scans") == 1

            # Identities outside the bounds: 400 before Kafka or Redis sees them.
            for bad in ("u" * 129, "has space", "a/b", "ümlaut".encode()):
                got = await post(http, a, bad)
                assert got.status_code == 400 and got.json()["field"] == "X-User-ID", (bad, got.text)
            got = await post(http, a, uid + "-idem", **{"X-Idempotency-Key": "k" * 201})
            assert got.status_code == 400 and got.json()["error"] == "invalid_idempotency_key", got.text
            stored = [k.decode() async for k in r.scan_iter("*")]
            assert not [k for k in stored if "u" * 129 in k or "has space" in k or uid + "-idem" in k], stored
    finally:
        await r.aclose()


async def test_inflight_slot_is_freed_by_the_pipelines_terminal_event(
    settings: Settings, stack_status: dict[str, object], zero_latency_model: str, uid: str
) -> None:
    """On the stack's Redis, so the stack's workers run the jobs and its router frees the slots."""
    quota = {"ECO2_SCAN_BURST": "0", "ECO2_INFLIGHT_MAX": "2"}
    apis = [with_env(api_proc(settings, settings.redis_url), **quota) for _ in range(2)]
    async with running(*apis) as (a, b), httpx.AsyncClient(timeout=30) as http:
        jobs = [await post(http, url, uid) for url in (a, b)]
        assert [x.status_code for x in jobs] == [202, 202], [x.text for x in jobs]
        refused = await post(http, a, uid)
        assert refused.status_code == 429 and refused.json()["limit"] == "inflight", refused.text
        assert 1 <= int(refused.headers["Retry-After"]) <= 5
        for x in jobs:  # the pipeline finishes both (zero-latency model)
            deadline = asyncio.get_running_loop().time() + 90
            while (
                res := await http.get(f"{a}{x.json()['result_url']}", headers={"X-User-ID": uid})
            ).status_code != 200:
                assert asyncio.get_running_loop().time() < deadline, res.text
                await asyncio.sleep(0.3)
        again = await post(http, b, uid)
        assert again.status_code == 202, again.text


async def test_stream_cap_is_shared_by_two_gateways_and_a_killed_gateway_frees_its_slots(
    settings: Settings,
    stack_status: dict[str, object],
    own_redis: RedisServer,
    uid: str,
) -> None:
    r = aioredis.from_url(own_redis.url)
    await view.mark_ready(r)
    j = job(uid)
    await StateStore(r, settings.state_ttl_s).apply(
        [make_event(j, "queued", "completed")]
    )  # runs: streams stay open
    quota = {"ECO2_REDIS_URL": own_redis.url, "ECO2_STREAMS_MAX": "2", "ECO2_STREAM_LEASE_S": "2"}
    gws = [gateway_proc(settings, **quota) for _ in range(2)]
    path = f"/api/v1/scan/{j.job_id}/events"
    hdrs = {"X-User-ID": uid, "Accept": "text/event-stream"}
    try:
        async with running(*gws) as (a, b), httpx.AsyncClient(timeout=httpx.Timeout(10, read=60)) as http:
            async with contextlib.AsyncExitStack() as held:
                for url in (a, b):  # one open stream on each gateway
                    resp = await held.enter_async_context(http.stream("GET", url + path, headers=hdrs))
                    assert resp.status_code == 200
                refused = await http.get(a + path, headers=hdrs)
                assert refused.status_code == 429, refused.text
                assert refused.json()["limit"] == "streams" and int(refused.headers["Retry-After"]) >= 1
                assert refused.headers["RateLimit-Policy"] == '"streams";q=2;qu="concurrent-requests"'
                assert await r.zcard(keys.quota_streams(uid)) == 2
                gws[1].kill(signal.SIGKILL)  # its stream's slot is never released, only not renewed
                await asyncio.sleep(0.5)
                assert (await http.get(a + path, headers=hdrs)).status_code == 429  # the lease still runs
                deadline = asyncio.get_running_loop().time() + 10
                while True:  # within one lease (2 s) the dead gateway's slot lapses
                    async with http.stream("GET", a + path, headers=hdrs) as resp:
                        if resp.status_code == 200:
                            break
                    assert asyncio.get_running_loop().time() < deadline, (
                        "the killed gateway's lease never lapsed"
                    )
                    await asyncio.sleep(0.3)
                assert asyncio.get_running_loop().time() < deadline
    finally:
        await r.aclose()


async def test_quota_fails_open_when_redis_is_down(
    settings: Settings,
    stack_status: dict[str, object],
    own_redis: RedisServer,
    uid: str,
) -> None:
    """Quotas guard the model budget from one user; a Redis outage must not become an outage of
    every user: the POST goes to Kafka unchecked (202), counted as a skipped check."""
    r = aioredis.from_url(own_redis.url)
    await view.mark_ready(r)
    await r.aclose()
    quota = {"ECO2_SCAN_BURST": "1", "ECO2_SCAN_RATE_PER_MIN": "0.6", "ECO2_INFLIGHT_MAX": "1"}
    async with running(with_env(api_proc(settings, own_redis.url), **quota)) as (a,):
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await post(http, a, uid)).status_code == 202
            assert (await post(http, a, uid)).status_code == 429  # the quota is on while Redis is up
            await asyncio.to_thread(own_redis.stop, signal.SIGKILL)
            down = [await post(http, a, f"{uid}-{i}") for i in range(3)] + [await post(http, a, uid)]
            assert [x.status_code for x in down] == [202] * 4, [x.text for x in down]
            assert "RateLimit" not in down[-1].headers  # nothing was checked, nothing is claimed
            text = (await http.get(f"{a}/metrics")).text
            assert metric(text, "eco2_quota_skipped_total", limit="scans") >= 4
            await asyncio.to_thread(own_redis.start)


async def test_page_waits_out_a_429_and_posts_again(
    settings: Settings,
    stack_status: dict[str, object],
    page: Page,  # noqa: F811
    uid: str,
) -> None:
    """The demo page says which limit refused the scan, counts down Retry-After, then posts again."""
    api = with_env(
        api_proc(settings, settings.redis_url),
        ECO2_SCAN_BURST="1",
        ECO2_SCAN_RATE_PER_MIN="20",  # a token every 3 s
        ECO2_INFLIGHT_MAX="0",
    )
    async with running(api) as (api_url,):
        port = api_url.rsplit(":", 1)[1]
        async with running(gateway_proc(settings, ECO2_API_PORT=port)) as (gw,):
            await page.goto(gw + "/")
            await page.fill("#user", uid)
            await page.fill("#image", IMAGE)
            await page.click("#submit")
            await page.wait_for_function("document.querySelector('#job').textContent.startsWith('job ')")
            first = await page.text_content("#job")
            await page.click("#submit")  # the bucket is empty: 429, Retry-After 3
            await page.wait_for_function("document.body.dataset.state === 'limited'", timeout=10_000)
            status = await page.text_content("#status") or ""
            assert "rate limited (HTTP 429, scans)" in status and "Posting again in" in status, status
            await page.wait_for_function(
                f"document.querySelector('#job').textContent !== {first!r}", timeout=15_000
            )
            assert await page.get_attribute("body", "data-state") != "limited"


async def test_schemathesis_finds_nothing_in_a_quota_limited_scan_api(
    settings: Settings, stack_status: dict[str, object], tmp_path: Path, uid: str
) -> None:
    """With a tight bucket most POSTs are 429s: their body and fields must match the OpenAPI."""
    from .test_contracts import BODY_LIMIT, schemathesis

    api = with_env(
        api_proc(settings, settings.redis_url),
        ECO2_SCAN_BURST="2",
        ECO2_SCAN_RATE_PER_MIN="1",
        ECO2_INFLIGHT_MAX="1",
    )
    async with running(api) as (url,):
        await asyncio.to_thread(
            schemathesis, f"{url}/openapi.json", tmp_path, *("-H", f"X-User-ID: st-{uid}"), config=BODY_LIMIT
        )
        text = httpx.get(f"{url}/metrics").text
        assert (
            metric(text, "eco2_quota_refused_total", limit="inflight")
            + metric(text, "eco2_quota_refused_total", limit="scans")
            > 0
        ), "schemathesis never met a 429"
