"""`StateStore.snapshot` as one Lua call: what opening a stream reads, for the gateway.

The same reads as `StateStore.snapshot` (the view marker, the job's owner fields, its history
after the reader's seq, whether its `queued` event is there), as of the same single instant
(a script runs atomically, as MULTI/EXEC does), decoded by the same functions. One command and
one nested reply instead of MULTI, four queued commands and EXEC: in the gateway's churn profile
(issue 23) redis-py's transaction pipeline was most of the cost of the one round trip per stream
opened. `tests/test_stream_snapshot.py` checks that both give the same answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from contract import keys
from contract.events import QUEUED_SEQ

from . import marker
from .state import OWNER_FIELDS, Snapshot, snapshot_of


def _script() -> str:
    marker_fields = ",".join(f"'{f}'" for f in marker.MARKER_FIELDS)
    owner_fields = ",".join(f"'{f}'" for f in OWNER_FIELDS)
    return f"""
local m = redis.call('HMGET', KEYS[1], {marker_fields})
local o = redis.call('HMGET', KEYS[2], {owner_fields})
local h = redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[1], '+inf')
local q = redis.call('ZCOUNT', KEYS[3], ARGV[2], ARGV[2])
return {{m, o, h, q}}
"""


SCRIPT = _script()


class SnapshotReader:
    """`read` is `StateStore.snapshot` in one EVALSHA (module docstring)."""

    def __init__(self, redis: aioredis.Redis, call: Callable[..., Awaitable[Any]] | None = None) -> None:
        """`call`: something called as redis-py's registered script is (`keys=`, `args=`) that runs
        `SCRIPT` (the gateway's `ScriptCall`, on connections of its own); by default redis-py's."""
        self._read = call or redis.register_script(SCRIPT)

    async def read(self, job_id: str, after_seq: int, server_run_id: str | None) -> Snapshot:
        raw: list[Any] = await self._read(
            keys=[keys.VIEW, keys.state(job_id), keys.history(job_id)],
            args=[f"({after_seq}", QUEUED_SEQ],
        )
        raw_marker, raw_owner, history, queued = raw
        return snapshot_of(raw_marker, raw_owner, history, queued, server_run_id)
