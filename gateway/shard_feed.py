"""The hub's one pub/sub connection as a raw asyncio protocol: RESP pushes parsed by hiredis in
`data_received`, each message handed to a plain callback.

redis-py's `PubSub.get_message` costs a coroutine chain per message (`parse_response`,
`call_with_retry`, `read_response`, the push handler) and a timeout per call: 15-20% of a
gateway's samples at 1,500 events/s, for every event of all 4 shards (issue 23's profile), since
every gateway process receives every event. Here a socket read is fed to one `hiredis.Reader`
(the C parser redis-py itself uses) and every complete reply in it is dispatched in one loop,
without a task, a future or a timer per message.

What this module owns of the Redis protocol (RESP2, as redis-py's default): the handshake
(AUTH when the URL carries a password, CLIENT SETNAME, SUBSCRIBE, sent in one write), the
replies it reads (`message`, `subscribe`, `pong` pushes; `+OK`; an error reply ends the
connection), and PING as the keepalive. `tests/test_gateway_shard_feed.py` pins these against
the real Redis server. Reconnecting, and the resync of every stream after a (re)subscribe, stay
in `gateway/hub.py`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

from contract.keys import LIVE_SEPARATOR as SEPARATOR

CONNECT_TIMEOUT_S = 5.0


def command(*args: str | bytes) -> bytes:
    """One command in RESP (an array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def handshake(url: str, channels: list[str], client_name: str | None) -> bytes:
    """What a new connection sends, in one write: AUTH (if the URL has a password), the client's
    name (CLIENT LIST shows a gateway's connections), SUBSCRIBE to every channel."""
    opts = parse_url(url)
    out = []
    if opts.get("password") is not None:
        user = opts.get("username")
        out.append(command("AUTH", user, opts["password"]) if user else command("AUTH", opts["password"]))
    if client_name:
        out.append(command("CLIENT", "SETNAME", client_name))
    out.append(command("SUBSCRIBE", *channels))
    return b"".join(out)


class ShardFeed(asyncio.Protocol):
    """One subscribed connection. `on_message(event)` for every event of every published message
    (`contract.keys.live_message`: a batch of a shard's events), in the order Redis sent them;
    `on_subscribed()` once every channel's subscription is confirmed; `closed` is done (with the
    reason, or None) when the connection ends."""

    def __init__(
        self, channels: list[str], on_message: Callable[[bytes], None], on_subscribed: Callable[[], None]
    ) -> None:
        self.channels = channels
        self.on_message = on_message
        self.on_subscribed = on_subscribed
        self.closed: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.last_seen = time.monotonic()
        self.messages = 0  # events received (the hub counts them in batches)
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._confirmed: set[bytes] = set()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        reader = self._reader
        reader.feed(data)
        on_message = self.on_message
        try:
            while (reply := reader.gets()) is not False:
                if type(reply) is list and reply[0] == b"message":
                    # One message carries a batch of a shard's events (contract/keys.py)
                    events = reply[2].split(SEPARATOR)
                    self.messages += len(events)
                    for event in events:
                        on_message(event)
                else:
                    self._control(reply)
        except hiredis.ProtocolError as exc:
            self.close(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc or ConnectionError("the pub/sub connection was closed"))

    # --- everything but a message ---

    def _control(self, reply: object) -> None:
        if isinstance(reply, hiredis.ReplyError):
            self.close(ConnectionError(f"Redis refused the pub/sub connection: {reply}"))
        elif type(reply) is list and reply[0] == b"subscribe":
            self._confirmed.add(reply[1])
            if len(self._confirmed) == len(self.channels):
                self.on_subscribed()
        # +OK (AUTH, CLIENT SETNAME), [pong, ''] (the keepalive), unsubscribe: nothing to do

    def ping(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(command("PING"))

    def close(self, why: Exception | None = None) -> None:
        if not self.closed.done():
            self.closed.set_result(why)
        if self._transport is not None:
            self._transport.abort()


async def open_feed(
    url: str,
    channels: list[str],
    on_message: Callable[[bytes], None],
    on_subscribed: Callable[[], None],
    client_name: str | None = None,
) -> ShardFeed:
    """Connect to `url` (redis://, rediss:// or unix://, as redis-py reads it) and subscribe."""
    loop = asyncio.get_running_loop()
    opts = parse_url(url)
    cls = opts.get("connection_class")

    def factory() -> ShardFeed:
        return ShardFeed(channels, on_message, on_subscribed)

    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        if cls is UnixDomainSocketConnection:
            _, feed = await loop.create_unix_connection(factory, opts["path"])
        else:
            tls = ssl.create_default_context() if cls is SSLConnection else None
            _, feed = await loop.create_connection(
                factory, opts.get("host", "localhost"), opts.get("port", 6379), ssl=tls
            )
    assert feed._transport is not None
    feed._transport.write(handshake(url, channels, client_name))
    return feed
