"""Is the Redis view of `scan.events` whole? The marker that says so, and how it is claimed.

Redis is disposable: FLUSHALL, a restart without persistence or a failover to an empty replica
lose the state, the histories and, with them, the marker hash `scan:view`. So a missing marker
means "lost". A Redis restart also counts as lost even when the marker came back from the AOF:
with `appendfsync everysec` the last second of applied events may be gone, so the marker records
the server's run_id and a new run_id means the view cannot vouch for itself.

Status: `ready` (whole), `rebuilding` (a router replays the log into it), `lost` (no valid
marker; a router will claim it within `view_check_s`). Readers (gateway, API) serve a history as
complete when `ready`, and, while `rebuilding` with `order` = `newest-first` (the rebuild replays
each partition backwards from the end, view/rebuild.py), a job whose history holds its `queued`
event: every later event of the job was replayed before it (`job_whole`). Any other rebuild (from
the checkpoint: seconds of events) vouches for nothing until it ends.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from contract import keys
from contract.events import QUEUED_SEQ

Status = Literal["ready", "rebuilding", "lost"]

# KEYS: view, rebuilder, checkpoint.  ARGV: epoch, owner, lease seconds, run_id, now.
# Claims the rebuild when the view is lost, restarted, or rebuilding with no live rebuilder.
# A checkpoint of the marker's own epoch came back with it (a restart, AOF): the view is whole
# below its offsets, so it is handed to the new epoch; any other checkpoint is dropped.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
local run_id = redis.call('HGET', KEYS[1], 'run_id')
if status == 'ready' and run_id == ARGV[4] then return 0 end
if status == 'rebuilding' and run_id == ARGV[4] and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if status and epoch and redis.call('HGET', KEYS[3], 'epoch') == epoch then
  redis.call('HSET', KEYS[3], 'epoch', ARGV[1])
else
  redis.call('DEL', KEYS[3])
end
redis.call('HDEL', KEYS[1], 'order')
redis.call('HSET', KEYS[1], 'status', 'rebuilding', 'epoch', ARGV[1], 'run_id', ARGV[4],
           'since', ARGV[5], 'reason', status or 'missing')
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: view, checkpoint.  ARGV: run_id, now, then partition and offset pairs.
# Only while the view is ready on this server run: offsets below which it holds every event.
_CHECKPOINT = """
if redis.call('HGET', KEYS[1], 'status') ~= 'ready' or redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then
  return 0
