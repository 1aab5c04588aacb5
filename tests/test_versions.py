"""Old and new pods side by side (issue 22, point 3): records shaped as the previous and the next
minor schema version, produced to the real topics, are read by the stack's own router, writer,
gateway and stage workers: nothing is dead-lettered, nothing is lost. An unknown major is the one
thing refused (dead-lettered or skipped), which is also what shows each check can fail."""

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
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from catalog import rules
from contract import keys, trace, versioning
from contract.events import ScanJob, now
from contract.settings import Settings
from contract.topics import BY_NAME, DLQ, EVENTS, PERSISTENCE_DLQ, STAGE_TOPICS, partition_for
from gateway.client import follow

from .gateway_support import full_events
from .kafka_events import dead_letters, job_events, read_partition
from .versions import MAJOR, NEW_FIELDS, NEW_STAGE_RESULT, NEXT, PREVIOUS, READABLE, encode, shaped

pytestmark = pytest.mark.integration

FULL = [1, 10, 11, 20, 21, 30, 31, 40, 41, 51]
STAMP = {"legacy": versioning.SCHEMA_VERSION, "previous": PREVIOUS, "next": NEXT}  # as read back


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=0)
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def rdb(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(settings.redis_url, decode_responses=True)
    yield r
    await r.aclose()


async def produce(p: AIOKafkaProducer, topic: str, key: str, value: dict[str, Any]) -> None:
    await p.send_and_wait(
        topic,
        encode(value),
        key=key.encode(),
        partition=partition_for(key, BY_NAME[topic].partitions),
        headers=trace.headers(trace.new_traceparent()),
    )


async def rows(s: Settings, job_ids: list[str], timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
    """Each job's row in `scans` once all are there (what is there when `timeout_s` runs out)."""
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        while True:
            found = await conn.fetch("SELECT * FROM scans WHERE job_id = ANY($1)", job_ids)
            if len(found) >= len(job_ids) or time.monotonic() > deadline:
                return {r["job_id"]: dict(r) for r in found}
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def history(r: aioredis.Redis, job_id: str, n: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        raw: list[str] = await r.zrange(keys.history(job_id), 0, -1)  # type: ignore[assignment]
        if len(raw) >= n or time.monotonic() > deadline:
            return [json.loads(x) for x in raw]
        await asyncio.sleep(0.2)


async def keys_to_end(s: Settings, topic: str, job_id: str, since_ms: int) -> list[str]:
    """The keys of every record on `job_id`'s partition of `topic` from `since_ms` to its end now."""
    part = partition_for(job_id, BY_NAME[topic].partitions)
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, part)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        start = (await consumer.offsets_for_times({tp: since_ms}))[tp]
        consumer.seek(tp, end if start is None else start.offset)
        out: list[str] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            out += [m.key.decode() for m in batch.get(tp, []) if m.key]
        return out
    finally:
        await consumer.stop()


async def letters(s: Settings, topic: str, job_id: str, since_ms: int, n: int) -> list[dict[str, Any]]:
    """The first `n` dead letters of `job_id` on `topic` from `since_ms` on."""
    part = partition_for(job_id, BY_NAME[topic].partitions)

    def mine(ms: list[Any]) -> list[dict[str, Any]]:
        return [json.loads(m.value) for m in ms if m.key and m.key.decode() == job_id]

    return mine(await read_partition(s, topic, part, since_ms, lambda ms: len(mine(ms)) >= n))


async def test_router_writer_and_gateway_read_previous_and_next_minor(
    settings: Settings,
    stack_status: dict[str, object],
    producer: AIOKafkaProducer,
    rdb: aioredis.Redis,
    uid: str,
) -> None:
    since_ms = int(time.time() * 1000) - 2000
    jobs: dict[str, ScanJob] = {}
    for shape in (*READABLE, "major"):
        j = ScanJob(
            job_id=f"v-{shape}-{uid}",
            user_id=f"user-{uid}",
            image_url="https://example.com/bottle.jpg",
            created_at=now(),
        )
        jobs[shape] = j
        for ev in full_events(j):
            await produce(producer, EVENTS, j.job_id, shaped(ev.model_dump(), shape))
    readable = [jobs[s].job_id for s in READABLE]

    # Router: every event of every readable shape in the view, as written (newer fields kept).
    for shape in READABLE:
        j = jobs[shape]
        hist = await history(rdb, j.job_id, len(FULL))
        assert [e["seq"] for e in hist] == FULL, shape
        assert {e["v"] for e in hist} == {STAMP[shape]}
        state = await rdb.hgetall(keys.state(j.job_id))
        assert (state["seq"], state["stage"], state["v"]) == ("51", "done", STAMP[shape])
        if shape == "next":
            assert all(NEW_FIELDS.items() <= e.items() for e in hist)
            assert NEW_STAGE_RESULT.items() <= json.loads(state["result"]).items()

    # Writer: one row per readable job, nothing of theirs on the persistence dead-letter topic.
    stored = await rows(settings, readable)
    assert sorted(stored) == sorted(readable)
    assert all(r["status"] == "completed" and r["reward"] for r in stored.values())
    assert {shape: stored[jobs[shape].job_id]["v"] for shape in READABLE} == STAMP
    assert json.loads(stored[jobs["next"].job_id]["extra"]) == {**NEW_FIELDS, **NEW_STAGE_RESULT}
    assert stored[jobs["legacy"].job_id]["extra"] is None
    major = jobs["major"].job_id
    refused = await letters(settings, PERSISTENCE_DLQ, major, since_ms, len(FULL))
    assert {x["reason"] for x in refused} == {"unknown_version"}
    assert [x["value"]["seq"] for x in refused] == FULL  # each record kept as it was, in order
    assert major in await keys_to_end(settings, PERSISTENCE_DLQ, major, since_ms)  # the reader reads
    for job_id in readable:
        assert job_id not in await keys_to_end(settings, PERSISTENCE_DLQ, job_id, since_ms)
    # ... and the router skipped the unknown major: it never reached the view.
    assert not await rdb.exists(keys.history(major), keys.state(major))

    # Gateway (history reader) and API: the whole stream and the result, newer fields included.
    for shape in READABLE:
        j = jobs[shape]
        got = await follow(settings.gateway_url, j.job_id, j.user_id)
        assert [e.seq for e in got] == FULL, shape
        assert {e.v for e in got} == {STAMP[shape]}
        async with httpx.AsyncClient(base_url=settings.api_url) as http:
            result = (
                await http.get(f"/api/v1/scan/{j.job_id}/result", headers={"X-User-ID": j.user_id})
            ).json()
        assert result["status"] == "completed"
        if shape == "next":
            assert NEW_FIELDS.items() <= got[-1].model_dump().items()
            assert NEW_STAGE_RESULT.items() <= result.items()

    # Once Redis has let the result go, Postgres answers with the newer fields all the same.
    nxt = jobs["next"]
    await rdb.delete(keys.state(nxt.job_id), keys.history(nxt.job_id))
    async with httpx.AsyncClient(base_url=settings.api_url) as http:
        resp = await http.get(f"/api/v1/scan/{nxt.job_id}/result", headers={"X-User-ID": nxt.user_id})
    assert resp.status_code == 200, resp.text
    assert {**NEW_FIELDS, **NEW_STAGE_RESULT, "v": NEXT}.items() <= resp.json().items()


async def test_stage_workers_read_previous_and_next_minor(
    settings: Settings,
    zero_latency_model: str,
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    since_ms = int(time.time() * 1000) - 2000
    jobs: dict[str, ScanJob] = {}
    for shape in (*READABLE, "major"):
        j = ScanJob(
            job_id=f"w-{shape}-{uid}",
            user_id=f"user-{uid}",
            image_url=f"https://images.example.com/scans/clear_pet-bottle-{shape}-{uid}.jpg",
            created_at=now(),
        )
        jobs[shape] = j
        await produce(producer, STAGE_TOPICS["vision"], j.job_id, shaped(j.model_dump(), shape, finding=True))
    readable = [jobs[s].job_id for s in READABLE]

    events = await job_events(settings, readable, since_ms)
    for shape in READABLE:
        evs = events[jobs[shape].job_id]
        assert [e["seq"] for e in evs] == FULL[1:], shape  # no queued: the test is the producer
        assert all(e["v"] == versioning.SCHEMA_VERSION for e in evs)  # the worker stamps its own
        result = evs[-1]["result"]
        assert result["status"] == "completed" and result["answer"]["user_answer"]
        if shape == "next":  # a newer worker's finding travelled through every stage to the result
            assert {**NEW_FIELDS, **NEW_STAGE_RESULT}.items() <= result.items()

    # The unknown major: one dead letter saying so, and no event at all.
    major = jobs["major"]
    (letter,) = await dead_letters(settings, major.job_id, since_ms)
    assert letter["reason"] == "unknown_version" and letter["value"]["v"] == MAJOR
    assert letter["stage"] == "vision"
    # No readable job was dead-lettered (scan.dlq holds the letter above; read up to it).
    assert major.job_id in await keys_to_end(settings, DLQ, major.job_id, since_ms)  # the reader reads
    for job_id in readable:
        assert job_id not in await keys_to_end(settings, DLQ, job_id, since_ms)
    # Every readable job reaches Postgres, and the model was called once per call, never twice.
    assert sorted(await rows(settings, readable)) == sorted(readable)
    calls = httpx.get(f"{zero_latency_model}/admin/stats", params={"by": "job"}).json()["jobs"]
    for job_id in readable:
        assert calls[job_id] == {"classification": 1, "answer": 1}
    assert major.job_id not in calls
    ev_major = await read_partition(
        settings,
        EVENTS,
        partition_for(major.job_id, BY_NAME[EVENTS].partitions),
        since_ms,
        lambda ms: True,
        3,
    )
    assert not [m for m in ev_major if m.key and m.key.decode() == major.job_id]


@pytest.mark.parametrize("shape", ["next", "legacy"])
async def test_each_stage_takes_over_a_job_written_by_another_version(
    settings: Settings, zero_latency_model: str, producer: AIOKafkaProducer, uid: str, shape: str
) -> None:
    """Mid-pipeline: a job whose earlier stages ran on another version reaches the rule, answer and
    reward workers directly, each with that version's `v` and fields, and is finished by them."""
    since_ms = int(time.time() * 1000) - 2000
    url = f"https://images.example.com/scans/glass_bottle-{shape}-{uid}.jpg"
    found = {  # what the earlier stages found for such an image (the stand-in is deterministic)
        "classification": {
            "major_category": "recyclable",
            "middle_category": "glass_bottle",
            "minor_category": "glass bottle",
            "situation_tags": [],
            "confidence": 0.93,
        }
    }
    jobs: dict[str, str] = {}
    for stage in ("rule", "answer", "reward"):
        j = ScanJob(job_id=f"m-{stage}-{shape}-{uid}", user_id=f"user-{uid}", image_url=url, created_at=now())
        record = {**j.model_dump(), **found}
        if stage in ("answer", "reward"):
            match = rules.lookup(found["classification"])
            assert match is not None
            record.update(rules_key=match.key, rules=match.rule)
        if stage == "reward":
            record["answer"] = {
                "disposal_steps": ["rinse"],
                "user_answer": "Rinse it.",
                "warnings": [],
                "gaps": [],
            }
        jobs[stage] = j.job_id
        await produce(producer, STAGE_TOPICS[stage], j.job_id, shaped(record, shape, finding=True))
    events = await job_events(settings, list(jobs.values()), since_ms)
    first = {"rule": 20, "answer": 30, "reward": 40}
    for stage, job_id in jobs.items():
        evs = events[job_id]
        assert [e["seq"] for e in evs] == [s for s in FULL if s >= first[stage]], (stage, evs[-1])
        result = evs[-1]["result"]
        assert result["status"] == "completed" and result["reward"]["granted"] is True
        if shape == "next":
            assert {**NEW_FIELDS, **NEW_STAGE_RESULT}.items() <= result.items()
        assert job_id not in await keys_to_end(settings, DLQ, job_id, since_ms)
    calls = httpx.get(f"{zero_latency_model}/admin/stats", params={"by": "job"}).json()["jobs"]
    assert calls[jobs["rule"]] == calls[jobs["answer"]] == {"answer": 1}
    assert jobs["reward"] not in calls
    assert sorted(await rows(settings, list(jobs.values()))) == sorted(jobs.values())
