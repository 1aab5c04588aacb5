"""Per-user quotas in Redis: scan token bucket, jobs in flight, stream leases.

Each check is one Lua call, so every API and gateway replica enforces one limit per user (not
one per replica) and two concurrent requests cannot both take the last slot. Time is Redis's
own (`TIME`), so replicas with skewed clocks agree.

- scans: a token bucket of `scan_burst` tokens refilled at `scan_rate_per_min`;
- in flight: at most `inflight_max` jobs between their POST and their terminal event. The POST
  adds the job, the router removes it when it applies the terminal event (view/state.py); a
  job also drops out after `inflight_lease_s`, so nothing is held forever if that event never
  reaches Redis (a flushed view);
- streams: at most `streams_max` open streams across all gateways; each is a lease its gateway
  renews every `stream_lease_s / 3`, so a gateway killed -9 leaks its slots for one lease at most.
  Ended streams' leases are given back in batches (one call per `RELEASE_BATCH_S`, or folded
  into the same user's next acquire, which must not see them, or into any stream's first read,
  `gateway/first_read.py`), not one ZREM per stream end.

When Redis does not answer within `quota_timeout_s` a check is skipped (fail open): the quotas
protect the model budget and the gateways from one user, they must not turn a Redis outage into
an outage of every user (docs/operations.md, "Quotas").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import uuid
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from contract import keys
from contract.settings import Settings

log = logging.getLogger("eco2.quota")

Limit = Literal["scans", "inflight", "streams"]
# A concurrency limit has no window: how long a refused client should wait before trying again
# (a third of a scan at the hosted model's pace), at most until the oldest slot's lease ends.
CONCURRENCY_RETRY_S = 5

REFUSED = Counter("eco2_quota_refused_total", "requests refused by a per-user quota (429)", ["limit"])
SKIPPED = Counter(
    "eco2_quota_skipped_total", "quota checks skipped because Redis did not answer (fail open)", ["limit"]
)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: bucket, in-flight set. ARGV: burst, tokens per ms, in-flight cap, job id, lease ms.
# Returns {refused limit or '', tokens left, in-flight slots left, retry ms, ms to a full bucket}.
_SUBMIT = (
    _NOW
    + """
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
local busy = 0
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  busy = redis.call('ZCARD', KEYS[2])
  if busy >= cap then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {'inflight', 0, 0, tonumber(first[2]) - now, 0}
  end
end
local tokens = burst
if burst > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  if b[1] then
    tokens = math.min(burst, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate)
  end
  if tokens < 1 then
    return {'scans', 0, cap - busy, math.ceil((1 - tokens) / rate), math.ceil((burst - tokens) / rate)}
  end
  tokens = tokens - 1
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1000)
end
if cap > 0 then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], lease)
  busy = busy + 1
end
local full = 0
if burst > 0 then full = math.ceil((burst - tokens) / rate) end
return {'', math.floor(tokens), cap - busy, 0, full}
"""
)

# KEYS: the user's stream leases. ARGV: cap, lease id, lease ms, then leases of the user's ended
# streams (given back first). Returns {1 taken | 0 refused, slots left, ms until the oldest ends}.
# Also run inside the gateway's first read of a stream (gateway/first_read.py).
STREAM_LUA = (
    _NOW
    + """
local cap = tonumber(ARGV[1])
if #ARGV > 3 then redis.call('ZREM', KEYS[1], unpack(ARGV, 4)) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= cap then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, 0, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, cap - n - 1, 0}
"""
)

# KEYS: lease sets. ARGV: lease ms, then one lease id per key. Renews the leases still held.
_RENEW = (
    _NOW
    + """
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""
)


# KEYS: lease sets. ARGV: one lease id per key. Gives back the leases of ended streams.
_RELEASE = """
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[i])
end
return #KEYS
"""

