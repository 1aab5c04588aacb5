"""Issue 23, round 5: the apply script (view/state.py) spends as few Redis calls per event as its
guarantees allow, and each shortcut keeps the guarantee it stands for.

- one PUBLISH per shard channel per script call, carrying the call's new events of that shard in
  order (`keys.live_message`), read back event by event by the gateway's shard feed;
- a running job's keys get their TTL when it must change (first event, reopen, less than
  `RENEW_AT` of it left), not on every event; a finished job's on every event, as before;
- the history is asked (ZCOUNT) only for an event at or below the state's seq, or without state;
- the result is deleted only from a state that had ended; the hash does not keep the event JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from contract import keys
from contract.settings import Settings
from contract.topics import shard_of
from gateway.shard_feed import open_feed
from view import StateStore
from view.state import APPLY_BATCH, RENEW_AT

from .gateway_support import full_events, isolated_redis_url, job

pytestmark = pytest.mark.integration

RUNNING, FINISHED = 86400, 600


@pytest.fixture
async def rdb(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(isolated_redis_url(settings))  # a private redis-server of the tests
    yield r
    await r.aclose()


async def calls(r: aioredis.Redis, command: str) -> int:
    stats = await r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def ttls(r: aioredis.Redis, job_id: str) -> tuple[int, int]:
    return await r.ttl(keys.state(job_id)), await r.ttl(keys.history(job_id))


async def test_one_publish_per_shard_per_call_read_back_in_order_by_the_feed(
    settings: Settings, rdb: aioredis.Redis, uid: str
) -> None:
    """Events of many jobs over several calls: each call publishes once per shard it touched; the
    gateway's feed hands every new event, once, in the order applied within its shard; a repeat
    (in the batch, or the whole batch again) is not published."""
    url = isolated_redis_url(settings)
    channels = [keys.shard_channel(i) for i in range(4)]
    got: list[bytes] = []
    subscribed = asyncio.Event()
    feed = await open_feed(url, channels, got.append, subscribed.set, f"test-calls-{uid}")
    try:
        await asyncio.wait_for(subscribed.wait(), 5)
        store = StateStore(rdb, RUNNING, FINISHED)
        jobs = [job(f"{uid}-{i}") for i in range(25)]
        per_job = [full_events(j) for j in jobs]
        batch = [ev for step in zip(*per_job, strict=True) for ev in step]  # round robin
        batch[3:3] = [batch[0]]  # a repeat inside the batch
        n_calls = -(-len(batch) // APPLY_BATCH)
        shards_per_call = [
            len({shard_of(e.job_id) for e in batch[c * APPLY_BATCH : (c + 1) * APPLY_BATCH]})
            for c in range(n_calls)
        ]
        publish = await calls(rdb, "publish")
        assert await store.apply(batch) == [i != 3 for i in range(len(batch))]
        assert await calls(rdb, "publish") == publish + sum(shards_per_call)
        new = [e for i, e in enumerate(batch) if i != 3]
        async with asyncio.timeout(5):
            while len(got) < len(new):
                await asyncio.sleep(0.01)
        for shard in range(4):
            mine = [e.model_dump_json().encode() for e in new if shard_of(e.job_id) == shard]
            assert [m for m in got if shard_of(_job_id(m)) == shard] == mine
        assert await store.apply(batch) == [False] * len(batch)
        await asyncio.sleep(0.2)
        assert len(got) == len(new) and feed.messages == len(new)  # nothing new: nothing published
    finally:
        feed.close()


def _job_id(raw: bytes) -> str:
    return str(json.loads(raw)["job_id"])


async def test_a_running_job_gets_its_ttl_once_not_per_event(rdb: aioredis.Redis, uid: str) -> None:
    store = StateStore(rdb, RUNNING, FINISHED)
    j = job(uid)
    events = full_events(j)
    expire = await calls(rdb, "expire")
    for ev in events[:-1]:  # one call each, as a router applying one event at a time
        await store.apply([ev])
    assert await calls(rdb, "expire") == expire + 2  # the first event's, for both keys
    assert all(RUNNING - 5 < t <= RUNNING for t in await ttls(rdb, j.job_id))
    await store.apply(events[-1:])  # ended: the finished TTL at once
    assert await calls(rdb, "expire") == expire + 4
    assert all(0 < t <= FINISHED for t in await ttls(rdb, j.job_id))
    state = await store.state(j.job_id)
    fields = {"seq", "stage", "status", "progress", "user_id", "v", "result"}
    assert state is not None and set(state) == fields  # the script's own fields stay inside
    assert not await rdb.hexists(keys.state(j.job_id), "event")  # the history holds the event


async def test_a_running_job_whose_ttl_ran_low_gets_it_back(rdb: aioredis.Redis, uid: str) -> None:
    """A job running long past its first event: once less than RENEW_AT of the running TTL is left,
    the next event pushes both keys back to the whole TTL (the keys never expire under it)."""
    store = StateStore(rdb, RUNNING, FINISHED)
    j = job(uid)
    events = full_events(j)
    await store.apply(events[:2])
    # As if the job had run for a while: the deadline (hash and keys) just under RENEW_AT away.
    left = int(RENEW_AT * RUNNING) - 100
    await rdb.hset(keys.state(j.job_id), "exp", int(time.time()) + left)
    for k in (keys.state(j.job_id), keys.history(j.job_id)):
        await rdb.expire(k, left)
    await store.apply(events[2:3])
    assert all(RUNNING - 5 < t <= RUNNING for t in await ttls(rdb, j.job_id))
    # with more than RENEW_AT left, an event leaves it be
    keep = int(RENEW_AT * RUNNING) + 100
    await rdb.hset(keys.state(j.job_id), "exp", int(time.time()) + keep)
    for k in (keys.state(j.job_id), keys.history(j.job_id)):
        await rdb.expire(k, keep)
    await store.apply(events[3:4])
    assert all(keep - 5 < t <= keep for t in await ttls(rdb, j.job_id))


async def test_a_failed_job_reopened_gets_the_running_ttl_and_loses_its_result(
    rdb: aioredis.Redis, uid: str
) -> None:
    store = StateStore(rdb, RUNNING, FINISHED)
    j = job(uid)
    failed = full_events(j, fail_at="rule")
    await store.apply(failed)
    assert all(0 < t <= FINISHED for t in await ttls(rdb, j.job_id))
    assert "result" in (await store.state(j.job_id) or {})
    again = full_events(j.model_copy(update={"attempt": 1}))
    await store.apply(again[:1])
    assert all(RUNNING - 5 < t <= RUNNING for t in await ttls(rdb, j.job_id))
    assert "result" not in (await store.state(j.job_id) or {})
    await store.apply(again[1:])
    st = await store.state(j.job_id)
    assert st is not None and st["stage"] == "done" and "result" in st
    assert all(0 < t <= FINISHED for t in await ttls(rdb, j.job_id))


async def test_the_history_is_asked_only_at_or_below_the_states_seq(rdb: aioredis.Redis, uid: str) -> None:
    """Past the state's seq an event is new without a ZCOUNT; a repeat, or any event of a job whose
    state hash is gone while its history is not, is checked against the history: no seq twice."""
    store = StateStore(rdb, RUNNING, FINISHED)
    j = job(uid)
    events = full_events(j)
    await store.apply(events[:1])  # no state yet: asked
    zcount = await calls(rdb, "zcount")
    assert await store.apply(events[1:]) == [True] * (len(events) - 1)
    assert await calls(rdb, "zcount") == zcount  # each past the state's seq
    assert await store.apply(events[2:4]) == [False, False]
    assert await calls(rdb, "zcount") == zcount + 2
    await rdb.delete(keys.state(j.job_id))  # the state hash lost, the history kept
    changed = [e.model_copy(update={"ts": e.ts + 1}) for e in events]  # same seqs, other bytes
    assert await store.apply(changed) == [False] * len(events)
    assert [e.seq for e in await store.history(j.job_id)] == [e.seq for e in events]
    assert [e.ts for e in await store.history(j.job_id)] == [e.ts for e in events]  # the first kept


async def test_a_jobs_history_stays_a_listpack(rdb: aioredis.Redis, uid: str) -> None:
    """Redis as eco2/infra.py runs it keeps a history of event JSONs longer than Redis's default
    64-byte limit in a listpack (cheaper to insert into, a quarter less memory), and serves it
    the same: in seq order, ranges by seq."""
    store = StateStore(rdb, RUNNING, FINISHED)
    j = job(uid)
    events = full_events(j)
    assert min(len(e.model_dump_json()) for e in events) > 64
    await store.apply(events)
    assert await rdb.object("encoding", keys.history(j.job_id)) == b"listpack"
    assert [e.seq for e in await store.history(j.job_id, events[3].seq)] == [e.seq for e in events[4:]]
