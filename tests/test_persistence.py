"""Issue 5: the batched Postgres writer against the real Kafka and Postgres.

Each test runs its own writer (in-process, or `python -m persistence` for the outage test) in a
consumer group of its own that starts at the current end of scan.events, so it neither competes
with the stack's writer nor re-reads history. Job ids are unique per test run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from contract import keys, trace
from contract.events import PIPELINE, DeadLetter, Reward, ScanEvent, ScanJob, ScanResult, make_event, now
from contract.settings import Settings
from contract.topics import (
    BY_NAME,
    DLQ,
    EVENTS,
    EVENTS_PARTITIONS,
    PERSISTENCE_DLQ,
    STAGE_TOPICS,
    partition_for,
    shard_of,
)
from persistence.store import fetch_result
from persistence.writer import Writer
from view import StateStore

from .conftest import REPO, eco2

pytestmark = pytest.mark.integration

EVENT_TPS = [TopicPartition(EVENTS, p) for p in range(EVENTS_PARTITIONS)]


# --- helpers ---------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what or check}")
        await asyncio.sleep(0.3)


async def group_at_end(s: Settings, group: str) -> None:
    """Commit the current end of scan.events for a new group: its writer starts there."""
    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        c.assign(EVENT_TPS)
        end = await c.end_offsets(EVENT_TPS)
        await c.commit({tp: end[tp] for tp in EVENT_TPS})
    finally:
        await c.stop()


async def end_offsets(s: Settings, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    c = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, isolation_level="read_committed")
    await c.start()
    try:
        return dict(await c.end_offsets(tps))
    finally:
        await c.stop()


async def caught_up(s: Settings, group: str, target: dict[TopicPartition, int]) -> bool:
    """The group committed at least `target` on every partition (everything before was handled)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return all(tp in committed and committed[tp].offset >= off for tp, off in target.items())


def job_and_events(
    job_id: str, user: str, *, code: str | None = "PET", failed: bool = False, finished: float | None = None
) -> tuple[ScanResult, list[ScanEvent]]:
    """A scan's events: queued, vision started/completed, then done (or a failure) with its result."""
    created = now()
    job = ScanJob(
        job_id=job_id, user_id=user, image_url=f"https://img.example/{job_id}.jpg", model="gpt-4o-mini",
        created_at=created,
    )
    reward = Reward(granted=code is not None, character_code=code, reason="test")
    result = ScanResult(
        job_id=job_id,
        user_id=user,
        status="failed" if failed else "completed",
        image_url=job.image_url,
        classification={"major": "recyclable", "middle": "metal", "tags": ["label attached"]},
        rules_key="recyclable/metal",
        rules=None if failed else {"steps": ["rinse", "crush"]},
        answer=None if failed else {"text": "캔은 헹궈서 압착해 배출하세요."},
        reward=None if failed else reward.model_dump(),
        error="model unavailable" if failed else None,
        failed_stage="answer" if failed else None,
        timings={"vision": 5.2, "rule": 0.01} if failed else {"vision": 5.2, "rule": 0.01, "answer": 6.3},
        created_at=created,
        finished_at=finished if finished is not None else round(created + 12.345, 3),
    )
    events = [
        make_event(job, "queued", "completed"),
        make_event(job, "vision", "started"),
        make_event(job, "vision", "completed"),
    ]
    if failed:
        events.append(make_event(job, "answer", "failed", result=result, error=result.error))
    else:
        events.append(make_event(job, "done", "completed", result=result))
    return result, events


async def produce(s: Settings, values: list[tuple[str, bytes]], topic: str = EVENTS) -> None:
    """Send (job_id, value) pairs keyed and partitioned like every producer of the project."""
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, enable_idempotence=True, linger_ms=5)
    await producer.start()
    try:
        parts = BY_NAME[topic].partitions
        futs = [
            await producer.send(
                topic, value, key=key.encode(), partition=partition_for(key, parts),
                headers=trace.headers(trace.new_traceparent()),
            )
            for key, value in values
        ]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


def as_values(events: list[ScanEvent]) -> list[tuple[str, bytes]]:
    return [(ev.job_id, ev.model_dump_json().encode()) for ev in events]


@contextlib.asynccontextmanager
async def running_writer(s: Settings, group: str) -> AsyncIterator[Writer]:
    await group_at_end(s, group)
    writer = Writer(s, group=group)
    task = asyncio.create_task(writer.run())
    try:
        await asyncio.wait_for(writer.assigned.wait(), 60)
        yield writer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest_asyncio.fixture
async def pg(settings: Settings, stack_status: Any) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest_asyncio.fixture(scope="module")
async def shared_writer(settings: Settings, stack_status: Any) -> AsyncIterator[Writer]:
    """One writer for the count and replay tests (its own group, from the end of scan.events)."""
    import uuid

    async with running_writer(settings, f"test-writer-{uuid.uuid4().hex[:8]}") as w:
        yield w