RELEASE_BATCH_S = 0.05  # ended streams' leases wait at most this long to be given back together
RELEASE_BATCH_MAX = 500  # leases per release call


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check: allowed or the limit that refused, and what the headers say."""

    refused: Limit | None = None
    scans_left: int | None = None  # tokens left in the bucket (None: no bucket)
    scans_full_s: int = 0  # seconds until the bucket is full again
    inflight_left: int | None = None
    streams_left: int | None = None
    retry_after_s: int = 0
    skipped: bool = False  # Redis did not answer: allowed without a check

    @property
    def allowed(self) -> bool:
        return self.refused is None


class ScanQuota:
    """The scan API's check: a token from the user's bucket and a slot for the job in flight."""

    def __init__(self, redis: aioredis.Redis, s: Settings) -> None:
        self.redis = redis
        self.s = s
        self._submit = redis.register_script(_SUBMIT)

    @property
    def enabled(self) -> bool:
        return self.s.scan_burst > 0 or self.s.inflight_max > 0

    async def take(self, user: str, job_id: str) -> Decision:
        """Admit `job_id` for `user` (taking a token and an in-flight slot) or say which limit refused."""
        s = self.s
        if not self.enabled:
            return Decision()
        rate_per_ms = max(s.scan_rate_per_min, 1e-6) / 60_000
        try:
            async with asyncio.timeout(s.quota_timeout_s):
                limit, tokens, slots, retry_ms, full_ms = await self._submit(
                    keys=[keys.quota_scans(user), keys.quota_inflight(user)],
                    args=[s.scan_burst, repr(rate_per_ms), s.inflight_max, job_id, s.inflight_lease_s * 1000],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            SKIPPED.labels("scans").inc()
            log.warning("scan quota of a user not checked (Redis: %s); admitted", type(exc).__name__)
            return Decision(skipped=True)
        name = _text(limit)
        retry_s = _seconds(int(retry_ms))
        if name == "inflight":
            retry_s = min(retry_s, CONCURRENCY_RETRY_S)
        decision = Decision(
            refused=name or None,  # type: ignore[arg-type]
            scans_left=int(tokens) if s.scan_burst > 0 else None,
            scans_full_s=_seconds(int(full_ms)),
            inflight_left=max(int(slots), 0) if s.inflight_max > 0 else None,
            retry_after_s=retry_s if name else 0,
        )
        if decision.refused:
            REFUSED.labels(decision.refused).inc()
        return decision

    async def release(self, user: str, job_id: str) -> None:
        """Give back the in-flight slot of a job that was not accepted after all (Kafka refused it)."""
        if self.s.inflight_max > 0:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.s.quota_timeout_s):
                    await self.redis.zrem(keys.quota_inflight(user), job_id)


class StreamLeases:
    """A gateway's stream slots: one lease per open stream, renewed while it lives. An ended
    stream's lease is given back in a batch (`release`): one call per `RELEASE_BATCH_S` for all
    streams ended meanwhile (a ZREM task per stream end was a tenth of the gateway's samples,
    issue 23), or with the same user's next `acquire`, so a user at the cap who closes a stream
    and opens another at once is not refused for a lease this gateway already gave up."""

    def __init__(self, redis: aioredis.Redis, s: Settings) -> None:
        self.redis = redis
        self.s = s
        self.held: dict[str, str] = {}  # lease id -> user
        self.ended: dict[str, list[str]] = {}  # user -> leases of ended streams, not given back yet
        # Unique across gateways and restarts (pid + random), then a counter: no uuid4 (a
        # getrandom call) per stream.
        self._prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self._ids = itertools.count(1)
        self._acquire = redis.register_script(STREAM_LUA)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._flush_at: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()
        self._opened_at = -math.inf  # loop time of the last `others_ended` (a stream's first read)

    @property
    def enabled(self) -> bool:
        return self.s.streams_max > 0

    def acquire_call(self, user: str) -> tuple[str, str, list[str | int]]:
        """What one acquire sends (`STREAM_LUA`): a new lease id, the user's lease set and the
        script's arguments, with the user's ended leases still waiting for their batch (given back
        first). The caller hands the reply to `acquired`, or the failure to `not_checked`."""
        lease = f"{self._prefix}{next(self._ids):x}"
        ended = self.ended.pop(user, ())
        args: list[str | int] = [self.s.streams_max, lease, self.s.stream_lease_s * 1000, *ended]
        return lease, keys.quota_streams(user), args

    def acquired(self, user: str, lease: str, reply: list[object]) -> tuple[Decision, str | None]:
        taken, left, retry_ms = (int(x) for x in reply)  # type: ignore[call-overload]
        if not taken:
            REFUSED.labels("streams").inc()
            retry_s = min(_seconds(retry_ms), CONCURRENCY_RETRY_S)
            return Decision(refused="streams", streams_left=0, retry_after_s=retry_s), None
        self.held[lease] = user
        return Decision(streams_left=left), lease

    def others_ended(self) -> list[tuple[str, str]]:
        """Every other user's ended leases still waiting for their batch, (user, lease) each (at
        most `RELEASE_BATCH_MAX`), taken to be given back with a stream's first read
        (`gateway/first_read.py`): while streams keep opening, ended leases ride along with them
        and the batch timer finds nothing left to send. Handed back by `not_given_back` when that
        call fails."""
        self._opened_at = asyncio.get_running_loop().time()
        out: list[tuple[str, str]] = []
        while self.ended and len(out) < RELEASE_BATCH_MAX:
            user, leases = self.ended.popitem()
            out.extend((user, lease) for lease in leases)
        return out

    def not_given_back(self, pairs: list[tuple[str, str]]) -> None:
        """Ended leases whose call failed: they go with the next batch (or lapse by themselves)."""
        for user, lease in pairs:
            self._ended(user, lease)

    def not_checked(self, user: str, args: list[str | int], exc: BaseException) -> tuple[Decision, None]:
        """Redis did not answer: admitted unchecked (fail open); the ended leases the call carried
        go back with the next batch instead."""
        for old in args[3:]:
            self._ended(user, str(old))
        SKIPPED.labels("streams").inc()
        log.warning("stream quota of a user not checked (Redis: %s); admitted", type(exc).__name__)
        return Decision(skipped=True), None

    async def acquire(self, user: str) -> tuple[Decision, str | None]:
        """A lease for one more stream of `user`, or the refusal (fail open when Redis is silent).
        The user's ended leases still waiting for the batch go back in the same call first."""
        if not self.enabled:
            return Decision(), None
        lease, key, args = self.acquire_call(user)
        try:
            async with asyncio.timeout(self.s.quota_timeout_s):
                reply = await self._acquire(keys=[key], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            return self.not_checked(user, args, exc)
        return self.acquired(user, lease, reply)

    def release(self, lease: str | None) -> None:
        """Free a stream's slot: no longer renewed from now, given back to Redis with the next
        batch (a stream's end never waits for Redis)."""
        user = self.held.pop(lease, None) if lease is not None else None
        if lease is None or user is None:
            return
        self._ended(user, lease)

    def _ended(self, user: str, lease: str) -> None:
        self.ended.setdefault(user, []).append(lease)
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(RELEASE_BATCH_S, self._start_flush)

    def _start_flush(self) -> None:
        """The batch timer: nothing to do when first reads took every ended lease; none either
        while streams keep opening (a first read within the last `RELEASE_BATCH_S`): the next
        one carries what is left, so the timer looks again one batch later instead of a call of
        its own (under churn these calls were 4% of a stream's samples, issue 23). A lease thus
        waits at most about two batches once streams stop opening."""
        self._flush_at = None
        if not self.ended:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._opened_at < RELEASE_BATCH_S:
            self._flush_at = loop.call_later(RELEASE_BATCH_S, self._start_flush)
            return
        task = loop.create_task(self.flush())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def flush(self) -> None:
        """Give back every ended stream's lease now (also at shutdown). A lease whose call fails
        lapses by itself within `stream_lease_s`: nobody renews it any more."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        ended, self.ended = self.ended, {}
        pairs = [(user, lease) for user, leases in ended.items() for lease in leases]
        for i in range(0, len(pairs), RELEASE_BATCH_MAX):
            batch = pairs[i : i + RELEASE_BATCH_MAX]
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.s.quota_timeout_s * 4):
                    await self._release(
                        keys=[keys.quota_streams(user) for user, _ in batch],
                        args=[lease for _, lease in batch],
                    )

    async def renew_forever(self) -> None:
        """Renew every lease this gateway holds each third of the lease (one Lua call per batch)."""
        every = max(self.s.stream_lease_s / 3, 0.2)
        while True:
            await asyncio.sleep(every)
            held = list(self.held.items())
            for i in range(0, len(held), 500):
                batch = held[i : i + 500]
                try:
                    await self._renew(
                        keys=[keys.quota_streams(user) for _, user in batch],
                        args=[self.s.stream_lease_s * 1000, *(lease for lease, _ in batch)],
                    )
                except RedisError as exc:
                    log.warning("stream leases not renewed (Redis: %s)", type(exc).__name__)
                    break


def _seconds(ms: int) -> int:
    return max(1, math.ceil(ms / 1000)) if ms > 0 else 0


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
