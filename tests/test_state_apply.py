"""Issues 19 and 23: `StateStore.apply` is one round trip and one script call per batch (of up to
`APPLY_BATCH` events), and survives Redis losing its scripts.

redis-py's registered scripts ask `SCRIPT EXISTS` before every pipeline that runs them: a second
round trip for each router batch and each POST. The batch is now sent as plain EVALSHA calls,
and a NOSCRIPT answer (a restarted Redis) loads the script and sends the refused calls again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from contract import keys
from contract.settings import Settings
from contract.topics import shard_of
from view import StateStore
from view.state import APPLY_BATCH

from .gateway_support import full_events, isolated_redis_url, job

pytestmark = pytest.mark.integration


@pytest.fixture
async def rdb(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(isolated_redis_url(settings))  # a private redis-server of the tests
    yield r
    await r.aclose()


async def calls(r: aioredis.Redis, command: str) -> int:
    stats = await r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_batch_is_evalsha_only(rdb: aioredis.Redis, uid: str) -> None:
    store = StateStore(rdb, 600)
    events = full_events(job(uid))
    await store.apply(events[:1])  # the script is in Redis' cache from here on
    exists, evalsha = await calls(rdb, "script|exists"), await calls(rdb, "evalsha")
    assert await store.apply(events) == [False] + [True] * (len(events) - 1)
    assert await calls(rdb, "script|exists") == exists  # no extra round trip
    assert await calls(rdb, "evalsha") == evalsha + 1  # one script call for the whole batch


async def test_a_long_batch_of_many_jobs_in_a_few_calls_keeps_each_events_answer(
    rdb: aioredis.Redis, uid: str
) -> None:
    """Events of many jobs, interleaved, over several script calls: each answer is its own event's
    (new, or a repeat within the same batch), and each job's history and state are whole."""
    store = StateStore(rdb, 600)
    jobs = [job(f"{uid}-{i}") for i in range(30)]
    per_job = [full_events(j) for j in jobs]
    batch = [ev for step in zip(*per_job, strict=True) for ev in step]  # round robin over the jobs
    batch[5:5] = [batch[0], batch[1]]  # two repeats inside the batch
    assert len(batch) > 2 * APPLY_BATCH
    evalsha = await calls(rdb, "evalsha")
    answers = await store.apply(batch)
    assert await calls(rdb, "evalsha") == evalsha + -(-len(batch) // APPLY_BATCH)
    assert answers == [i not in (5, 6) for i in range(len(batch))]
    for j, events in zip(jobs, per_job, strict=True):
        assert [e.seq for e in await store.history(j.job_id)] == [e.seq for e in events]
        state = await store.state(j.job_id)
        assert state is not None and state["seq"] == events[-1].seq and state["status"] == events[-1].status
    assert await store.apply(batch) == [False] * len(batch)  # idempotent


async def test_apply_after_redis_lost_its_scripts(rdb: aioredis.Redis, uid: str) -> None:
    j = job(uid)
    events = full_events(j)
    store = StateStore(rdb, 600)
    channel = keys.shard_channel(shard_of(j.job_id))
    pubsub = rdb.pubsub()
    await pubsub.subscribe(channel)
    try:
        await store.apply(events[:2])
        await rdb.script_flush()  # as after a restart of Redis
        assert await store.apply(events) == [False, False] + [True] * (len(events) - 2)
        assert await store.apply(events) == [False] * len(events)  # idempotent
        history = await store.history(j.job_id)
        assert [e.seq for e in history] == [e.seq for e in events]
        state = await store.state(j.job_id)
        assert state is not None and state["seq"] == events[-1].seq
        published: list[bytes] = []
        async with asyncio.timeout(5):
            while len(published) < len(events):
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    published += keys.live_events(msg["data"])
        await asyncio.sleep(0.2)
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None  # once each
        assert published == [e.model_dump_json().encode() for e in events]
    finally:
        await pubsub.aclose()


async def test_other_errors_still_raise(rdb: aioredis.Redis, uid: str) -> None:
    j = job(uid)
    await rdb.set(keys.history(j.job_id), "not a sorted set")
    with pytest.raises(aioredis.ResponseError):
        await StateStore(rdb, 600).apply(full_events(j)[:1])


async def test_forget_queued_removes_only_a_job_that_got_no_further(rdb: aioredis.Redis, uid: str) -> None:
    """The API takes back the queued state it cached for a job whose transaction failed; a job
    whose later events are applied (its transaction committed after all) keeps everything."""
    store = StateStore(rdb, 600)
    stuck, moved = job(f"{uid}-stuck"), job(f"{uid}-moved")
    await store.apply(full_events(stuck)[:1])  # queued only
    await store.apply(full_events(moved)[:2])  # queued, then the next event
    assert await store.forget_queued(stuck.job_id) is True
    assert not await rdb.exists(keys.state(stuck.job_id), keys.history(stuck.job_id))
    assert await store.forget_queued(moved.job_id) is False
    assert await rdb.exists(keys.state(moved.job_id), keys.history(moved.job_id)) == 2
    assert await store.forget_queued(f"{uid}-never") is False
