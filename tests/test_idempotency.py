"""X-Idempotency-Key (producers/idempotency.py): the decision alone, then the claim on real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from contract import keys
from contract.events import ScanRequest
from contract.settings import Settings
from producers import idempotency
from producers.idempotency import Claim, decide
from view import client


def test_a_free_key_is_ours() -> None:
    assert decide(None, "job1", "fp") == Claim("new", "job1")


def test_our_own_value_back_is_still_ours() -> None:
    """redis-py retried a SET NX GET whose reply was lost: the value it reads is the one it wrote."""
    assert decide(b"job1 fp", "job1", "fp") == Claim("new", "job1")


def test_same_body_replays_the_first_job() -> None:
    assert decide(b"job0 fp", "job1", "fp") == Claim("replay", "job0")
    assert decide("job0 fp", "job1", "fp") == Claim("replay", "job0")


def test_another_body_conflicts() -> None:
    assert decide(b"job0 other", "job1", "fp") == Claim("conflict", "job0")


def test_fingerprint_is_the_body() -> None:
    a = ScanRequest(image_url="https://images.example.com/a.jpg")
    b = ScanRequest(image_url="https://images.example.com/b.jpg")
    assert idempotency.fingerprint(a) == idempotency.fingerprint(a.model_copy())
    assert idempotency.fingerprint(a) != idempotency.fingerprint(b)


@pytest.mark.integration
async def test_concurrent_claims_make_one_job(settings: Settings) -> None:
    redis = client(settings.redis_url, "test-idempotency")
    key = keys.idempotency(f"idem-{uuid.uuid4().hex[:8]}", "retry-1")
    try:
        jobs = [uuid.uuid4().hex for _ in range(8)]
        claims = await asyncio.gather(*(idempotency.claim(redis, key, j, "fp", 60) for j in jobs))
        new = [c for c in claims if c.outcome == "new"]
        assert len(new) == 1
        assert all(c == Claim("replay", new[0].job_id) for c in claims if c.outcome != "new")
        other = await idempotency.claim(redis, key, uuid.uuid4().hex, "other", 60)
        assert other == Claim("conflict", new[0].job_id)
        await idempotency.forget(redis, key)  # a failed POST frees the key for the retry
        assert (await idempotency.claim(redis, key, "job-x", "other", 60)) == Claim("new", "job-x")
    finally:
        await redis.delete(key)
        await redis.aclose()