end
local fields = {'epoch', redis.call('HGET', KEYS[1], 'epoch'), 'at', ARGV[2]}
for i = 3, #ARGV, 2 do
  fields[#fields + 1] = 'p' .. ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(fields))
return 1
"""

# KEYS: view, rebuilder.  ARGV: epoch, owner, lease seconds. 1 while the claim still stands.
_RENEW = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: view.  ARGV: epoch. This epoch's rebuild replays newest first: readers may vouch per job.
_NEWEST_FIRST = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'order', 'newest-first')
return 1
"""

# KEYS: view, rebuilder.  ARGV: epoch, now. Marks the view whole unless it was lost meanwhile.
_FINISH = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'order')
redis.call('HSET', KEYS[1], 'status', 'ready', 'ready_at', ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""


async def run_id(redis: aioredis.Redis) -> str:
    """The Redis server's run_id: new at every restart."""
    info: dict[str, Any] = await redis.info("server")
    return str(info["run_id"])


MARKER_FIELDS = ("status", "run_id", "epoch", "order")  # HMGET these of keys.VIEW, then `interpret`
NEWEST_FIRST = "newest-first"  # the marker's `order` while a rebuild replays the log backwards


async def read(redis: aioredis.Redis, server_run_id: str | None = None) -> tuple[Status, str | None]:
    """The view's status and epoch (a new epoch = the view was rebuilt); with `server_run_id` (the
    caller's latest INFO), a marker written by another server run counts as lost."""
    return interpret(await redis.hmget(keys.VIEW, list(MARKER_FIELDS)), server_run_id)  # type: ignore[misc]


def interpret(raw: list[Any], server_run_id: str | None = None) -> tuple[Status, str | None]:
    """`read` on the marker's MARKER_FIELDS values, for callers that fetch them in a pipeline."""
    st, rid, epoch = (_text(v) for v in raw[:3])
    if st not in ("ready", "rebuilding"):
        return "lost", epoch
    if server_run_id is not None and rid != server_run_id:
        return "lost", epoch
    return st, epoch  # type: ignore[return-value]


def job_whole(raw: list[Any], server_run_id: str | None, has_queued: bool) -> bool:
    """May a job's history be served as whole? `raw` = the marker's MARKER_FIELDS, `has_queued` =
    the history holds the job's first event (`contract.events.QUEUED_SEQ`), both read at once.
    Yes when the view is ready; while it is rebuilding newest first, when the job's queued event is
    back (its chunk was replayed after every later one; later events come from the live router)."""
    st, _ = interpret(raw, server_run_id)
    if st == "ready":
        return True
    return st == "rebuilding" and _text(raw[3]) == NEWEST_FIRST and has_queued


async def status(redis: aioredis.Redis, server_run_id: str | None = None) -> Status:
    """The view's status (see `read`)."""
    return (await read(redis, server_run_id))[0]


async def current(redis: aioredis.Redis) -> Status:
    """The view's status checked against the server's run_id (two round trips)."""
    return await status(redis, await run_id(redis))


async def mark_ready(redis: aioredis.Redis) -> None:
    """Declare the view whole without a rebuild: for a Redis that a benchmark or test fills
    itself (nothing in the log to replay)."""
    rid = await run_id(redis)
    mapping: dict[str, str | float] = {
        "status": "ready",
        "epoch": uuid.uuid4().hex,
        "run_id": rid,
        "since": time.time(),
    }
    await redis.hset(keys.VIEW, mapping=mapping)  # type: ignore[misc,arg-type]


@dataclass
class Claim:
    """One router's claim on a rebuild of the view (epoch = this rebuild)."""

    redis: aioredis.Redis
    owner: str
    lease_s: int
    epoch: str = ""
    run_id: str = ""  # the Redis server run seen by the last `take`

    def _keys(self) -> list[str]:
        return [keys.VIEW, keys.VIEW_REBUILDER]

    async def take(self) -> bool:
        """True when the view needs a rebuild and this process now owns it."""
        self.epoch = uuid.uuid4().hex
        self.run_id = rid = await run_id(self.redis)
        args: list[str | int | float] = [self.epoch, self.owner, self.lease_s, rid, time.time()]
        return bool(await self.redis.eval(_CLAIM, 3, *self._keys(), keys.VIEW_CHECKPOINT, *args))  # type: ignore[misc]

    async def resume_offsets(self) -> tuple[dict[int, int], float] | None:
        """The checkpoint handed to this claim's epoch: ({partition: offset}, written at), or None
        (the view was flushed or emptied: replay the whole window)."""
        raw = await self.redis.hgetall(keys.VIEW_CHECKPOINT)  # type: ignore[misc]
        cp = {_text(k): _text(v) for k, v in raw.items()}
        if not self.epoch or cp.get("epoch") != self.epoch:
            return None
        offsets = {int(k[1:]): int(v) for k, v in cp.items() if k and k.startswith("p") and v is not None}
        return offsets, float(cp.get("at") or 0)

    async def renew(self) -> bool:
        """Extend the lease; False when the view was lost (or re-claimed) since the claim."""
        args: list[str | int | float] = [self.epoch, self.owner, self.lease_s]
        return bool(await self.redis.eval(_RENEW, 2, *self._keys(), *args))  # type: ignore[misc]

    async def replay_newest_first(self) -> bool:
        """Tell readers that this epoch replays the log newest first (`job_whole`); False when the
        view was lost or re-claimed since the claim."""
        return bool(await self.redis.eval(_NEWEST_FIRST, 1, keys.VIEW, self.epoch))  # type: ignore[misc]

    async def finish(self) -> bool:
        """Mark the view ready; False when it was lost again meanwhile (then rebuild again)."""
        return bool(await self.redis.eval(_FINISH, 2, *self._keys(), self.epoch, time.time()))  # type: ignore[misc]


async def checkpoint(redis: aioredis.Redis, server_run_id: str, offsets: dict[int, int]) -> bool:
    """Record that the view holds every `scan.events` record below `offsets` (the router
    group's committed offsets, read before this call); written only while the view is ready on
    the server run `server_run_id`. True when written."""
    args: list[str | int | float] = [server_run_id, time.time()]
    for partition, offset in sorted(offsets.items()):
        args += [partition, offset]
    return bool(await redis.eval(_CHECKPOINT, 2, keys.VIEW, keys.VIEW_CHECKPOINT, *args))  # type: ignore[misc]


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class Reader:
    """`ready()` for request handlers: the marker on every call, the run_id (INFO) at most once
    per `refresh_s`, so a poll costs one small round trip more, not two."""

    def __init__(self, redis: aioredis.Redis, refresh_s: float = 1.0) -> None:
        self.redis = redis
        self.refresh_s = refresh_s
        self._run_id: str | None = None
        self._at = -1e9

    async def ready(self) -> bool:
        if time.monotonic() - self._at > self.refresh_s:
            self._run_id = await run_id(self.redis)
            self._at = time.monotonic()
        return await status(self.redis, self._run_id) == "ready"

    async def job_whole(self, job_id: str) -> bool:
        """`job_whole` for one job: the marker and the job's queued event in one round trip."""
        if time.monotonic() - self._at > self.refresh_s:
            self._run_id = await run_id(self.redis)
            self._at = time.monotonic()
        async with self.redis.pipeline(transaction=True) as p:
            p.hmget(keys.VIEW, list(MARKER_FIELDS))
            p.zcount(keys.history(job_id), QUEUED_SEQ, QUEUED_SEQ)
            raw, queued = await p.execute()
        return job_whole(raw, self._run_id, bool(queued))
