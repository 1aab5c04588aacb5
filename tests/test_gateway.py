"""The SSE gateway against real Kafka, Redis and a real router (own group, own Redis db)."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import signal
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from contract import stream_token
from contract.events import ScanEvent
from contract.settings import Settings
from gateway.client import follow, make_client
from view import StateStore

from .gateway_support import (
    EventProducer,
    Proc,
    delete_jobs,
    full_events,
    gateway_proc,
    isolated_redis_url,
    job,
    seqs,
    submit,
    wait_ready,
)

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.gateway_fixtures"]

FULL = [1, 10, 11, 20, 21, 30, 31, 40, 41, 51]


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[StateStore]:
    r = aioredis.from_url(isolated_redis_url(settings))
    yield StateStore(r, settings.state_ttl_s)
    await r.aclose()


@pytest.fixture
async def extra_gateway(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A gateway of this test's own; parametrize it indirectly with extra ECO2_* env vars."""
    proc = gateway_proc(settings, **getattr(request, "param", {}))
    proc.start()
    try:
        yield await wait_ready(proc)
    finally:
        proc.kill(signal.SIGTERM)


def env(**kw: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("extra_gateway", [kw], indirect=True, ids=[",".join(kw)])


def dumps(events: list[ScanEvent]) -> list[dict[str, object]]:
    return [e.model_dump() for e in events]


async def read_raw(
    url: str, user: str, stop_after_seq: int | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """Raw SSE text of one connection (closed after `stop_after_seq` if given); no X-User-ID
    header when `user` is empty."""
    text = ""
    sent = {**({"X-User-ID": user} if user else {}), **(headers or {})}
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as client:
        async with client.stream("GET", url, headers=sent) as resp:
            if resp.status_code != 200:
                return resp.status_code, (await resp.aread()).decode()
            async for line in resp.aiter_lines():
                text += line + "\n"
                if stop_after_seq is not None and line == f"id: {stop_after_seq}":
                    break
    return 200, text


def stream_url(gw: str, job_id: str) -> str:
    return f"{gw}/api/v1/scan/{job_id}/events"


async def test_connect_before_during_after_see_identical_sequences(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, uid: str
) -> None:
    j = job(uid)
    events = full_events(j)
    before = asyncio.create_task(follow(gw_gateway, j.job_id, uid))  # the job does not exist yet
    await asyncio.sleep(0.3)
    producing = asyncio.create_task(gw_producer.send_all(events, gap_s=0.25))
    await asyncio.sleep(1.2)
    during = asyncio.create_task(follow(gw_gateway, j.job_id, uid))
    await producing
    got_before, got_during = await asyncio.wait_for(asyncio.gather(before, during), 60)
    got_after = await follow(gw_gateway, j.job_id, uid)
    assert seqs(got_before) == FULL
    assert dumps(got_before) == dumps(got_during) == dumps(got_after) == dumps(events)
    await delete_jobs(settings, [j.job_id])


async def test_sse_format_and_resume_with_last_event_id(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, uid: str
) -> None:
    j = job(uid)
    rest = await submit(settings, gw_producer, j)
    producing = asyncio.create_task(gw_producer.send_all(rest, gap_s=0.2))
    code, text = await read_raw(stream_url(gw_gateway, j.job_id), uid, stop_after_seq=20)
    assert code == 200
    blocks = [b for b in text.split("\n\n") if b.strip()]
    first = dict(line.split(": ", 1) for line in blocks[0].splitlines())
    assert first["event"] == "queued" and first["id"] == "1"
    assert json.loads(first["data"])["job_id"] == j.job_id
    ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids == [1, 10, 11, 20]
    # disconnected mid-job; resume while events are still being produced
    resumed = await follow(gw_gateway, j.job_id, uid, last_event_id=ids[-1])
    await producing
    assert ids + seqs(resumed) == FULL
    # a finished job with nothing after Last-Event-ID answers 204 (EventSource stops reconnecting)
    async with httpx.AsyncClient() as client:
        headers = {"X-User-ID": uid, "Last-Event-ID": "51"}
        r = await client.get(stream_url(gw_gateway, j.job_id), headers=headers)
    assert r.status_code == 204
    await delete_jobs(settings, [j.job_id])


async def test_failed_job_ends_with_a_failed_event(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, uid: str
) -> None:
    j = job(uid)
    await gw_producer.send_all(full_events(j, fail_at="vision"))
    got = await follow(gw_gateway, j.job_id, uid)
    assert seqs(got) == [1, 10, 99]
    code, text = await read_raw(stream_url(gw_gateway, j.job_id), uid, headers={"Last-Event-ID": "10"})
    # `failed`, not `error`: EventSource reports its own connection errors as `error`.
    assert code == 200 and "event: failed" in text and "id: 99" in text and "event: error" not in text
    await delete_jobs(settings, [j.job_id])


async def test_out_of_order_and_duplicate_events_are_seen_once_in_order(
    settings: Settings,
    gw_producer: EventProducer,
    gw_router: Proc,
    gw_gateway: str,
    store: StateStore,
    uid: str,
) -> None:
    # 1) Applied straight to Redis scrambled, with duplicates (as replays or a rebuild could).
    j = job(uid)
    events = full_events(j)
    await store.apply(events[:1])
    clients = [asyncio.create_task(follow(gw_gateway, j.job_id, uid)) for _ in range(3)]
    await asyncio.sleep(0.5)
    rng = random.Random(7)
    scrambled = events[1:] + rng.sample(events, 5)
    rng.shuffle(scrambled)
    high = 1
    for ev in scrambled:
        await store.apply([ev])
        state = await store.state(j.job_id)
        assert state is not None
        high = max(high, ev.seq)
        assert state["seq"] == high  # the state never goes backwards
        await asyncio.sleep(0.02)
    for got in await asyncio.wait_for(asyncio.gather(*clients), 30):
        assert seqs(got) == FULL
        assert dumps(got) == dumps(events)
    assert seqs(await follow(gw_gateway, j.job_id, uid)) == FULL

    # 2) Produced to Kafka twice over.
    j2 = job(uid)
    events2 = full_events(j2)
    client = asyncio.create_task(follow(gw_gateway, j2.job_id, uid))
    await gw_producer.send_all([e for ev in events2 for e in (ev, ev)] + events2)
    assert dumps(await asyncio.wait_for(client, 30)) == dumps(events2)
    await delete_jobs(settings, [j.job_id, j2.job_id])


@env(ECO2_CLIENT_QUEUE_SIZE="1")
async def test_overflowing_client_buffer_resyncs_from_history(
    settings: Settings, extra_gateway: str, store: StateStore, uid: str
) -> None:
    j = job(uid)
    events = full_events(j)
    await store.apply(events[:1])
    clients = [asyncio.create_task(follow(extra_gateway, j.job_id, uid)) for _ in range(5)]
    await asyncio.sleep(0.5)
    await store.apply(events[1:])  # one pipelined burst: 9 publishes into buffers of 1
    for got in await asyncio.wait_for(asyncio.gather(*clients), 30):
        assert dumps(got) == dumps(events)
    await delete_jobs(settings, [j.job_id])


async def test_two_gateway_processes_both_deliver_everything(
    settings: Settings,
    gw_producer: EventProducer,
    gw_router: Proc,
    gw_gateway: str,
    extra_gateway: str,
    uid: str,
) -> None:
    jobs = [job(uid) for _ in range(3)]
    clients = []
    producing = []
    for j in jobs:
        rest = await submit(settings, gw_producer, j)
        for gw in (gw_gateway, extra_gateway):
            clients.append((j, asyncio.create_task(follow(gw, j.job_id, uid))))
        producing.append(asyncio.create_task(gw_producer.send_all(rest, gap_s=0.1)))
    await asyncio.gather(*producing)
    for j, task in clients:
        got = await asyncio.wait_for(task, 60)
        assert seqs(got) == FULL and got[0].job_id == j.job_id
    await delete_jobs(settings, [j.job_id for j in jobs])


async def test_ownership_and_auth(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, uid: str
) -> None:
    j = job(uid)
    await submit(settings, gw_producer, j)
    url = stream_url(gw_gateway, j.job_id)
    async with httpx.AsyncClient(timeout=10) as client:
        no_user = await client.get(url)
        other = await client.get(url, headers={"X-User-ID": "mallory"})
        unknown = await client.get(stream_url(gw_gateway, "no-such-job"), headers={"X-User-ID": uid})
    assert no_user.status_code == 401 and no_user.json()["detail"]
    assert other.status_code == 404 and unknown.status_code == 404
    assert other.json() == unknown.json()  # someone else's job looks exactly like no job
    # A bare ?user= is no identity: anyone could claim anyone (ECO2_GATEWAY_ALLOW_USER_QUERY off).
    code, text = await read_raw(url + f"?user={uid}", "")
    assert code == 401 and "data:" not in text
    await delete_jobs(settings, [j.job_id])


def tampered(token: str, **claims: object) -> str:
    """`token` with its payload changed and its signature kept."""
    head, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body.update(claims)
    raw = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    return f"{head}.{raw}.{sig}"


async def test_stream_token_opens_exactly_its_own_stream(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, gw_gateway: str, uid: str
) -> None:
    """The token of a POST's stream_url is the browser's credential: bound to the job and the
    user, short-lived and signed; anything else gets 401/404 and never the stream."""
    j, other_job = job(uid), job(uid)
    await gw_producer.send_all(full_events(j))
    await gw_producer.send_all(full_events(other_job))
    url = stream_url(gw_gateway, j.job_id)
    good = stream_token.issue(settings, j.job_id, uid)
    other_secret = settings.model_copy(update={"stream_token_secret": SecretStr("another-key-" * 4)})
    refused = {
        "no token": ("", 401),
        "another job's token": (stream_token.issue(settings, other_job.job_id, uid), 401),
        "another user's token": (stream_token.issue(settings, j.job_id, f"mallory-{uid}"), 404),
        "expired": (stream_token.issue(settings, j.job_id, uid, now=time.time() - 2 * 3600), 401),
        "tampered user": (tampered(stream_token.issue(settings, j.job_id, "mallory"), sub=uid), 401),
        "tampered job": (tampered(stream_token.issue(settings, other_job.job_id, uid), job=j.job_id), 401),
        "signed with another key": (stream_token.issue(other_secret, j.job_id, uid), 401),
        "not a JWT": ("garbage", 401),
    }
    for name, (token, status) in refused.items():
        code, text = await read_raw(f"{url}?token={token}", "")
        assert (code, "data:" in text) == (status, False), f"{name}: {code} {text[:200]}"
    # The valid token alone (no X-User-ID) streams the whole job, resuming like any client.
    got = await follow(gw_gateway, j.job_id, None, token=good)
    assert seqs(got) == FULL
    assert seqs(await follow(gw_gateway, j.job_id, None, token=good, last_event_id=31)) == FULL[-3:]
    await delete_jobs(settings, [j.job_id, other_job.job_id])


@env(ECO2_GATEWAY_ALLOW_USER_QUERY="true")
async def test_user_query_only_behind_the_development_setting(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, extra_gateway: str, uid: str
) -> None:
    j = job(uid)
    await gw_producer.send_all(full_events(j))
    code, text = await read_raw(stream_url(extra_gateway, j.job_id) + f"?user={uid}", "")
    assert code == 200 and "id: 51" in text
    await delete_jobs(settings, [j.job_id])


@env(ECO2_MAX_CONNECTIONS="1")
async def test_connection_limit_answers_503(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, extra_gateway: str, uid: str
) -> None:
    j = job(uid)
    await submit(settings, gw_producer, j)  # stays running: the stream stays open
    url = stream_url(extra_gateway, j.job_id)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as client:
        async with client.stream("GET", url, headers={"X-User-ID": uid}) as first:
            assert first.status_code == 200
            lines = first.aiter_lines()
            while (await lines.__anext__()) != "id: 1":
                pass
            second = await client.get(url, headers={"X-User-ID": uid})
            assert second.status_code == 503
            assert "too many streams" in second.json()["detail"]
        # the slot is released when the client goes away
        deadline = time.monotonic() + 10
        while True:
            ready = (await client.get(extra_gateway + "/ready")).json()
            if ready["streams"] == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert ready["streams"] == 0
    await delete_jobs(settings, [j.job_id])


@env(ECO2_KEEPALIVE_S="0.3", ECO2_MAX_STREAM_S="1.5")
async def test_keepalive_and_max_stream_duration(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, extra_gateway: str, uid: str
) -> None:
    j = job(uid)
    rest = await submit(settings, gw_producer, j)
    t0 = time.monotonic()
    code, text = await read_raw(stream_url(extra_gateway, j.job_id), uid)  # closes at max_stream_s
    assert code == 200 and 1.2 < time.monotonic() - t0 < 10
    assert text.count(": keepalive") >= 2
    # across several max_stream_s closes the client resumes and misses nothing
    client = asyncio.create_task(follow(extra_gateway, j.job_id, uid))
    await gw_producer.send_all(rest, gap_s=0.5)
    assert seqs(await asyncio.wait_for(client, 60)) == FULL
    await delete_jobs(settings, [j.job_id])


async def test_redis_connections_stay_fixed_with_many_streams(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, extra_gateway: str, uid: str
) -> None:
    jobs = [job(uid) for _ in range(20)]
    for j in jobs:
        await submit(settings, gw_producer, j)
    async with make_client() as http:
        clients = [
            asyncio.create_task(follow(extra_gateway, j.job_id, uid, client=http))
            for j in jobs
            for _ in range(10)
        ]
        deadline = time.monotonic() + 30
        while (await http.get(extra_gateway + "/ready")).json()["streams"] < len(clients):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        r = aioredis.from_url(isolated_redis_url(settings))
        try:
            listing = await r.client_list()
        finally:
            await r.aclose()
        names = [c["name"] for c in listing if c["name"].startswith("eco2-gateway-")]
        per_process: dict[str, int] = {}
        for n in names:
            per_process[n] = per_process.get(n, 0) + 1
        # every gateway process: at most the pool plus one pub/sub connection, whatever its clients
        assert per_process and max(per_process.values()) <= settings.gateway_redis_pool + 1
        for j in jobs:
            await gw_producer.send_all(full_events(j)[1:])
        for got in await asyncio.wait_for(asyncio.gather(*clients), 60):
            assert seqs(got) == FULL
    await delete_jobs(settings, [j.job_id for j in jobs])


async def test_health_ready_cors_and_config(gw_gateway: str, settings: Settings) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(gw_gateway + "/health")).json() == {"status": "ok"}
        ready = await client.get(gw_gateway + "/ready")
        assert ready.status_code == 200 and ready.json()["pubsub"] is True
        pre = await client.options(
            gw_gateway + "/api/v1/scan/x/events",
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "X-User-ID, Last-Event-ID",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] in (
            "*",
            "http://app.example",
        )
        assert (await client.get(gw_gateway + "/config.json")).json()["api_url"] == settings.api_url
        page = await client.get(gw_gateway + "/")
        assert page.status_code == 200 and "EventSource" in page.text
        assert "eco2_gateway_streams" in (await client.get(gw_gateway + "/metrics")).text


async def test_pubsub_reconnect_resyncs_streams_from_history(
    settings: Settings, store: StateStore, uid: str
) -> None:
    """Events published while the gateway's one pub/sub connection is down are not lost."""
    proc = gateway_proc(settings)
    proc.start()
    r = aioredis.from_url(isolated_redis_url(settings))
    j = job(uid)
    events = full_events(j)
    try:
        gw = await wait_ready(proc)
        await store.apply(events[:3])
        caught_up = asyncio.Event()
        client = asyncio.create_task(
            follow(gw, j.job_id, uid, on_event=lambda e: caught_up.set() if e.seq == 11 else None)
        )
        await asyncio.wait_for(caught_up.wait(), 10)  # history delivered, now waiting for live events
        assert proc.popen is not None
        name = f"eco2-gateway-{proc.popen.pid}"
        pubsub = [c for c in await r.client_list() if c["name"] == name and int(c.get("sub", 0)) > 0]
        assert len(pubsub) == 1  # the one pub/sub connection of this process
        await r.client_kill_filter(_id=pubsub[0]["id"])
        await store.apply(events[3:])  # published while the gateway is not subscribed
        got = await asyncio.wait_for(client, 30)
        assert dumps(got) == dumps(events)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(gw + "/metrics")).text
        assert 'eco2_gateway_resyncs_total{reason="reconnect"}' in metrics
    finally:
        proc.kill(signal.SIGTERM)
        await r.aclose()
        await delete_jobs(settings, [j.job_id])
