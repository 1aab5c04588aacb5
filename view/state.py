"""The Redis side of a job: latest state, catch-up history and live fan-out.

Redis is a cache derived from `scan.events`; applying an event is idempotent, so the router can
replay the log (after a crash or `eco2 state rebuild`) without clients seeing anything twice:
- history keeps the first event of each seq (a replay adds nothing),
- the state hash moves only forward (a late or repeated event never sends it back); a re-driven
  job's new attempt has higher seqs (contract.pipeline.ATTEMPT_SPAN), so it reopens a failed job:
  state, running TTL, no stale result,
- an event is published only when it was new to the history, so live subscribers see it once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from contract import keys
from contract.events import QUEUED_SEQ, ScanEvent
from contract.pipeline import is_terminal, is_terminal_lua
from contract.topics import shard_of

from . import marker

# The apply script. `apply_one(k, a)` applies one event, whose keys are KEYS[k + 1..3]: state,
# history, the owner's in-flight quota set; and whose values are ARGV[a + 1..13]: seq, event json,
# channel ("" = do not publish), ttl, stage, status, progress, user, result json ("" when none),
# ttl once finished, job id, the event's schema version (contract/versioning.py), "1" when the job
# is known to have ended (a newest-first rebuild applies its terminal event before its older
# ones). It returns 1 when the event was new. The history entry is the event JSON, `v` included;
# the state hash keeps the `v` of its event (not the event itself: the history has it, and no
# reader wanted a second copy in the hash and in the AOF). A finished job's keys keep only the
# finished TTL, whatever arrives after its terminal event (or before it, in a newest-first rebuild).
#
# The script applies a batch: APPLY_KEYS keys and APPLY_ARGS values per event, in the batch's
# order, and returns one 1/0 per event. One call per batch, not one per event: the calls cost the
# router about a third of its apply CPU and Redis about an eighth of its own (batches of 40
# events, `StateStore.apply` of the previous commit against this one, paired rounds).
#
# Redis's CPU in this script went mostly to `redis.call` itself (each one a command lookup, its
# arguments copied into Redis objects, its effects written to the AOF), not to the commands'
# work (issue 23, round 5: bench/reports/issue23/round5/). So an event costs as few calls as its
# guarantees allow; the common one (the next event of a running job) costs three (HMGET, ZADD,
# HSET) where it cost nine:
# - state first, in one HMGET (seq, stage, status, the keys' running deadline `exp`, and `top`:
#   the highest seq in the history);
# - an event past `top` is new to the history without a ZCOUNT (the history is written only here,
#   and its key expires with the state's), so only an event at or below it (a repeat, a
#   newest-first rebuild) asks the history; a job without a state hash (a new one, or one whose
#   hash was lost while its history was not) reads `top` from the history (ZRANGE, one entry);
# - the result is deleted only from a state that had ended (a result comes only with a terminal
#   event: streams/stages.py attaches one to `done` and to a failure only);
# - the keys' TTL is set when it must change: a finished job's on every event (as before), a
#   running job's when less than RENEW_AT of its running TTL is left (the first event, a reopen by
#   a re-drive, or a job running for hours): a running job's keys live at least RENEW_AT x `ttl`
#   past its latest event, never expire under it, and an event does not cost 2 EXPIREs and 2 AOF
#   records;
# - one PUBLISH per shard channel per call, carrying that call's new events of the shard in order
#   (`keys.live_message`), not one per event.
APPLY_KEYS = 3
APPLY_ARGS = 13
APPLY_BATCH = 100  # events per call at most: bounds the time one call holds Redis
RENEW_AT = 0.9  # a running job's TTL is pushed back once less than this share of it is left
_APPLY = (
    """
