"""Per-user quotas against the stack's real Redis (quota/limits.py), bounded identities, and the
fail-open path when Redis does not answer."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from contract import identity, keys
from contract.events import ScanJob, make_event, now
from contract.settings import Settings
from quota import refusal
from quota.limits import ScanQuota, StreamLeases
from view import StateStore, client


def test_identity_bounds() -> None:
    assert identity.problem("auth0|64b1f0e2", 128) is None
    assert identity.problem("alice@example.com", 128) is None
    assert identity.problem("a" * 129, 128) == "is longer than 128 characters"
    for bad in ("", "a b", "a/b", 'a"b', "é", "a\nb"):
        assert identity.problem(bad, 128) is not None, bad


def _tight(settings: Settings, **kw: object) -> Settings:
    base = dict(scan_burst=2, scan_rate_per_min=60.0, inflight_max=3, streams_max=2, stream_lease_s=2)
    return settings.model_copy(update={**base, **kw})


async def test_bucket_refuses_then_refills(settings: Settings) -> None:
    s = _tight(settings, inflight_max=0)
    redis = client(s.redis_url, "test-quota")
    user = f"q-{uuid.uuid4().hex[:8]}"
    try:
        quota = ScanQuota(redis, s)
        first = [await quota.take(user, uuid.uuid4().hex) for _ in range(2)]
        assert all(d.allowed for d in first)
        refused = await quota.take(user, uuid.uuid4().hex)
        assert refused.refused == "scans" and refused.retry_after_s == 1
        h = refusal.headers(refused, s, refusal.scan_policy(s))
        assert h["Retry-After"] == "1" and h["RateLimit"] == '"scans";r=0;t=1'
        assert h["RateLimit-Policy"] == '"scans";q=2;w=2'
        await asyncio.sleep(1.2)  # 60/min: one token a second
        assert (await quota.take(user, uuid.uuid4().hex)).allowed
    finally:
        await redis.aclose()


async def test_inflight_released_by_the_terminal_event(settings: Settings) -> None:
    s = _tight(settings, scan_burst=0, inflight_max=1)
    redis = client(s.redis_url, "test-quota")
    user = f"q-{uuid.uuid4().hex[:8]}"
    try:
        quota = ScanQuota(redis, s)
        job = ScanJob(
            job_id=uuid.uuid4().hex,
            user_id=user,
            image_url="https://x.example.com/a.jpg",
            model="gpt-4o-mini",
            created_at=now(),
        )
        assert (await quota.take(user, job.job_id)).allowed
        assert (await quota.take(user, uuid.uuid4().hex)).refused == "inflight"
        store = StateStore(redis, 60)
        await store.apply([make_event(job, "queued", "completed")])  # not terminal: still held
        assert (await quota.take(user, uuid.uuid4().hex)).refused == "inflight"
        await store.apply([make_event(job, "done", "completed")])  # what the router applies
        assert (await quota.take(user, uuid.uuid4().hex)).allowed
    finally:
        await redis.aclose()


async def test_stream_leases_shared_and_expire(settings: Settings) -> None:
    """Two gateways share one cap; leases of a gateway that stops renewing (killed) expire."""
    s = _tight(settings)
    redis = client(s.redis_url, "test-quota")
    user = f"q-{uuid.uuid4().hex[:8]}"
    try:
        a, b = StreamLeases(redis, s), StreamLeases(redis, s)
        da, lease_a = await a.acquire(user)
        db, _ = await b.acquire(user)
        assert da.allowed and db.allowed
        refused, _ = await b.acquire(user)
        assert refused.refused == "streams"
        a.release(lease_a)
        await asyncio.sleep(0.2)
        assert (await a.acquire(user))[0].allowed
        await asyncio.sleep(s.stream_lease_s + 0.5)  # nobody renews: both leases lapse
        assert (await b.acquire(user))[0].allowed
        assert await redis.zcard(keys.quota_streams(user)) == 1
    finally:
        await redis.aclose()


async def test_ended_stream_leases_go_back_in_one_batch(settings: Settings) -> None:
    """Ended streams' leases stop being renewed at once and go back to Redis together: several
    users' leases in one flush, none left behind."""
    s = _tight(settings, streams_max=5)
    redis = client(s.redis_url, "test-quota")
    users = [f"q-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        leases = StreamLeases(redis, s)
        taken = [(u, (await leases.acquire(u))[1]) for u in users for _ in range(2)]
        for u in users:
            assert await redis.zcard(keys.quota_streams(u)) == 2
        for _, lease in taken[:3]:
            leases.release(lease)
        assert sorted(leases.ended) == sorted(users) and len(leases.held) == 1  # not renewed any more
        leases.release(taken[0][1])  # a second release of one stream is a no-op
        await leases.flush()
        assert leases.ended == {}
        assert await redis.zcard(keys.quota_streams(users[0])) == 0
        assert await redis.zrange(keys.quota_streams(users[1]), 0, -1) == [str(taken[3][1]).encode()]
        leases.release(taken[3][1])
        await asyncio.sleep(0.5)  # the batch window (RELEASE_BATCH_S) passes: flushed unasked
        assert await redis.zcard(keys.quota_streams(users[1])) == 0
    finally:
        await redis.aclose()


async def test_no_release_call_of_its_own_while_streams_keep_opening(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While first reads keep coming (`others_ended`, which carries the ended leases), the batch
    timer makes no call of its own, even for a lease that ended after the last of them; once
    they stop, what is left goes back within two batches. (Batches of 0.5 s here, for margins.)"""
    from quota import limits

    monkeypatch.setattr(limits, "RELEASE_BATCH_S", 0.5)
    s = _tight(settings, streams_max=5)
    redis = client(s.redis_url, "test-quota")
    users = [f"q-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    try:
        leases = StreamLeases(redis, s)
        calls: list[int] = []
        release = leases._release

        async def counted(**kw: object) -> object:
            calls.append(1)
            return await release(**kw)  # type: ignore[arg-type]

        leases._release = counted  # type: ignore[assignment]
        (a, la), (b, lb), (c, lc) = [(u, (await leases.acquire(u))[1]) for u in users]
        leases.release(la)  # t=0: the batch timer is set for t=0.5
        await asyncio.sleep(0.3)
        carried = leases.others_ended()  # t=0.3: a stream opens, its first read carries la
        await asyncio.sleep(0.05)
        leases.release(lb)  # t=0.35: ends after that first read
        await asyncio.sleep(0.25)  # t=0.5: the timer finds lb, but a stream opened 0.2 s ago
        assert calls == [] and leases.ended == {b: [lb]}
        carried += leases.others_ended()  # t=0.6: the next first read carries lb
        assert sorted(carried) == sorted([(a, la), (b, lb)])
        leases.release(lc)  # no stream opens from now on
        await asyncio.sleep(1.2)  # the timer looks again at t=1.0 (deferred) and sends at t=1.5
        assert calls == [1] and leases.ended == {}
        assert await redis.zcard(keys.quota_streams(c)) == 0
    finally:
        await redis.aclose()


async def test_a_user_at_the_cap_who_ends_a_stream_may_open_another_at_once(settings: Settings) -> None:
    """The ended lease still waiting for its batch goes back in the user's next acquire, before
    the cap is checked: never a 429 for a slot this gateway already gave up."""
    s = _tight(settings)  # streams_max=2
    redis = client(s.redis_url, "test-quota")
    user = f"q-{uuid.uuid4().hex[:8]}"
    try:
        leases = StreamLeases(redis, s)
        _, first = await leases.acquire(user)
        await leases.acquire(user)
        assert (await leases.acquire(user))[0].refused == "streams"
        leases.release(first)
        d, third = await leases.acquire(user)
        assert d.allowed and d.streams_left == 0 and user not in leases.ended
        held = {str(x, 'utf-8') for x in await redis.zrange(keys.quota_streams(user), 0, -1)}  # type: ignore[arg-type]
        assert first not in held and third in held and len(held) == 2
    finally:
        await redis.aclose()


@pytest.mark.parametrize("kind", ["scans", "streams"])
async def test_redis_down_fails_open(settings: Settings, kind: str) -> None:
    s = _tight(settings, redis_url="redis://127.0.0.1:1/0", quota_timeout_s=0.5)
    redis = client(s.redis_url, "test-quota")
    try:
        if kind == "scans":
            d = await ScanQuota(redis, s).take("u", "j")
        else:
            d, _ = await StreamLeases(redis, s).acquire("u")
        assert d.allowed and d.skipped
        assert refusal.headers(d, s, refusal.scan_policy(s)) == {}
    finally:
        await redis.aclose()
