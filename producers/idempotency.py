"""`X-Idempotency-Key`: a POST retried with the same key and body gets the first job back.

The key is claimed with one SET NX GET holding "<job id> <body fingerprint>": of two concurrent
POSTs only one creates a job, the other reads the winner's value. A failed POST forgets its claim
so the client's retry with the same key may create the job after all.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import RedisError

Outcome = Literal["new", "replay", "conflict"]


@dataclass(frozen=True, slots=True)
class Claim:
    """`new`: this request owns the key (job_id is its own); `replay`: the same body came with the
    key before (job_id is that job: answer as then); `conflict`: another body did (409)."""

    outcome: Outcome
    job_id: str


def fingerprint(request: BaseModel) -> str:
    """What makes two POSTs the same request: their validated body."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


def decide(existing: bytes | str | None, job_id: str, fp: str) -> Claim:
    """The outcome given the key's value before this request's SET NX GET (None: it was free)."""
    if existing is None:
        return Claim("new", job_id)
    text = existing.decode() if isinstance(existing, bytes) else existing
    first_job, _, first_fp = text.partition(" ")
    if first_job == job_id:  # redis-py retried a SET whose reply was lost: still ours
        return Claim("new", job_id)
    return Claim("replay" if first_fp == fp else "conflict", first_job)


async def claim(redis: aioredis.Redis, key: str, job_id: str, fp: str, ttl_s: int) -> Claim:
    """Claim `key` for `job_id` (atomic: SET NX GET), or learn which job holds it."""
    existing = await redis.set(key, f"{job_id} {fp}", nx=True, get=True, ex=ttl_s)
    return decide(None if isinstance(existing, bool) else existing, job_id, fp)


async def forget(redis: aioredis.Redis, key: str) -> None:
    """Free a claim whose job was not created (best effort: the key expires anyway)."""
    with contextlib.suppress(RedisError):
        await redis.delete(key)