local now = tonumber(redis.call('TIME')[1])
local channels, live = {}, {}
local function apply_one(k, a)
  local seq = tonumber(ARGV[a + 1])
  local st = redis.call('HMGET', KEYS[k + 1], 'seq', 'stage', 'status', 'exp', 'top')
  local cur = tonumber(st[1] or '-1')
  local ended_before = st[1] and WAS_TERMINAL
  local top = tonumber(st[5] or '')
  if not top then  -- no state hash (or one written before `top`): the history tells
    top = tonumber(redis.call('ZRANGE', KEYS[k + 2], -1, -1, 'WITHSCORES')[2] or '-1')
  end
  local new = 0
  if seq > top or redis.call('ZCOUNT', KEYS[k + 2], seq, seq) == 0 then
    redis.call('ZADD', KEYS[k + 2], seq, ARGV[a + 2])
    new = 1
    if seq > top then top = seq end
  end
  local fin = ARGV[a + 13] == '1'
  local exp = tonumber(st[4] or '0')
  local ttl = tonumber(ARGV[a + 4])
  if seq > cur then
    st[2], st[3] = ARGV[a + 5], ARGV[a + 6]
  end
  fin = fin or TERMINAL_STATE
  local want = now + ttl
  if fin then
    ttl = tonumber(ARGV[a + 10])
    want = now + ttl
  elseif exp >= now + RENEW_AT * ttl then
    ttl = nil  -- enough of the running TTL is left
  end
  if seq > cur then
    local h = {'seq', seq, 'stage', ARGV[a + 5], 'status', ARGV[a + 6], 'progress', ARGV[a + 7],
               'user_id', ARGV[a + 8], 'v', ARGV[a + 12], 'top', top}
    -- A result comes only with a terminal event; a later seq without one is a new attempt
    -- (a re-drive): the earlier attempt's result is no longer the job's.
    if ARGV[a + 9] ~= '' then h[#h + 1] = 'result'; h[#h + 1] = ARGV[a + 9] end
    if ttl then h[#h + 1] = 'exp'; h[#h + 1] = want end
    redis.call('HSET', KEYS[k + 1], unpack(h))
    if ARGV[a + 9] == '' and ended_before then redis.call('HDEL', KEYS[k + 1], 'result') end
  elseif ttl then
    redis.call('HSET', KEYS[k + 1], 'exp', want)
  end
  if ttl then
    redis.call('EXPIRE', KEYS[k + 1], ttl)
    redis.call('EXPIRE', KEYS[k + 2], ttl)
  end
  if new == 1 and ARGV[a + 3] ~= '' then
    local c = ARGV[a + 3]
    if not live[c] then live[c] = {}; channels[#channels + 1] = c end
    live[c][#live[c] + 1] = ARGV[a + 2]
  end
  -- A terminal event frees the job's in-flight quota slot (quota/limits.py); repeats are harmless.
  if TERMINAL_EVENT then redis.call('ZREM', KEYS[k + 3], ARGV[a + 11]) end
  return new
end
local out = {}
for i = 0, #KEYS / APPLY_KEYS - 1 do
  out[i + 1] = apply_one(i * APPLY_KEYS, i * APPLY_ARGS)
end
for _, c in ipairs(channels) do
  redis.call('PUBLISH', c, table.concat(live[c], LIVE_SEP))
end
return out
""".replace("TERMINAL_STATE", is_terminal_lua("st[2]", "st[3]"))
    .replace("WAS_TERMINAL", is_terminal_lua("st[2]", "st[3]"))
    .replace("TERMINAL_EVENT", is_terminal_lua("ARGV[a + 5]", "ARGV[a + 6]"))
    .replace("APPLY_KEYS", str(APPLY_KEYS))
    .replace("APPLY_ARGS", str(APPLY_ARGS))
    .replace("RENEW_AT", str(RENEW_AT))
    .replace("LIVE_SEP", repr(keys.LIVE_SEPARATOR.decode()).replace("'", '"'))
)

# KEYS: state, history. ARGV: the queued event's seq. Deletes both when nothing past the queued
# event was applied (the job went no further in Redis); returns 1 when it deleted them.
_FORGET_QUEUED = """
local cur = redis.call('HGET', KEYS[1], 'seq')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
if redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf') > 0 then return 0 end
return redis.call('DEL', KEYS[1], KEYS[2]) > 0 and 1 or 0
"""


class StateStore:
    """Applies events to Redis (one round trip per batch) and reads job state back.

    A batch is one call of the apply script per `APPLY_BATCH` events, pipelined as plain EVALSHA
    calls: redis-py's registered scripts would ask `SCRIPT EXISTS` before every pipeline, a second
    round trip per batch (per POST in the API).
    Redis answers NOSCRIPT only when its script cache is empty (a restart), and then the script
    is loaded and the calls from the first refused one on are sent again (the apply is idempotent).

    Keys live `ttl_s` while the job runs (pushed back to it once less than `RENEW_AT` of it is
    left, not on every event) and `finished_ttl_s` (default: the same) once it has ended: the
    router keeps a finished job an hour (`result_ttl_s`; its result then comes from Postgres), not
    the day a running one may need, or Redis held every job of the last 24 hours (~27 KiB each,
    ~12 GiB at 100 VUs: the soak's finding, docs/benchmarks.md)."""

    def __init__(
        self, client: aioredis.Redis, ttl_s: int, finished_ttl_s: int | None = None, publish: bool = True
    ) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.finished_ttl_s = finished_ttl_s or ttl_s
        self.publish = publish  # False: history and state only (the automatic rebuild)
        self._apply = client.register_script(_APPLY)  # for its sha (and SCRIPT LOAD)

    async def apply(
        self, events: Iterable[ScanEvent], ended: Mapping[str, float] | None = None
    ) -> list[bool]:
        """Apply a batch of events in one pipelined round trip; True where the event was new.
        `ended` ({job id: its terminal event's ts}): jobs known to have finished, whose every
        event gets the finished TTL counted from that ts (a newest-first rebuild, view/rebuild.py)."""
        ended = ended or {}
        now = time.time()
        calls: list[tuple[list[str], list[Any]]] = []  # one script call per APPLY_BATCH events
        for ev in events:
            if not calls or len(calls[-1][0]) == APPLY_BATCH * APPLY_KEYS:
                calls.append(([], []))
            names, args = calls[-1]
            names += (keys.state(ev.job_id), keys.history(ev.job_id), keys.quota_inflight(ev.user_id))
            args += (
                ev.seq,
                ev.model_dump_json(),
                keys.shard_channel(shard_of(ev.job_id)) if self.publish else "",
                self.ttl_s,
                ev.stage,
                ev.status,
                ev.progress,
                ev.user_id,
                json.dumps(ev.result) if ev.result is not None else "",
                self._finished_ttl(ended.get(ev.job_id, ev.ts), now),
                ev.job_id,
                ev.v,
                "1" if ev.job_id in ended else "",
            )
        if not calls:
            return []
        results = await self._evalsha(calls)
        refused = next((i for i, r in enumerate(results) if isinstance(r, NoScriptError)), None)
        if refused is not None:  # Redis lost its script cache (restarted): load and send again
            await self.redis.script_load(_APPLY)
            results[refused:] = await self._evalsha(calls[refused:])
        for r in results:
            if isinstance(r, Exception):
                raise r
        return [bool(new) for r in results for new in r]

    async def forget_queued(self, job_id: str) -> bool:
        """Take back the queued state the API cached for a job whose transaction failed
        (producers/api.py writes it while the transaction commits): its state and history go,
        unless an event past the queued one is there (the job is in the log after all)."""
        args = (keys.state(job_id), keys.history(job_id), QUEUED_SEQ)
        return bool(await self.redis.eval(_FORGET_QUEUED, 2, *args))  # type: ignore[misc]

    async def _evalsha(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """One pipelined round trip of the apply script; errors in place of their results."""
        # The context manager resets the pipeline even when Redis fails mid-batch.
        async with self.redis.pipeline(transaction=False) as pipe:
            for names, args in calls:
                pipe.evalsha(self._apply.sha, len(names), *names, *args)
            return await pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

    def _finished_ttl(self, ended_ts: float, now: float) -> int:
        """A finished job stays `finished_ttl_s` after its terminal event, not after the apply: a
        rebuild replaying a day of the log (streams/heal.py) would otherwise bring back every job
        of that day for another hour (~13 KiB each: tens of GiB at 300 VUs). An old event expires
        in 1 s. (`ended_ts` is the applied event's own ts unless the job's end is known.)"""
        return max(1, int(self.finished_ttl_s - max(0.0, now - ended_ts)))

    async def state(self, job_id: str) -> dict[str, Any] | None:
        """The job's latest state (seq, stage, status, progress, user_id, v, result), or None."""
        return _decode(await self.redis.hgetall(keys.state(job_id)))  # type: ignore[misc]

    async def history(self, job_id: str, after_seq: int = -1) -> list[ScanEvent]:
        """Events with seq > after_seq, in seq order."""
        return [ScanEvent.model_validate_json(r) for r in await self.history_json(job_id, after_seq)]

    async def history_json(self, job_id: str, after_seq: int = -1) -> list[bytes]:
        """The same events as stored (JSON), for readers that parse only what they need."""
        return await self.redis.zrangebyscore(keys.history(job_id), f"({after_seq}", "+inf")  # type: ignore[return-value]

    async def snapshot(self, job_id: str, after_seq: int, server_run_id: str | None) -> Snapshot:
        """The view's status, the job's owner and its history after `after_seq`, as of one instant
        (MULTI/EXEC: one round trip per stream opened, not three; issue 13's churn profile).
        `server_run_id` as in `marker.read`."""
        async with self.redis.pipeline(transaction=True) as p:
            p.hmget(keys.VIEW, list(marker.MARKER_FIELDS))
            p.hmget(keys.state(job_id), list(OWNER_FIELDS))
            p.zrangebyscore(keys.history(job_id), f"({after_seq}", "+inf")
            p.zcount(keys.history(job_id), QUEUED_SEQ, QUEUED_SEQ)
            raw_marker, raw_owner, history, queued = await p.execute()
        return snapshot_of(raw_marker, raw_owner, history, queued, server_run_id)


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose job it is, how far it got and whether it has ended (`StateStore.snapshot`)."""

    user_id: str
    seq: int  # the latest seq applied
    finished: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What opening a stream needs to know, read in one round trip (`StateStore.snapshot`)."""

    status: marker.Status
    whole: bool  # the job's history may be served as whole (`marker.job_whole`)
    owner: Owner | None  # None: the view does not know the job
    history: list[bytes]  # the events after the reader's seq, as stored, in seq order


# The state hash as the Lua above writes it; `_decode` is its one reader.
OWNER_FIELDS = ("user_id", "seq", "stage", "status")


# Fields of the state hash that are the script's own: the keys' running deadline, the history's
# highest seq, and the event JSON that hashes written before issue 23's round 5 still hold (the
# history has it).
_INTERNAL = ("exp", "top", "event")


def _decode(raw: Mapping[bytes | str, bytes | str | None]) -> dict[str, Any] | None:
    out: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items() if v is not None}
    for name in _INTERNAL:
        out.pop(name, None)
    if "seq" not in out:
        return None
    out["seq"] = int(out["seq"])
    if "progress" in out:
        out["progress"] = int(out["progress"])
    if "result" in out:
        out["result"] = json.loads(out["result"])
    return out


def _finished(stage: str, status: str) -> bool:
    """Has the job ended (the state hash moves only forward, so it has for good)?"""
    return is_terminal(stage, status)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def snapshot_of(
    raw_marker: list[Any], raw_owner: list[Any], history: list[Any], queued: Any, server_run_id: str | None
) -> Snapshot:
    """A `Snapshot` from the four raw reads (the MULTI/EXEC here, the gateway's one Lua call in
    view/stream_snapshot.py): one interpretation for both."""
    status, _ = marker.interpret(raw_marker, server_run_id)
    whole = marker.job_whole(raw_marker, server_run_id, bool(queued))
    state = _decode(dict(zip(OWNER_FIELDS, raw_owner, strict=True)))
    owner = None
    if state is not None:
        owner = Owner(state.get("user_id", ""), state["seq"], _finished(state["stage"], state["status"]))
    return Snapshot(status, whole, owner, list(history))
