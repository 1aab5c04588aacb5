"""Issue 23: the gateway's one-Lua-call snapshot (`view.SnapshotReader`) answers exactly as
`StateStore.snapshot` (MULTI/EXEC) does, in every state a stream can open on: an unknown job, a
job under way, a finished one, after a Last-Event-ID, with the view lost, ready, rebuilding
newest first with and without the job's queued event, and for another server run."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

import view
from bench import synthetic
from contract import keys

from .gateway_support import RedisServer

pytestmark = pytest.mark.integration


async def both(r: aioredis.Redis, job_id: str, after: int, run_id: str | None) -> view.Snapshot:
    store = view.StateStore(r, 3600)
    expected = await store.snapshot(job_id, after, run_id)
    got = await view.SnapshotReader(r).read(job_id, after, run_id)
    assert got == expected
    return got


async def test_lua_snapshot_equals_the_transaction(own_redis: RedisServer) -> None:
    r = aioredis.from_url(own_redis.url)
    try:
        store = view.StateStore(r, 3600)
        done = synthetic.job("snap", 1, user="u-done")
        running = synthetic.job("snap", 2, user="u-run")
        await store.apply(synthetic.events(done))
        await store.apply(synthetic.events(running, terminal=False)[:3])
        rid = await view.run_id(r)

        lost = await both(r, done.job_id, 0, rid)  # no marker yet
        assert lost.status == "lost" and not lost.whole

        await view.mark_ready(r)
        seen = []
        for job_id in (done.job_id, running.job_id, "bench-snap-unknown"):
            for after in (0, 3, 51, 10_000):
                seen.append(await both(r, job_id, after, rid))
        assert any(s.owner and s.owner.finished for s in seen)
        assert any(s.owner and not s.owner.finished and s.history for s in seen)
        assert any(s.owner is None for s in seen)
        assert await both(r, done.job_id, 0, "another-run") != await both(r, done.job_id, 0, rid)

        # Rebuilding newest first: whole only for a job whose queued event is back.
        await r.hset(keys.VIEW, mapping={"status": "rebuilding", "order": view.marker.NEWEST_FIRST})
        assert (await both(r, done.job_id, 0, rid)).whole
        await r.zremrangebyscore(keys.history(running.job_id), 1, 1)
        assert not (await both(r, running.job_id, 0, rid)).whole
    finally:
        await r.aclose()
