"""Issue 16: what a job leaves in Redis is bounded by the TTLs, and a finished job's are short.

The soak found Redis holding every job of the last 24 hours (~27 KiB each: at 100 VUs it would
have levelled off at ~12 GiB, more than half the box, with no maxmemory): a finished job's state
and history kept the running TTL. They now keep `result_ttl_s` once the job has ended (its result
then comes from Postgres), whatever arrives after the terminal event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from contract import keys
from contract.settings import Settings
from view import StateStore

from .gateway_support import full_events, isolated_redis_url, job

pytestmark = pytest.mark.integration

RUNNING, FINISHED = 86400, 600


@pytest.fixture
async def rdb(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(isolated_redis_url(settings))  # a private redis-server of the tests
    yield r
    await r.aclose()


async def ttls(r: aioredis.Redis, job_id: str) -> tuple[int, int]:
    return await r.ttl(keys.state(job_id)), await r.ttl(keys.history(job_id))


@pytest.mark.parametrize("fail_at", [None, "answer"])
async def test_finished_jobs_keep_the_short_ttl(rdb: aioredis.Redis, uid: str, fail_at: str | None) -> None:
    store = StateStore(rdb, RUNNING, FINISHED)
    j = job(uid)
    events = full_events(j, fail_at=fail_at)
    await store.apply(events[:-1])
    assert all(FINISHED < t <= RUNNING for t in await ttls(rdb, j.job_id))  # running: the long TTL
    await store.apply(events[-1:])
    assert all(0 < t <= FINISHED for t in await ttls(rdb, j.job_id))
    # a redelivered or replayed earlier event does not give a finished job its day back
    assert await store.apply(events[1:3]) == [False, False]
    assert all(0 < t <= FINISHED for t in await ttls(rdb, j.job_id))
    # nor does the terminal event arriving before the ones it follows (out of order on replay)
    k = job(uid)
    late = full_events(k)
    await store.apply([late[-1], *late[:-1]])
    assert all(0 < t <= FINISHED for t in await ttls(rdb, k.job_id))
    await rdb.delete(*(f(x.job_id) for x in (j, k) for f in (keys.state, keys.history)))


async def test_a_replayed_old_job_keeps_only_what_is_left_of_its_finished_ttl(
    rdb: aioredis.Redis, uid: str
) -> None:
    """A rebuild replays up to a day of `scan.events`: jobs that ended long ago must not come
    back for another `result_ttl_s` (Redis would hold a day of jobs again, the soak's finding)."""
    store = StateStore(rdb, RUNNING, FINISHED)
    old, recent = job(uid), job(uid)
    now = time.time()
    aged = [e.model_copy(update={"ts": now - 2 * FINISHED - 60 + e.seq}) for e in full_events(old)]
    await store.apply(aged[:-1])
    assert all(FINISHED < t <= RUNNING for t in await ttls(rdb, old.job_id))  # still running: kept
    await store.apply(aged[-1:])
    assert all(t in (-2, 1) for t in await ttls(rdb, old.job_id))  # ended long ago: gone within 1 s
    ended = [e.model_copy(update={"ts": now - FINISHED / 2}) for e in full_events(recent)]
    await store.apply(ended)
    assert all(FINISHED / 2 - 5 <= t <= FINISHED / 2 + 1 for t in await ttls(rdb, recent.job_id))
    await rdb.delete(*(f(x.job_id) for x in (old, recent) for f in (keys.state, keys.history)))


async def test_one_ttl_when_no_finished_ttl_is_given(rdb: aioredis.Redis, uid: str) -> None:
    store = StateStore(rdb, 1234)
    j = job(uid)
    await store.apply(full_events(j))
    assert all(1200 < t <= 1234 for t in await ttls(rdb, j.job_id))
    await rdb.delete(keys.state(j.job_id), keys.history(j.job_id))


def test_memos_live_hours_and_finished_jobs_an_hour_by_default() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.result_ttl_s == 3600 and s.state_ttl_s == 24 * 3600
    assert 3600 <= s.memo_ttl_s <= 6 * 3600
