"""A Lua script called on a few connections of its own: the EVALSHA written and its reply read on
a redis-py `Connection`, without the client's per-call path.

Every stream's open is one script call (`gateway/first_read.py`, or the snapshot alone with the
leases off). Through `Redis.execute_command` that call also goes through the blocking pool (a
condition, a lock and a timeout to check a connection out, another condition to give it back),
the retry wrapper, the observability recorder and the response-callback lookup: in issue 23's
stream-cost profile (round 5) that was about a fifth of a stream's CPU, more than the command's
packing and parsing. `ScriptCall` keeps up to `spare` connections of its own, checked out of
the client's pool once (so with its settings: address, client name, timeouts, health checks;
and within its size) and uses the connection's public `send_command` / `read_response`.

Whatever is not the plain case goes through redis-py's `AsyncScript`, as before: no idle
connection of its own and `spare` already open (a burst of opens), the script not loaded yet
(NOSCRIPT: redis-py loads it and runs it), a connection that fails (redis-py's retries run; the
failed connection is dropped). A call cancelled mid-reply (the caller's timeout) drops its
connection: redis-py's `read_response` disconnects it, and a half-read reply is never reused.
The connection's own socket timeout is replaced, while it is kept, by one deadline over each
call (`timeout_s`, the socket timeout by default): redis-py would run every write in
`asyncio.wait_for`, a task per call.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError


class ScriptCall:
    """`await call(keys=[...], args=[...])`: what redis-py's `Redis.register_script(script)`
    object answers, on a connection of its own when one is free."""

    def __init__(
        self, redis: aioredis.Redis, script: str, spare: int | None = None, timeout_s: float | None = None
    ) -> None:
        """`spare`: connections it may keep, by default a quarter of the pool's (the gateway's 8:
        2 for the first read, 2 for the snapshot read alone), so the pool's other callers always
        have the rest. `timeout_s`: how long one call may take, write and reply (by default the
        pool's socket timeout)."""
        self.script = redis.register_script(script)
        self._pool = redis.connection_pool
        self._idle: list[AbstractConnection] = []
        self._open = 0
        self.spare = self._pool.max_connections // 4 if spare is None else spare
        kwargs = self._pool.connection_kwargs  # type: ignore[attr-defined]
        self.timeout_s = kwargs.get("socket_timeout") if timeout_s is None else timeout_s

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        conn = self._idle.pop() if self._idle else await self._connect()
        if conn is None:
            return await self.script(keys=keys, args=args)
        try:
            async with asyncio.timeout(self.timeout_s):
                await conn.send_command("EVALSHA", self.script.sha, len(keys), *keys, *args)
                reply = await conn.read_response()
        except NoScriptError:
            self._idle.append(conn)
            return await self.script(keys=keys, args=args)  # loads it, then runs it
        except TimeoutError:  # its own deadline (asyncio's): as redis-py's socket timeout says it
            await self._drop(conn)
            raise RedisTimeoutError(f"no reply from Redis within {self.timeout_s} s") from None
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await self._drop(conn)
            return await self.script(keys=keys, args=args)  # with redis-py's retries
        except BaseException:  # cancelled, or the script's own error: never reuse a half-read reply
            await self._drop(conn)
            raise
        self._idle.append(conn)
        return reply

    @property
    def connections(self) -> int:
        """Connections of its own open now (at most `spare`)."""
        return self._open

    async def _connect(self) -> AbstractConnection | None:
        """A connection checked out of the client's pool for good (so the pool's size still bounds
        the process's connections), only when the pool has one free now: never a wait here."""
        if self._open >= self.spare or not self._pool.can_get_connection():  # type: ignore[attr-defined]
            return None
        self._open += 1
        try:
            conn: AbstractConnection = await self._pool.get_connection()
        except BaseException:
            self._open -= 1
            raise
        # One deadline over the whole call instead (`__call__`): with a socket timeout redis-py
        # runs every write in `asyncio.wait_for`, a task per call, and every read under a timeout
        # of its own. Given back to the pool as it came (`_give_back`).
        conn.socket_timeout = None
        return conn

    async def _give_back(self, conn: AbstractConnection) -> None:
        self._open -= 1
        conn.socket_timeout = self._pool.connection_kwargs.get("socket_timeout")  # type: ignore[attr-defined]
        await self._pool.release(conn)  # the pool connects it again when it hands it out

    async def _drop(self, conn: AbstractConnection) -> None:
        try:
            await conn.disconnect(nowait=True)  # read_response has done so already on most errors
        finally:
            await self._give_back(conn)

    async def aclose(self) -> None:
        """Give the idle connections of its own back to the pool (before the client's `aclose`)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._give_back(conn)
