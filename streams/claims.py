"""The stage memo's claims, many jobs' in one Redis call (issue 19).

Each step of a stage claims its memo keys in one Lua call (SET NX GET: the first value ever stored
under a key wins, and is what a redelivery re-sends). A worker runs hundreds of jobs at once, and
the messages of one Kafka fetch reach their stages within a few event-loop turns, so their claims
were as many round trips: a socket write and read, a connection from the pool and a wake-up each,
in the worker and in Redis. `Claims` sends one call at a time: a claim asked while none is in
flight goes at once, from the job's own task; the claims asked while one is in flight go together
in the next call, from a sender task (a group commit: no timer, and nothing waits when Redis
answers before the next claim is asked). Each claim keeps its own
answer and its own guard: batching changes no claim's outcome, only how many calls carry them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from . import metrics

# KEYS: per claim, the keys it claims then the keys it reads. ARGV: the TTL, the number of claims,
# then per claim: how many keys it claims, how many it reads, its guard (the position of the
# claimed key that guards those after it, 0 for none), and one value per claimed key. A lost guard
# (another delivery's value is stored under it) stops that claim, not the others: its answer is
# shorter, and nothing after the guard is claimed or read. One answer (a list) per claim: the
# value stored before ours for each claimed key (nil when ours was stored), then each read value.
SCRIPT = """
local ttl = ARGV[1]
local a, k = 3, 1
local answers = {}
for c = 1, tonumber(ARGV[2]) do
  local n, r, guard = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local out = {}
  local lost = false
  for i = 1, n do
    local prev = redis.call('SET', KEYS[k + i - 1], ARGV[a + i - 1], 'NX', 'GET', 'EX', ttl)
    out[i] = prev
    if i == guard and prev then
      lost = true
      break
    end
  end
  if not lost then
    for j = 1, r do out[n + j] = redis.call('GET', KEYS[k + n + j - 1]) end
  end
  a = a + n
  k = k + n + r
  answers[c] = out
end
return answers
"""

# One claim as the engine asks it: (key, value) pairs to claim, keys to read, its guard.
Claim = tuple[Sequence[tuple[str, str]], Sequence[str], int]


class Claims:
    """Claims of memo keys, those asked while a call is in flight sent together in the next.

    `retry` wraps each call (the engine's: Redis hiccups hold the jobs rather than fail them)."""

    def __init__(
        self,
        redis: Redis,
        ttl_s: int,
        retry: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
        max_batch: int = 64,
    ) -> None:
        # Calls never overlap (one in flight at a time), so they keep one connection of `redis`'s
        # pool (redis-py's `single_connection_client`) instead of taking one from the pool and
        # giving it back per call: the pool's lock, condition and bookkeeping were about a fifth of
        # a claim's client-side CPU (issue 19). A broken connection is reconnected by redis-py.
        self.redis = Redis(connection_pool=redis.connection_pool, single_connection_client=True)
        self.ttl_s = ttl_s
        self.retry = retry
        self.max_batch = max_batch  # claims per call: bounds one script's time in Redis
        self.sha = redis.register_script(SCRIPT).sha
        self.calls = 0  # Redis calls made, for tests and benchmarks
        self._queue: list[tuple[Claim, asyncio.Future[list[bytes | None]]]] = []
        self._busy = False
        self._sender: asyncio.Future[None] | None = None

    async def claim(
        self, claims: Sequence[tuple[str, str]], read: Sequence[str] = (), guard: int = 0
    ) -> list[bytes | None]:
        """SET NX GET every (key, value) of `claims`, then GET every key of `read`: the answer is
        the value stored before ours per claimed key (None where ours was stored), then each read
        value; it stops after the `guard`-th claim (1-based) when that one found a value."""
        if self._busy:  # a call is in flight: this claim goes with the others in the next one
            future: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
            self._queue.append(((claims, read, guard), future))
            return await future
        # None in flight: this claim goes at once, from its own task (no hop to a sender task and
        # back, which at a few claims per turn cost more loop turns than the saved calls), and the
        # claims asked meanwhile go to a sender started when it returns.
        self._busy = True
        try:
            answers = await self.retry(functools.partial(self._call, [(claims, read, guard)]))
        finally:
            if self._queue:
                self._sender = asyncio.ensure_future(self._send_all())  # referenced while it runs
            else:
                self._busy = False
        return answers[0]

    async def _send_all(self) -> None:
        live: list[tuple[Claim, asyncio.Future[list[bytes | None]]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                live = [(c, f) for c, f in batch if not f.done()]  # a cancelled job's claim is dropped
                if not live:
                    continue
                try:
                    answers = await self.retry(functools.partial(self._call, [c for c, _ in live]))
                except Exception as exc:  # not a Redis outage (retried): the script or its answer
                    for _, future in live:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for (_, future), answer in zip(live, answers, strict=True):
                        if not future.done():
                            future.set_result(answer)
                live = []
        finally:
            self._busy = False
            # Only when this sender was cancelled (the loop is stopping): nobody waits forever.
            for _, future in live + self._queue:
                future.cancel()
            self._queue = []

    async def _call(self, batch: list[Claim]) -> list[list[bytes | None]]:
        names: list[str] = []
        args: list[str | int] = [self.ttl_s, len(batch)]
        for claims, read, guard in batch:
            names.extend(k for k, _ in claims)
            names.extend(read)
            args.extend((len(claims), len(read), guard))
            args.extend(v for _, v in claims)
        self.calls += 1
        metrics.MEMO_CALLS.inc()
        metrics.MEMO_CLAIMS.inc(len(batch))
        try:
            return await self.redis.evalsha(self.sha, len(names), *names, *args)  # type: ignore[no-any-return]
        except NoScriptError:  # Redis lost its script cache (a restart)
            await self.redis.script_load(SCRIPT)
            return await self.redis.evalsha(self.sha, len(names), *names, *args)  # type: ignore[no-any-return]
