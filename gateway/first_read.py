"""A stream's first read: the user's stream lease (`quota/limits.py`) and the job's snapshot
(`view/stream_snapshot.py`) in one Lua call, one round trip where there were two.

Each redis-py call is a chain of coroutines, a pool checkout and a write; in the gateway's churn
profile (issue 23) the lease's own call was 13% of the samples, as much as the snapshot's. Both
scripts run unchanged, each as a Lua function given its own KEYS and ARGV, so what each decides
is what it decided alone: the quota is checked (and the ended leases folded into it given back)
exactly as `StreamLeases.acquire` does, the snapshot read as `SnapshotReader.read` reads it.

The same call also gives back the ended streams' leases of other users that are waiting for
their batch (`StreamLeases.others_ended`): while streams keep opening (churn), ended leases go
back with them, with no release call of their own.

The call is written and read on a pool connection kept for it (`gateway/script_call.py`), without
redis-py's per-call path.

The lease keeps its fail-open rule: when this call fails or Redis does not answer within
`quota_timeout_s`, the stream is admitted unchecked and the snapshot read again alone (whose
failure is the stream's 503, as before); the ended leases it carried go with the next batch.
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

from .script_call import ScriptCall

# KEYS: view marker, job state, job history, the user's lease set, then other users' lease sets.
# ARGV: snapshot's (after, queued seq), the number n of the lease's arguments, the lease's n
# (cap, lease id, lease ms, the user's ended leases...), then one ended lease per other lease set.
SCRIPT = f"""
local function lease(KEYS, ARGV)
{STREAM_LUA}
end
local function snapshot(KEYS, ARGV)
{SNAPSHOT_LUA}
end
local n = tonumber(ARGV[3])
for i = 5, #KEYS do redis.call('ZREM', KEYS[i], ARGV[3 + n + i - 4]) end
local la = {{}}
for i = 4, 3 + n do la[#la + 1] = ARGV[i] end
return {{lease({{KEYS[4]}}, la), snapshot({{KEYS[1], KEYS[2], KEYS[3]}}, {{ARGV[1], ARGV[2]}})}}
"""


class FirstRead:
    """`read`: the lease decision and, when the call answered, the snapshot (else None: read it
    alone)."""

    def __init__(self, redis: aioredis.Redis, leases: StreamLeases) -> None:
        self.leases = leases
        self._read = ScriptCall(redis, SCRIPT)  # on connections of its own (gateway/script_call.py)

    async def read(
        self, user: str, job_id: str, after_seq: int, server_run_id: str | None
    ) -> tuple[Decision, str | None, state.Snapshot | None]:
        lease, key, args = self.leases.acquire_call(user)
        others = self.leases.others_ended()
        try:
            async with asyncio.timeout(self.leases.s.quota_timeout_s):
                raw: list[Any] = await self._read(
                    keys=[
                        keys.VIEW,
                        keys.state(job_id),
                        keys.history(job_id),
                        key,
                        *(keys.quota_streams(u) for u, _ in others),
                    ],
                    args=[f"({after_seq}", QUEUED_SEQ, len(args), *args, *(old for _, old in others)],
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self.leases.not_given_back(others)
            decision, _ = self.leases.not_checked(user, args, exc)
            return decision, None, None
        lease_reply, (raw_marker, raw_owner, history, queued) = raw
        decision, held = self.leases.acquired(user, lease, lease_reply)
        return decision, held, state.snapshot_of(raw_marker, raw_owner, history, queued, server_run_id)

    async def aclose(self) -> None:
        await self._read.aclose()
