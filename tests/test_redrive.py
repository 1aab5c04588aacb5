"""A dead-letter re-drive recovers jobs (issue 22), against the real stack.

The model's `answer` calls fail permanently for a while (an outage of the stand-in, `PUT
/admin/outage`), so N jobs fail at the answer stage and are dead-lettered; a client follows one of
them to its `failed` event. The model recovers, one `eco2 dlq replay --topic scan.dlq --all`
re-drives the outage's letters and watches them finish. Then every job is `completed` in Redis,
over SSE (the client reconnects with its Last-Event-ID and gets the new attempt, gap-free), and in
Postgres; no letter was re-created, no seq carries two different events, vision was not called again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from contract import keys
from contract.pipeline import ATTEMPT_SPAN, FAILED_SEQ, SUCCESS_SEQS, seq_of
from contract.settings import Settings
from contract.topics import DLQ
from eco2.dlq import read_letters
from producers.client import submit, wait_result
from view import StateStore

from .conftest import eco2
from .kafka_events import job_events

pytestmark = pytest.mark.integration

N = 4
FAILED_ATTEMPT = [s for s in SUCCESS_SEQS if s <= seq_of("answer", "started")] + [FAILED_SEQ]
RETRY = [ATTEMPT_SPAN + s for s in SUCCESS_SEQS]


@pytest.fixture
async def outage(zero_latency_model: str) -> AsyncIterator[httpx.Client]:
    """The model rejects every `answer` call until the test lifts it (always lifted at the end)."""
    with httpx.Client(base_url=zero_latency_model, timeout=10) as model:
        model.put("/admin/outage", json={"schemas": ["answer"]}).raise_for_status()
        try:
            yield model
        finally:
            model.put("/admin/outage", json={"schemas": []}).raise_for_status()


async def sse(
    s: Settings, job_id: str, user: str, last: int | None, until: set[str]
) -> list[tuple[int, str]]:
    """(seq, event) read from the gateway until one of the events `until` (or the stream's end)."""
    headers = {"X-User-ID": user, **({"Last-Event-ID": str(last)} if last is not None else {})}
    out: list[tuple[int, str]] = []
    async with httpx.AsyncClient(base_url=s.gateway_url, timeout=60) as http:
        async with http.stream("GET", f"/api/v1/scan/{job_id}/events", headers=headers) as resp:
            assert resp.status_code == 200, resp.status_code
            seq, name = None, None
            async for line in resp.aiter_lines():
                if line.startswith("id:"):
                    seq = int(line[3:].strip())
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line == "" and seq is not None and name is not None:
                    out.append((seq, name))
                    if name in until:
                        return out
                    seq, name = None, None
    return out


async def pg_rows(s: Settings, jobs: list[str], status: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT job_id, status, attempt, answer IS NOT NULL AS answered "
                "FROM scans WHERE job_id = ANY($1)",
                jobs,
            )
            got = {r["job_id"]: dict(r) for r in rows}
            if (len(got) == len(jobs) and all(r["status"] == status for r in got.values())) or (
                time.monotonic() > deadline
            ):
                return got
            await asyncio.sleep(0.3)
    finally:
        await conn.close()


async def test_bulk_redrive_after_a_model_outage_completes_every_job(
    settings: Settings, outage: httpx.Client
) -> None:
    t0 = time.time()
    since_ms = int(t0 * 1000) - 2000
    user = f"redrive-{int(t0 * 1000) % 10**9}"
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as api:
        urls = [f"https://images.example.com/scans/clear_pet-bottle-{i}.jpg?u={user}" for i in range(N)]
        jobs = [(await submit(api, url, user))["job_id"] for url in urls]
    followed = jobs[0]
    first = await sse(settings, followed, user, None, {"failed", "done"})
    assert [s for s, _ in first] == FAILED_ATTEMPT
    assert first[-1][1] == "failed"

    failed = await job_events(settings, jobs, since_ms)
    for job_id in jobs:
        assert [e["seq"] for e in failed[job_id]][-1] == FAILED_SEQ
    assert all(r["status"] == "failed" for r in (await pg_rows(settings, jobs, "failed")).values())
    letters_before = [x for x in await read_letters(settings, DLQ) if x.job_id in jobs]
    assert len(letters_before) == N

    # A client reconnecting before the re-drive: the job has ended, 204 (EventSource stops).
    async with httpx.AsyncClient(base_url=settings.gateway_url, timeout=30) as http:
        r = await http.get(
            f"/api/v1/scan/{followed}/events", headers={"X-User-ID": user, "Last-Event-ID": str(FAILED_SEQ)}
        )
        assert r.status_code == 204

    outage.put("/admin/outage", json={"schemas": []}).raise_for_status()
    since = f"{t0 - 1:.3f}"
    proc = eco2("dlq", "replay", "--topic", DLQ, "--all", "--since", since, "--watch", "120", timeout=240)
    assert f"re-driven: {N} completed, 0 failed again, 0 still running" in proc.stdout, proc.stdout
    assert proc.stdout.count(" attempt 1 -> scan.vision") == N, proc.stdout

    # The client that followed the failed attempt reconnects and gets the new attempt, gap-free.
    again = await sse(settings, followed, user, FAILED_SEQ, {"done", "failed"})
    assert [s for s, _ in again] == RETRY
    assert again[0][1] == "queued" and again[-1][1] == "done"

    r_client = aioredis.from_url(settings.redis_url)
    try:
        store = StateStore(r_client, settings.state_ttl_s)
        for job_id in jobs:
            st = await store.state(job_id)
            assert st is not None
            assert (st["stage"], st["status"], st["seq"]) == ("done", "completed", RETRY[-1])
            assert st["result"]["status"] == "completed" and st["result"]["attempt"] == 1
            assert [e.seq for e in await store.history(job_id)] == FAILED_ATTEMPT + RETRY
            assert 0 < await r_client.ttl(keys.state(job_id)) <= settings.result_ttl_s
    finally:
        await r_client.aclose()

    async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as api:
        res, _ = await wait_result(api, followed, user, timeout_s=30, interval_s=0.2)
        assert res["status"] == "completed" and res["attempt"] == 1

    rows = await pg_rows(settings, jobs, "completed")
    assert {j: (r["status"], r["attempt"], r["answered"]) for j, r in rows.items()} == {
        j: ("completed", 1, True) for j in jobs
    }

    # Nothing duplicated: one event per seq (a redelivery re-sends the same bytes), each attempt whole.
    events = await job_events(settings, jobs, since_ms)
    for job_id in jobs:
        by_seq: dict[int, set[str]] = {}
        for e in events[job_id]:
            by_seq.setdefault(e["seq"], set()).add(json.dumps(e, sort_keys=True))
        assert sorted(by_seq) == FAILED_ATTEMPT + RETRY
        assert all(len(v) == 1 for v in by_seq.values()), job_id

    # No letter re-created; a second bulk re-drive finds every letter already replayed.
    assert len([x for x in await read_letters(settings, DLQ) if x.job_id in jobs]) == N
    proc = eco2("dlq", "replay", "--topic", DLQ, "--all", "--since", since)
    assert f"{DLQ}: 0 replayed, {N} skipped, 0 could not be" in proc.stdout, proc.stdout

    # No process crashed on the way (an event emitted before a crash would hide it above).
    services = json.loads(eco2("stack", "status", "--json").stdout)["services"]
    assert [name for name, info in services.items() if not info["up"]] == []

    # The re-drive passed vision through (no second call); answer: the failed call and the new one.
    calls = outage.get("/admin/stats", params={"by": "job"}).json()["jobs"]
    for job_id in jobs:
        assert calls[job_id] == {"classification": 1, "answer": 2}, calls[job_id]


async def test_a_new_attempt_reopens_a_failed_job_in_the_redis_view(settings: Settings) -> None:
    """The router's apply (view/state.py Lua) on the real Redis: a failed job's next attempt moves its
    state on, back to the running TTL and without the failed attempt's result; a late event of the
    failed attempt changes nothing; the new attempt's end brings the finished TTL and its result."""
    from .gateway_support import full_events, job

    j = job("redrive-unit")
    failed = full_events(j, fail_at="vision")
    again = full_events(j.model_copy(update={"attempt": 1}))
    r = aioredis.from_url(settings.redis_url)
    store = StateStore(r, ttl_s=3600, finished_ttl_s=60, publish=False)
    try:
        await store.apply(failed)
        st = await store.state(j.job_id)
        assert st is not None and (st["status"], st["seq"]) == ("failed", FAILED_SEQ) and "result" in st
        assert await r.ttl(keys.state(j.job_id)) <= 60
        assert await store.apply(again[:2]) == [True, True]  # queued + vision started of attempt 1
        st = await store.state(j.job_id)
        assert st is not None and (st["stage"], st["status"], st["seq"]) == ("vision", "started", 110)
        assert "result" not in st and await r.ttl(keys.state(j.job_id)) > 60
        assert await store.apply(failed[-1:]) == [False]  # a late repeat of the failure: nothing
        assert (await store.state(j.job_id) or {})["seq"] == 110
        await store.apply(again[2:])
        st = await store.state(j.job_id)
        assert st is not None and (st["stage"], st["seq"]) == ("done", RETRY[-1])
        assert st["result"]["status"] == "completed" and await r.ttl(keys.state(j.job_id)) <= 60
        assert [e.seq for e in await store.history(j.job_id)] == [e.seq for e in failed] + RETRY
    finally:
        await r.delete(keys.state(j.job_id), keys.history(j.job_id))
        await r.aclose()
