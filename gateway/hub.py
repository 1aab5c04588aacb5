"""One Redis pub/sub connection per process, fanned out in-process to per-job subscribers.

The gateway never opens a Redis connection per client (the replaced system's 1 SSE : 21 broker
connections is what sank it): one connection subscribed to the 4 shard channels, dispatching each
event to the bounded buffers of that job's streams. Dispatch never blocks: a buffer that is full
is dropped and its stream told to resync from history, so a slow client only delays itself.
The connection is read by `shard_feed.py` (a raw protocol: no task or future per message); this
module keeps it alive (PING), reconnects it, and resyncs every stream once it is subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter
from sse_starlette import ServerSentEvent

from contract import keys, versioning
from contract.events import is_terminal, sse_event_name
from contract.topics import EVENTS_PARTITIONS

from .shard_feed import ShardFeed, open_feed

log = logging.getLogger("eco2.gateway.hub")

RESYNCS = Counter("eco2_gateway_resyncs_total", "streams told to re-read history", ["reason"])
LIVE = Counter("eco2_gateway_live_events_total", "events received on the pub/sub connection")
UNREADABLE = Counter(
    "eco2_gateway_unreadable_entries_total", "history entries skipped: unknown schema major or malformed"
)

PING_EVERY_S = 5.0  # the pub/sub connection is pinged this often ...
SILENT_LIMIT_S = 3 * PING_EVERY_S  # ... and reconnected when nothing (not even PONG) came back


@dataclass(frozen=True, slots=True)
class Item:
    """One event as the gateway handles it: the stored JSON plus what ordering needs."""

    job_id: str
    seq: int
    event: str  # SSE event name: the stage, or "failed" for a failure
    terminal: bool
    data: str  # the event JSON exactly as the router stored it
    _frame: bytes | None = field(default=None, compare=False, repr=False)

    def frame(self) -> bytes:
        """The event as an SSE frame (sse-starlette's `ServerSentEvent.encode`), encoded once and
        shared by every stream this item goes to (the hub hands one Item to all of a job's
        streams)."""
        frame = self._frame
        if frame is None:
            data, event = self.data, self.event
            if "\n" in data or "\r" in data or "\n" in event or "\r" in event:  # sse-starlette's rules
                frame = ServerSentEvent(data=data, event=event, id=str(self.seq)).encode()
            else:  # one line (the router's compact JSON): `encode`'s bytes without its StringIO
                frame = f"id: {self.seq}\r\nevent: {event}\r\ndata: {data}\r\n\r\n".encode()
            object.__setattr__(self, "_frame", frame)  # a cache: equality and hash ignore it
        return frame

    @classmethod
    def parse(cls, raw: bytes | str) -> Item:
        data = raw.decode() if isinstance(raw, bytes) else raw
        d = _json_object(data)
        versioning.check(d.get(versioning.FIELD))  # any 1.x; its unknown fields go out untouched
        stage, status = d["stage"], d["status"]
        event, terminal = sse_event_name(stage, status), is_terminal(stage, status)
        return cls(d["job_id"], int(d["seq"]), event, terminal, data)


_raw_decode = json.JSONDecoder().raw_decode


def _json_object(data: str) -> dict[str, Any]:
    """`json.loads(data)` for a JSON object: its `raw_decode` straight away, without the two Python
    calls and the whitespace regex around it (the history's 10 events per stream opened, issue
    23); anything but one object alone (whitespace around it, or something after it) goes through
    `json.loads`, which parses it or says why not."""
    if data[:1] == "{":
        d, end = _raw_decode(data)
        if end == len(data):
            return d  # type: ignore[no-any-return]
    d = json.loads(data)
    if not isinstance(d, dict):
        raise TypeError("not a JSON object")
    return d


def history_items(raws: Iterable[bytes | str]) -> list[Item]:
    """The history entries this gateway can read; one of an unknown schema major (or malformed) is
    skipped and counted, and the stream treats its seq as a gap (contract/versioning.py)."""
    out: list[Item] = []
    for raw in raws:
        try:
            out.append(Item.parse(raw))
        except (ValueError, KeyError, TypeError) as exc:
            UNREADABLE.inc()
            log.error("skipping unreadable history entry: %s", exc)
    return out


_JOB_KEY = b'"job_id":"'


def peek_job_id(raw: bytes) -> str | None:
    """The top-level `job_id` of an event's JSON without parsing it, or None when that cannot be
    told for sure (then the caller parses). Every process of the gateway receives every event of
    its shards and most are for jobs it does not serve: this spares their `json.loads`.

    Sure means: the key is at the top level (no `{` before it: in a nested object it would be
    another job_id; a `{` inside a string only costs a parse) and the id has no escapes. Both
    quotes of `"job_id":"` unescaped cannot lie inside a string value."""
    if not isinstance(raw, bytes):
        return None
    i = raw.find(_JOB_KEY)
    if i < 0 or raw.find(b"{", 1, i) >= 0:
        return None
    start = i + len(_JOB_KEY)
    end = raw.find(b'"', start)
    if end < 0 or raw.find(b"\\", start, end) >= 0:
        return None
    try:
        return raw[start:end].decode()
    except UnicodeDecodeError:
        return None


class Subscriber:
    """A stream's live buffer: bounded; on overflow it is emptied and flagged for a resync.

    While its stream waits with nothing buffered, `direct` (set by `wait`) may take an item at
    once instead: the stream writes it to its socket from the hub's dispatch, with no wake-up of
    its task (`JobStream._direct`). It returns False for anything it does not take, which is then
    buffered as always."""

    __slots__ = ("job_id", "items", "maxsize", "resync", "direct", "_wake")

    def __init__(self, job_id: str, maxsize: int) -> None:
        self.job_id = job_id
        self.items: list[Item] = []
        self.maxsize = maxsize
        self.resync = False
        self.direct: Callable[[Item], bool] | None = None
        self._wake = asyncio.Event()

    def push(self, item: Item) -> None:
        direct = self.direct  # set only while the stream waits: nothing buffered, no wake-up due
        if direct is not None and not self._wake.is_set():
            try:
                if direct(item):
                    return
            except Exception:  # one stream's failed write must not end the hub's read of the rest
                log.exception("direct write to a stream of %s failed; its task sends instead", self.job_id)
        if len(self.items) >= self.maxsize:
            self.items.clear()  # everything dropped here is in the history the resync reads
            if not self.resync:
                RESYNCS.labels("overflow").inc()
            self.resync = True
        else:
            self.items.append(item)
        self._wake.set()

    def mark_resync(self) -> None:
        self.resync = True
        self._wake.set()

    def drain(self) -> list[Item]:
        items, self.items = self.items, []
        return items

    async def wait(self, seconds: float, direct: Callable[[Item], bool] | None = None) -> bool:
        """Wait until an item or a resync arrives; False on timeout. The timeout is a timer that
        sets the wake event, not an `asyncio.timeout` (a cancel scope and a rescheduled timer
        per wait were a tenth of the gateway's samples per event, issue 23). `direct`: what
        takes an item while this waits (see the class)."""
        if self.items or self.resync:
            return True
        self._wake.clear()
        timer = asyncio.get_running_loop().call_later(max(seconds, 0.0), self._wake.set)
        self.direct = direct
        try:
            await self._wake.wait()
        finally:
            self.direct = None
            timer.cancel()
        return bool(self.items or self.resync)


class Hub:
    def __init__(
        self, redis_url: str, queue_size: int, shards: int = EVENTS_PARTITIONS, client_name: str | None = None
    ) -> None:
        self.redis_url = redis_url
        self.client_name = client_name
        self.queue_size = queue_size
        self.channels = [keys.shard_channel(i) for i in range(shards)]
        self.subs: dict[str, set[Subscriber]] = {}
        self.connected = False
        self._task: asyncio.Task[None] | None = None

    # --- subscribers (in-process only: no Redis command per client) ---

    def subscribe(self, job_id: str) -> Subscriber:
        sub = Subscriber(job_id, self.queue_size)
        self.subs.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self.subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subs[sub.job_id]

    def _all(self) -> Iterable[Subscriber]:
        for subs in self.subs.values():
            yield from subs

    def _dispatch(self, raw: bytes) -> None:
        job_id = peek_job_id(raw)
        if job_id is not None and job_id not in self.subs:
            return  # no stream of this process follows the job: not even parsed (issue 23)
        try:
            item = Item.parse(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring malformed live event: %s", exc)
            return
        for sub in self.subs.get(item.job_id, ()):
            sub.push(item)

    # --- the one pub/sub connection (gateway/shard_feed.py) ---

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-pubsub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _subscribed(self) -> None:
        """Every channel's subscription confirmed (first, or after a reconnect): events published
        while this process was not subscribed are only in history, so every stream resyncs."""
        if not self.connected:
            log.info("pub/sub subscribed to %s", ",".join(self.channels))
        self.connected = True
        self.resync_all("reconnect")

    async def _run(self) -> None:
        delay = 0.2
        while True:
            feed: ShardFeed | None = None
            try:
                feed = await open_feed(
                    self.redis_url, self.channels, self._dispatch, self._subscribed, self.client_name
                )
                counted = 0
                while True:  # the connection's reader is the protocol: this only keeps it alive
                    done, _ = await asyncio.wait([feed.closed], timeout=PING_EVERY_S)
                    LIVE.inc(feed.messages - counted)
                    counted = feed.messages
                    if done:
                        raise feed.closed.result() or ConnectionError("the pub/sub connection was closed")
                    silent = time.monotonic() - feed.last_seen
                    if silent > SILENT_LIMIT_S:
                        raise ConnectionError(f"no reply on pub/sub for {silent:.0f}s")
                    if self.connected:
                        delay = 0.2
                    feed.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected:
                    log.warning("pub/sub connection lost (%s); reconnecting", exc)
                self.connected = False
            finally:
                if feed is not None:
                    feed.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def resync_all(self, reason: str) -> None:
        n = 0
        for sub in self._all():
            sub.mark_resync()
            n += 1
        if n:
            RESYNCS.labels(reason).inc(n)