async def count(pg: asyncpg.Connection, prefix: str) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM scans WHERE job_id LIKE $1", prefix + "%"))


async def snapshot(pg: asyncpg.Connection, prefix: str, users: list[str]) -> tuple[list[Any], list[Any]]:
    scans = await pg.fetch("SELECT * FROM scans WHERE job_id LIKE $1 ORDER BY job_id", prefix + "%")
    owned = await pg.fetch(
        "SELECT * FROM character_ownership WHERE user_id = ANY($1) ORDER BY user_id, character_code", users
    )
    return [dict(r) for r in scans], [dict(r) for r in owned]


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 49, 50, 51, 500])
async def test_n_scans_make_exactly_n_rows(settings: Settings, shared_writer: Writer, pg, uid: str, n: int):
    prefix = f"pw-{uid}-"
    values: list[tuple[str, bytes]] = []
    granted = 0
    for i in range(n):
        code = "PET" if i % 3 == 0 else None  # every third scan grants a character
        granted += code is not None
        _, events = job_and_events(f"{prefix}{i}", f"user-{uid}-{i}", code=code, failed=i % 7 == 6)
        values += as_values(events)
        granted -= code is not None and i % 7 == 6  # a failed scan grants nothing
    await produce(settings, values)
    target = await end_offsets(settings, EVENT_TPS)
    await eventually(lambda: caught_up(settings, shared_writer.group, target), what="the writer's commits")
    assert await count(pg, prefix) == n
    owned = await pg.fetchval(
        "SELECT count(*) FROM character_ownership WHERE user_id LIKE $1", f"user-{uid}-%"
    )
    assert owned == granted
    failed = await pg.fetchval(
        "SELECT count(*) FROM scans WHERE job_id LIKE $1 AND status = 'failed'", prefix + "%"
    )
    assert failed == sum(1 for i in range(n) if i % 7 == 6)


async def test_replaying_the_same_events_changes_nothing(settings: Settings, shared_writer: Writer, pg, uid):
    prefix = f"pr-{uid}-"
    user = f"user-{uid}"
    values: list[tuple[str, bytes]] = []
    for i in range(30):
        # One user scans the same character many times: one ownership row, the earliest scan's.
        _, events = job_and_events(f"{prefix}{i:02d}", user, code="CAN" if i % 2 else "PET",
                                   finished=1_700_000_000.0 + (30 - i))
        values += as_values(events)
    await produce(settings, values)
    await eventually(lambda: _count_is(pg, prefix, 30), what="30 rows")
    target = await end_offsets(settings, EVENT_TPS)
    await eventually(lambda: caught_up(settings, shared_writer.group, target), what="commits")
    before = await snapshot(pg, prefix, [user])
    assert len(before[0]) == 30
    owners = [(o["character_code"], o["job_id"]) for o in before[1]]
    assert owners == [("CAN", f"{prefix}29"), ("PET", f"{prefix}28")]  # the earliest grants

    await produce(settings, list(reversed(values)))  # the same events again, in another order
    target = await end_offsets(settings, EVENT_TPS)
    await eventually(lambda: caught_up(settings, shared_writer.group, target), what="commits of the replay")
    assert await snapshot(pg, prefix, [user]) == before


async def _count_is(pg: asyncpg.Connection, prefix: str, n: int) -> bool:
    got = await count(pg, prefix)
    assert got <= n, f"{got} rows for {n} jobs"
    return got == n


async def test_fetch_result_after_the_redis_cache_is_gone(settings: Settings, shared_writer: Writer, pg, uid):
    job_id = f"pf-{uid}"
    result, events = job_and_events(job_id, f"user-{uid}")
    redis = aioredis.from_url(settings.redis_url)
    try:
        store = StateStore(redis, settings.result_ttl_s)
        await store.apply(events)  # what the router caches
        await produce(settings, as_values(events))
        await eventually(lambda: _count_is(pg, job_id, 1), what="the stored row")
        await redis.delete(keys.state(job_id), keys.history(job_id))  # the cache expired
        assert await store.state(job_id) is None
    finally:
        await redis.aclose()
    stored = await fetch_result(pg, job_id)
    assert stored is not None
    assert stored == result.model_dump()  # every field, timestamps included, user_id for the owner check
    assert ScanResult.model_validate(stored) == result
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    try:
        assert await fetch_result(pool, job_id) == stored  # a pool works too (what the API passes)
        assert await fetch_result(pool, f"{job_id}-unknown") is None
    finally:
        await pool.close()


async def dead_letters(s: Settings, topic: str, job_ids: set[str]) -> list[dict[str, Any]]:
    out = eco2("dlq", "list", "--topic", topic, "--limit", "0", "--json").stdout
    return [r for r in json.loads(out)["letters"] if r["job_id"] in job_ids]


