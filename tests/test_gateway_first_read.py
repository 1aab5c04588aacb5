"""Issue 23: a stream's first read (`gateway/first_read.py`) answers as its two parts do alone:
the snapshot as `SnapshotReader.read`, the lease as `StreamLeases.acquire` (the cap shared with
plain acquires, a refusal, an ended lease given back first), and fails open as the lease does."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

import view
from bench import synthetic
from contract import keys
from contract.settings import Settings
from gateway.first_read import FirstRead
from quota.limits import StreamLeases

from .gateway_support import RedisServer

pytestmark = pytest.mark.integration


async def test_one_call_answers_as_the_lease_and_the_snapshot_alone(
    settings: Settings, own_redis: RedisServer
) -> None:
    s = settings.model_copy(update={"streams_max": 2, "stream_lease_s": 30, "redis_url": own_redis.url})
    r = aioredis.from_url(own_redis.url)
    user = f"u-{uuid.uuid4().hex[:8]}"
    try:
        store = view.StateStore(r, 3600)
        job = synthetic.job("first", 1, user=user)
        await store.apply(synthetic.events(job, terminal=False)[:4])
        await view.mark_ready(r)
        rid = await view.run_id(r)
        leases = StreamLeases(r, s)
        first = FirstRead(r, leases)
        for after in (0, 10):
            d, lease, snap = await first.read(user, job.job_id, after, rid)
            assert d.allowed and lease in leases.held
            assert snap == await view.SnapshotReader(r).read(job.job_id, after, rid)
            assert snap.whole and snap.owner is not None and snap.owner.user_id == user
        refused, none, snap = await first.read(user, job.job_id, 0, rid)  # the cap of 2 is reached
        assert refused.refused == "streams" and none is None and snap is not None
        assert (await leases.acquire(user))[0].refused == "streams"  # one cap for both ways in
        leases.release(lease)  # the second stream ends: its lease waits for the batch ...
        d, third, _ = await first.read(user, job.job_id, 0, rid)  # ... and goes back first here
        assert d.allowed and d.streams_left == 0 and user not in leases.ended
        held = {str(x, 'utf-8') for x in await r.zrange(keys.quota_streams(user), 0, -1)}  # type: ignore[arg-type]
        assert lease not in held and third in held and len(held) == 2
    finally:
        await r.aclose()


async def test_no_answer_admits_unchecked_and_keeps_the_ended_leases(settings: Settings) -> None:
    s = settings.model_copy(update={"streams_max": 2, "quota_timeout_s": 0.5})
    r = aioredis.from_url("redis://127.0.0.1:1/0")
    try:
        leases = StreamLeases(r, s)
        leases.ended["u"] = ["old-lease"]
        d, lease, snap = await FirstRead(r, leases).read("u", "job", 0, None)
        assert d.allowed and d.skipped and lease is None and snap is None
        assert leases.ended == {"u": ["old-lease"]}  # given back by the next batch instead
        leases._flush_at.cancel()  # type: ignore[union-attr]  # nothing to flush against port 1
    finally:
        await r.aclose()


async def test_other_users_ended_leases_go_back_with_a_first_read(
    settings: Settings, own_redis: RedisServer
) -> None:
    """Streams of other users ended meanwhile: their leases leave Redis with the next stream's
    first read (no release call of their own); the reader's own lease is taken as before."""
    s = settings.model_copy(update={"streams_max": 2, "stream_lease_s": 30, "redis_url": own_redis.url})
    r = aioredis.from_url(own_redis.url)
    tag = uuid.uuid4().hex[:8]
    reader, others = f"r-{tag}", [f"o{i}-{tag}" for i in range(3)]
    try:
        store = view.StateStore(r, 3600)
        job = synthetic.job("fold", 1, user=reader)
        await store.apply(synthetic.events(job, terminal=False)[:2])
        await view.mark_ready(r)
        rid = await view.run_id(r)
        leases = StreamLeases(r, s)
        held = {u: [(await leases.acquire(u))[1] for _ in range(2)] for u in others}
        for u in others:
            leases.release(held[u][0])  # one of each user's two streams ends
        assert set(leases.ended) == set(others)
        d, mine, snap = await FirstRead(r, leases).read(reader, job.job_id, 0, rid)
        assert d.allowed and mine is not None and snap is not None and snap.owner is not None
        assert leases.ended == {}
        for u in others:
            left = {x.decode() for x in await r.zrange(keys.quota_streams(u), 0, -1)}  # type: ignore[union-attr]
            assert left == {held[u][1]}  # the ended one went back, the open one stays
        assert (await r.zrange(keys.quota_streams(reader), 0, -1)) == [mine.encode()]
        await leases.flush()  # the batch timer's call: nothing left to give back
    finally:
        await r.aclose()


async def test_no_answer_keeps_the_other_users_ended_leases(settings: Settings) -> None:
    s = settings.model_copy(update={"streams_max": 2, "quota_timeout_s": 0.5})
    r = aioredis.from_url("redis://127.0.0.1:1/0")
    try:
        leases = StreamLeases(r, s)
        leases.ended["other"] = ["a", "b"]
        d, lease, _ = await FirstRead(r, leases).read("u", "job", 0, None)
        assert d.allowed and d.skipped and lease is None
        assert leases.ended == {"other": ["a", "b"]}  # given back by the next batch instead
        leases._flush_at.cancel()  # type: ignore[union-attr]
    finally:
        await r.aclose()
