"""A stream's first read: the user's stream lease (`quota/limits.py`) and the job's snapshot
(`view/stream_snapshot.py`) in one Lua call, one round trip where there were two.

Each redis-py call is a chain of coroutines, a pool checkout and a write; in the gateway's churn
profile (issue 23) the lease's own call was 13% of the samples, as much as the snapshot's. Both
scripts run unchanged, each as a Lua function given its own KEYS and ARGV, so what each decides
is what it decided alone: the quota is checked (and the ended leases folded into it given back)
exactly as `StreamLeases.acquire` does, the snapshot read as `SnapshotReader.read` reads it.

The lease keeps its fail-open rule: when this call fails or Redis does not answer within
`quota_timeout_s`, the stream is admitted unchecked and the snapshot read again alone (whose
failure is the stream's 503, as before).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from contract import keys
from contract.events import QUEUED_SEQ
from quota.limits import STREAM_LUA, Decision, StreamLeases
from view import state
from view.stream_snapshot import SCRIPT as SNAPSHOT_LUA

# KEYS: view marker, job state, job history, the user's lease set.
# ARGV: snapshot's (after, queued seq), then the lease's (cap, lease id, lease ms, ended leases...).
SCRIPT = f"""
local function lease(KEYS, ARGV)
{STREAM_LUA}
end
local function snapshot(KEYS, ARGV)
{SNAPSHOT_LUA}
end
local la = {{}}
for i = 3, #ARGV do la[#la + 1] = ARGV[i] end
return {{lease({{KEYS[4]}}, la), snapshot({{KEYS[1], KEYS[2], KEYS[3]}}, {{ARGV[1], ARGV[2]}})}}
"""


class FirstRead:
    """`read`: the lease decision and, when the call answered, the snapshot (else None: read it
    alone)."""

    def __init__(self, redis: aioredis.Redis, leases: StreamLeases) -> None:
        self.leases = leases
        self._read = redis.register_script(SCRIPT)

    async def read(
        self, user: str, job_id: str, after_seq: int, server_run_id: str | None
    ) -> tuple[Decision, str | None, state.Snapshot | None]:
        lease, key, args = self.leases.acquire_call(user)
        try:
            async with asyncio.timeout(self.leases.s.quota_timeout_s):
                raw: list[Any] = await self._read(
                    keys=[keys.VIEW, keys.state(job_id), keys.history(job_id), key],
                    args=[f"({after_seq}", QUEUED_SEQ, *args],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            decision, _ = self.leases.not_checked(user, args, exc)
            return decision, None, None
        lease_reply, (raw_marker, raw_owner, history, queued) = raw
        decision, held = self.leases.acquired(user, lease, lease_reply)
        return decision, held, state.snapshot_of(raw_marker, raw_owner, history, queued, server_run_id)