async def test_poison_records_are_dead_lettered_and_replayed_after_a_fix(settings, pg, uid, tmp_path):
    s = settings.model_copy(update={"writer_max_retries": 2, "retry_backoff_s": 0.05})
    prefix = f"pp-{uid}-"
    good = [job_and_events(f"{prefix}good{i}", f"user-{uid}")[1] for i in range(2)]
    nul_result, nul_events = job_and_events(f"{prefix}nul", f"user-{uid}-nul")
    # Valid JSON and a valid result, but Postgres refuses it: jsonb cannot hold \u0000.
    nul_result = nul_result.model_copy(update={"answer": {"text": "bad\x00byte"}})
    nul_events[-1] = nul_events[-1].model_copy(update={"result": nul_result.model_dump()})
    _, bad_events = job_and_events(f"{prefix}invalid", f"user-{uid}")
    bad_value = json.loads(bad_events[-1].model_dump_json())
    del bad_value["result"]["image_url"]  # fails ScanResult validation
    values = as_values(good[0] + nul_events) + [(f"{prefix}invalid", json.dumps(bad_value).encode())]
    values += as_values(good[1])
    group = f"test-writer-poison-{uid}"
    async with running_writer(s, group):
        await produce(s, values)
        target = await end_offsets(s, EVENT_TPS)
        # The batch goes on past the poison: both good scans stored, offsets committed past all.
        await eventually(lambda: caught_up(s, group, target), what="commits past the poison records")
        assert await count(pg, f"{prefix}good") == 2
        assert await count(pg, f"{prefix}nul") == 0
        assert await count(pg, f"{prefix}invalid") == 0

        letters = await dead_letters(s, PERSISTENCE_DLQ, {f"{prefix}nul", f"{prefix}invalid"})
        # The stack's own writer reads scan.events too and may have dead-lettered the same records
        # (before or after this one, with its own retry count): take this writer's letters.
        nuls = [r for r in letters if r["job_id"] == f"{prefix}nul"]
        nul = next((r for r in nuls if r["attempts"] == s.writer_max_retries), None)
        assert nul is not None, f"no letter with this writer's {s.writer_max_retries} attempts: {nuls}"
        by_job = {r["job_id"]: r for r in letters}
        assert nul["source"] == "writer" and nul["reason"] == "postgres_rejected"
        assert "Unicode" in nul["error"]
        assert nul["value"]["result"]["answer"] == {"text": "bad\x00byte"}  # the original value
        invalid = by_job[f"{prefix}invalid"]
        assert invalid["reason"] == "invalid_result" and "image_url" in invalid["error"]
        assert invalid["value"] == bad_value

        # Replaying the unfixed invalid record is refused: it would only fail again.
        replay = ("dlq", "replay", "--topic", PERSISTENCE_DLQ, "--offset")
        proc = eco2(*replay, str(invalid["offset"]), check=False)
        assert proc.returncode == 1 and "invalid_result" in proc.stdout

        # Fix the NUL record and replay it: it is written, through scan.events and the writer.
        fixed = nul["value"]
        fixed["result"]["answer"] = {"text": "fixed"}
        path = tmp_path / "fixed.json"
        path.write_text(json.dumps(fixed))
        ref = str(nul["offset"])
        out = eco2(*replay, ref, "--set-json", str(path)).stdout
        shard = shard_of(prefix + "nul")
        assert re.search(rf"job {prefix}nul -> {EVENTS}\[{shard}\]@\d+ \(edited\)", out), out
        await eventually(lambda: _count_is(pg, f"{prefix}nul", 1), what="the replayed record's row")
        answer = await pg.fetchval("SELECT answer::text FROM scans WHERE job_id = $1", f"{prefix}nul")
        assert json.loads(answer) == {"text": "fixed"}
        # A second replay of the same offset is not done by accident.
        again = eco2(*replay, ref)
        assert "already replayed" in again.stdout
        listed = {r["offset"]: r for r in await dead_letters(s, PERSISTENCE_DLQ, {f"{prefix}nul"})}
        assert listed[nul["offset"]]["replayed"]["replays"] == 1
        assert listed[nul["offset"]]["replayed"]["edited"] is True


