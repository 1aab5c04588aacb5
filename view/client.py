"""The Redis clients of every component: one retry policy, and a bounded pool the client owns."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def retry_options() -> dict[str, Any]:
    """redis-py's own retry for every client of the project: a command that meets a dropped or
    stale connection (Redis restarted, a failover) reconnects and is retried with jittered backoff
    (about 2.5 s in all) instead of surfacing as an error; idle pooled connections are
    health-checked before use. Only a Redis that stays down gets past this (callers answer 503 or
    hold their work). A timeout is not retried: a hung Redis would only multiply the wait (the
    router's health probe counts on it surfacing after `socket_timeout`). Every command the
    project retries is idempotent (the Lua apply, reads, SET NX GET whose caller recognises its
    own value)."""
    backoff = ExponentialWithJitterBackoff(cap=0.5, base=0.05)
    return {
        "retry": Retry(backoff, retries=6, supported_errors=(RedisConnectionError,)),
        "retry_on_error": [RedisConnectionError],
        "health_check_interval": 5,
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
    }


def client(url: str, name: str, **kw: Any) -> aioredis.Redis:
    """A Redis client with the project's retry options (`kw` overrides them)."""
    return aioredis.from_url(url, client_name=name, **{**retry_options(), **kw})


def pooled_client(url: str, max_connections: int, name: str, **kw: Any) -> aioredis.Redis:
    """A Redis client whose requests wait for a free pooled connection instead of failing.

    redis-py's default pool raises "Too many connections" once `max_connections` are busy, which
    under load turned result polls into HTTP 500s; a bounded, blocking pool queues them instead.
    The client owns its pool (`from_pool`), so its `aclose()` hangs up every connection (a client
    handed a pool leaves it open).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, client_name=name, **{**retry_options(), **kw}
    )
    return aioredis.Redis.from_pool(pool)
