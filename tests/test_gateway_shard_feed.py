"""`gateway/shard_feed.py`: the hub's raw pub/sub connection, pinned against the real Redis server
(the RESP replies it reads: subscribe confirmations, message pushes, PONG, error replies) and the
hub's keepalive around it (a silent connection is dropped and reconnected). Seconds in all."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from contract.settings import Settings
from gateway import hub as hub_mod
from gateway.hub import Hub
from gateway.shard_feed import ShardFeed, command, handshake, open_feed
from view import client


async def _until(cond: object, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_messages_arrive_once_in_order_after_every_channel_is_confirmed(settings: Settings) -> None:
    channels = [f"test-feed-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    name = f"test-feed-{uuid.uuid4().hex[:8]}"
    got: list[bytes] = []
    subscribed: list[int] = []
    feed = await open_feed(settings.redis_url, channels, got.append, lambda: subscribed.append(1), name)
    r = client(settings.redis_url, "test-feed-pub")
    try:
        await _until(lambda: subscribed)
        assert subscribed == [1]  # once for all channels, not once per channel
        mine = [c for c in await r.client_list() if c["name"] == name]
        assert len(mine) == 1 and int(mine[0]["sub"]) == 2  # named, one connection, both channels
        sent = [f'{{"n":{i},"s":"a\\r\\nb {"x" * (i * 37 % 3000)}"}}'.encode() for i in range(300)]
        for i, body in enumerate(sent):
            await r.publish(channels[i % 2], body)
        await _until(lambda: len(got) >= len(sent))
        assert got == sent and feed.messages == len(sent)
        seen = feed.last_seen
        await asyncio.sleep(0.01)
        feed.ping()  # in subscribed mode Redis answers [pong, ""]: no message, but alive
        await _until(lambda: feed.last_seen > seen)
        assert len(got) == len(sent) and not feed.closed.done()
    finally:
        feed.close()
        await r.aclose()
    assert await asyncio.wait_for(feed.closed, 1) is None


async def test_an_error_reply_ends_the_connection(settings: Settings) -> None:
    """The stack's Redis has no password: AUTH is refused, and the feed ends with that reason."""
    url = settings.redis_url.replace("redis://", "redis://:wrong@")
    feed = await open_feed(url, ["test-feed-x"], lambda _: None, lambda: None)
    why = await asyncio.wait_for(feed.closed, 5)
    assert isinstance(why, ConnectionError) and "AUTH" in str(why)


async def test_pushes_split_anywhere_are_read_whole() -> None:
    got: list[bytes] = []
    subscribed: list[int] = []
    feed = ShardFeed(["c0", "c1"], got.append, lambda: subscribed.append(1))
    wire = b"".join(
        [
            b"+OK\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nc0\r\n:1\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n$2\r\nc1\r\n:2\r\n",
            b"*3\r\n$7\r\nmessage\r\n$2\r\nc0\r\n$5\r\nfirst\r\n",
            b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
            b"*3\r\n$7\r\nmessage\r\n$2\r\nc1\r\n$12\r\nsec\rnd\nthird\r\n",  # a batch of two
        ]
    )
    for i in range(len(wire)):
        feed.data_received(wire[i : i + 1])
    assert got == [b"first", b"sec\rnd", b"third"] and subscribed == [1]
    assert feed.messages == 3  # events, not messages


def test_handshake_is_auth_name_and_subscribe_in_one_write() -> None:
    assert handshake("redis://127.0.0.1:6379/0", ["a"], None) == command("SUBSCRIBE", "a")
    assert handshake("redis://u:p@h:1/0", ["a", "b"], "gw-1") == b"".join(
        [command("AUTH", "u", "p"), command("CLIENT", "SETNAME", "gw-1"), command("SUBSCRIBE", "a", "b")]
    )
    assert handshake("redis://:p@h:1/0", ["a"], None).startswith(command("AUTH", "p"))


async def test_hub_drops_a_silent_connection_and_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts and never answers (not even PONG): the hub gives up on it after
    SILENT_LIMIT_S and connects again, and is never `connected` meanwhile."""
    monkeypatch.setattr(hub_mod, "PING_EVERY_S", 0.05)
    monkeypatch.setattr(hub_mod, "SILENT_LIMIT_S", 0.2)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hub = Hub(f"redis://127.0.0.1:{port}/0", queue_size=10)
    await hub.start()
    try:
        await _until(lambda: len(accepted) >= 2)
        assert not hub.connected
    finally:
        await hub.stop()
        for w in accepted:
            w.close()
        server.close()
