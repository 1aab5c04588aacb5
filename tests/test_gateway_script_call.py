"""Issue 23: `gateway/script_call.py`, a Lua script on connections of its own, answers as redis-py's
registered script does: the same reply, NOSCRIPT loaded, a killed connection replaced, a cancelled
call's connection never reused, never more connections than the client's pool, and the pool's
other callers never kept waiting by it. Against a Redis of the test's own; about a second."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

import view
from gateway.script_call import ScriptCall

from .gateway_support import RedisServer

pytestmark = pytest.mark.integration

ECHO = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"
SLOW = "local t = redis.call('TIME'); local e = t[1] * 1e6 + t[2] + 300000; " \
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= e; return 1"


def pooled(url: str, size: int = 4) -> aioredis.Redis:
    return view.pooled_client(url, size, "eco2-test-script-call")


async def test_the_same_reply_as_redis_pys_script_and_noscript_loaded(own_redis: RedisServer) -> None:
    r = pooled(own_redis.url)
    try:
        call = ScriptCall(r, ECHO)
        # Not loaded yet: NOSCRIPT on its own connection, then redis-py loads and runs it.
        assert await call(keys=["k"], args=["a"]) == [b"k", b"a", 1]
        assert call.connections == 1
        assert await call(keys=["k"], args=["b"]) == [b"k", b"b", 2]
        assert await r.register_script(ECHO)(keys=["k"], args=["c"]) == [b"k", b"c", 3]
        await r.script_flush()
        assert await call(keys=["k"], args=["d"]) == [b"k", b"d", 4]  # loaded again
        assert call.connections == 1
        with pytest.raises(ResponseError):  # the script's own error reaches the caller
            await ScriptCall(r, "return redis.call('NOSUCHCOMMAND')")(keys=[], args=[])
        await call.aclose()
        assert call.connections == 0
    finally:
        await r.aclose()


async def test_a_killed_connection_is_replaced_and_the_call_answers(own_redis: RedisServer) -> None:
    r = pooled(own_redis.url)
    try:
        call = ScriptCall(r, ECHO)
        assert await call(keys=["k"], args=["a"]) == [b"k", b"a", 1]
        await r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert await call(keys=["k"], args=["b"]) == [b"k", b"b", 2]
        assert await call(keys=["k"], args=["c"]) == [b"k", b"c", 3]
    finally:
        await r.aclose()


async def test_a_cancelled_call_drops_its_connection_and_the_next_reads_its_own_reply(
    own_redis: RedisServer,
) -> None:
    r = pooled(own_redis.url)
    try:
        call, slow = ScriptCall(r, ECHO), ScriptCall(r, SLOW)
        await r.script_load(SLOW)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await slow(keys=[], args=[])
        assert slow.connections == 0  # its half-read reply is never read by another call
        await asyncio.sleep(0.4)
        for i in range(3):
            assert await call(keys=["k"], args=[str(i)]) == [b"k", str(i).encode(), i + 1]
    finally:
        await r.aclose()


async def test_within_the_pool_and_the_pools_other_callers_served(own_redis: RedisServer) -> None:
    r = pooled(own_redis.url, size=4)
    try:
        call = ScriptCall(r, ECHO)
        assert call.spare == 1  # a quarter of the pool
        await r.script_load(ECHO)
        replies = await asyncio.gather(*(call(keys=["k"], args=[str(i)]) for i in range(20)))
        assert sorted(reply[2] for reply in replies) == list(range(1, 21))
        assert call.connections == 1
        async with asyncio.timeout(2):  # the rest of the pool serves everyone else
            listing = await asyncio.gather(*(r.client_list() for _ in range(6)))
        assert len([c for c in listing[0] if c.get("name") == "eco2-test-script-call"]) <= 4
        await call.aclose()
        assert call.connections == 0 and len(r.connection_pool._in_use_connections) == 0
    finally:
        await r.aclose()


async def test_a_redis_that_hangs_gets_one_deadline_per_call_and_a_timeout_error(
    own_redis: RedisServer,
) -> None:
    """The kept connection's socket timeout is replaced by one deadline over the call (and put
    back when the connection goes back to the pool); a hung Redis is redis-py's TimeoutError."""
    import signal

    from redis.exceptions import TimeoutError as RedisTimeoutError

    r = pooled(own_redis.url)
    try:
        call = ScriptCall(r, ECHO, timeout_s=0.3)
        assert ScriptCall(r, ECHO).timeout_s == r.connection_pool.connection_kwargs["socket_timeout"]
        assert await call(keys=["k"], args=["a"]) == [b"k", b"a", 1]
        kept = call._idle[0]
        assert kept.socket_timeout is None
        assert own_redis.popen is not None
        own_redis.popen.send_signal(signal.SIGSTOP)
        try:
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(RedisTimeoutError):
                await call(keys=["k"], args=["b"])
            assert asyncio.get_running_loop().time() - t0 < 3  # its deadline, not the socket's 5 s
            assert call.connections == 0
            assert kept.socket_timeout == r.connection_pool.connection_kwargs["socket_timeout"]
        finally:
            own_redis.popen.send_signal(signal.SIGCONT)
        assert (await call(keys=["k"], args=["c"]))[1] == b"c"  # b may have run once Redis woke
    finally:
        await r.aclose()