async def test_pipeline_dead_letter_replays_as_the_next_attempt(settings: Settings, stack_status, uid):
    """A pipeline dead letter is re-driven as the job's next attempt (issue 22): the job, attempt + 1,
    to the first stage's topic (keyed, traced), once; tests/test_redrive.py follows it to the end."""
    job = ScanJob(
        job_id=f"pd-{uid}", user_id=f"user-{uid}", image_url="https://img.example/x.jpg", model="gpt-4o-mini",
        created_at=now(), classification={"major": "recyclable", "middle": "metal"},
    )
    letter = DeadLetter(
        source="pipeline", topic=STAGE_TOPICS["rule"], key=job.job_id, value=job.model_dump(), stage="rule",
        reason="rule_error", error="test dead letter",
    )
    await produce(settings, [(job.job_id, letter.model_dump_json().encode())], topic=DLQ)
    rows = await dead_letters(settings, DLQ, {job.job_id})
    assert len(rows) == 1 and rows[0]["source"] == "pipeline" and rows[0]["reason"] == "rule_error"
    out = eco2("dlq", "replay", "--topic", DLQ, "--offset", str(rows[0]["offset"])).stdout
    first = STAGE_TOPICS[PIPELINE[0]]
    m = re.search(rf"job {job.job_id} attempt 1 -> {first}\[(\d+)\]@(\d+)", out)
    assert m, out
    partition, offset = int(m.group(1)), int(m.group(2))
    assert partition == partition_for(job.job_id, BY_NAME[first].partitions)
    c = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        tp = TopicPartition(first, partition)
        c.assign([tp])
        c.seek(tp, offset)
        msg = await asyncio.wait_for(c.getone(), 20)
    finally:
        await c.stop()
    assert msg.key == job.job_id.encode()
    assert ScanJob.model_validate_json(msg.value) == job.model_copy(update={"attempt": 1})
    assert dict(msg.headers)["traceparent"]
    again = eco2("dlq", "replay", "--topic", DLQ, "--offset", str(rows[0]["offset"])).stdout
    assert "already replayed" in again


async def test_postgres_outage_loses_and_doubles_nothing(settings, stack_status, pg, uid, tmp_path):
    """Postgres stops while events keep coming; when it is back every record lands exactly once."""
    prefix = f"po-{uid}-"
    group = f"test-writer-outage-{uid}"
    await group_at_end(settings, group)
    log = tmp_path / "writer.log"
    env = {
        **os.environ,
        "ECO2_WRITER_GROUP": group,
        "ECO2_METRICS_PORT": "0",
        "ECO2_RETRY_BACKOFF_S": "0.2",
        "ECO2_WRITER_BACKOFF_MAX_S": "1",
        "ECO2_BATCH_TIMEOUT_S": "0.5",
    }
    n = 300
    jobs = [job_and_events(f"{prefix}{i:03d}", f"user-{uid}-{i % 10}", code=f"C{i % 4}") for i in range(n)]
    with open(log, "wb") as out:
        writer = subprocess.Popen(
            [sys.executable, "-m", "persistence"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:

        async def stream() -> None:
            for i in range(0, n, 10):  # ~10 scans every 50 ms, for about 1.5 s, then more after the stop
                await produce(settings, [v for _, evs in jobs[i : i + 10] for v in as_values(evs)])
                await asyncio.sleep(0.05 if i < 100 else 0.2)

        producing = asyncio.create_task(stream())
        await eventually(lambda: _count_at_least(pg, prefix, 20), what="the first rows")
        assert await count(pg, prefix) < n, "everything landed before the outage: not mid-stream"
        await pg.close()
        eco2("stack", "down", "--only", "postgres")
        await producing  # the rest arrives while Postgres is down
        await asyncio.sleep(2)
        assert writer.poll() is None, "the writer died while Postgres was down"
    finally:
        eco2("stack", "up", "--only", "postgres")
    try:
        conn = await asyncpg.connect(settings.postgres_dsn)
        try:
            await eventually(lambda: _count_is(conn, prefix, n), timeout_s=120, what=f"{n} rows")
            target = await end_offsets(settings, EVENT_TPS)
            await eventually(lambda: caught_up(settings, group, target), what="commits after the outage")
            assert await count(conn, prefix) == n
            owned = await conn.fetch(
                "SELECT user_id, character_code, job_id FROM character_ownership WHERE user_id LIKE $1",
                f"user-{uid}-%",
            )
            # Job i grants character i%4 to user i%10: 20 pairs, each owned by its earliest job
            # (jobs finish in order, ties broken by job id), i.e. by one of jobs 0..19.
            assert {(r["user_id"], r["character_code"], r["job_id"]) for r in owned} == {
                (f"user-{uid}-{i % 10}", f"C{i % 4}", f"{prefix}{i:03d}") for i in range(20)
            }
        finally:
            await conn.close()
        assert writer.poll() is None
        text = log.read_text(errors="replace")
        assert "retry" in text, "the writer never noticed the outage"
        assert not await dead_letters(settings, PERSISTENCE_DLQ, {f"{prefix}{i:03d}" for i in range(n)})
    finally:
        writer.terminate()
        try:
            writer.wait(20)
        except subprocess.TimeoutExpired:
            writer.kill()
            writer.wait()


async def _count_at_least(pg: asyncpg.Connection, prefix: str, n: int) -> bool:
    return await count(pg, prefix) >= n
