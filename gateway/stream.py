"""One client's stream of a job: history after Last-Event-ID, then live, once each and in order.

The stream subscribes (in-process) before it reads history, so an event is either in the history
it reads or arrives live afterwards; duplicates are dropped by seq. Live events can still arrive
out of order (replays, a resync, a router restart), so events wait in `pending` until the event
before them has been delivered; a seq missing for `gap_wait_s` is looked up in history once more
and then skipped, so a stream never stalls on an event that will never come. Never while the
Redis view is being rebuilt, though (`view_ready`): then the missing event is on its way back
from the log, and the stream waits for the rebuild (the hub resyncs every stream when it ends).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from sse_starlette import ServerSentEvent

from contract.pipeline import attempt_of, is_failure_seq, next_seq

from .direct_write import BodyWriter
from .hub import Item, Subscriber
from .sse import LastChunk


class _SentTally(Collector):
    """`eco2_gateway_events_sent_total`, a plain int read at scrape time: a prometheus `Counter`
    takes a lock per `inc`, 1.5% of a gateway's samples at one inc per event (issue 23)."""

    def __init__(self) -> None:
        self.n = 0

    def inc(self, k: int = 1) -> None:
        self.n += k

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("eco2_gateway_events_sent", "events written to SSE clients", value=self.n)


SENT = _SentTally()
REGISTRY.register(SENT)
GAPS = Counter("eco2_gateway_gaps_skipped_total", "seqs given up on after gap_wait_s")

ReadHistory = Callable[[str, int], Awaitable[list[Item]]]


def in_order(seq: int, last: int) -> bool:
    """May `seq` follow `last` directly? The next seq of `last`'s attempt (contract.pipeline:
    after a failure, the next attempt's `queued`); the failure of `last`'s attempt may come after
    anything of it. After a seq of no known successor (a newer pipeline's), anything may."""
    nxt = next_seq(last)
    if nxt is None:
        return True
    return nxt == seq or (is_failure_seq(seq) and attempt_of(seq) == attempt_of(last) and seq > last)


KEEPALIVE = ServerSentEvent(comment="keepalive")
KEEPALIVE_FRAME = KEEPALIVE.encode()


def _chunk(items: list[Item], last: bool) -> bytes:
    SENT.inc(len(items))
    data = b"".join([item.frame() for item in items])
    return LastChunk(data) if last else data


class JobStream:
    def __init__(
        self,
        job_id: str,
        last_seq: int,
        sub: Subscriber,
        read_history: ReadHistory,
        *,
        history: list[Item] | None = None,
        keepalive_s: float,
        max_stream_s: float,
        gap_wait_s: float,
        view_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.job_id = job_id
        self.last = last_seq
        self.sub = sub
        self.read_history = read_history
        self.keepalive_s = keepalive_s
        self.max_stream_s = max_stream_s
        self.gap_wait_s = gap_wait_s
        self.view_ready = view_ready
        self.pending: dict[int, Item] = {}
        self.done = False
        self.last_write = time.monotonic()  # the keepalive counts from here
        self._write: BodyWriter | None = None  # the response's direct writer (`bind_writer`)
        self.history = history  # read after subscribing, with the owner check (one round trip)

    async def _fill(self) -> None:
        self.sub.resync = False  # cleared before reading: a later overflow flags it again
        for item in await self.read_history(self.job_id, self.last):
            self._add(item)

    def _add(self, item: Item) -> None:
        if item.seq > self.last and item.seq not in self.pending:
            self.pending[item.seq] = item

    def _ready(self, force: bool = False) -> list[Item]:
        out: list[Item] = []
        for seq in sorted(self.pending):
            if seq <= self.last:
                del self.pending[seq]
                continue
            if not force and not in_order(seq, self.last):
                break
            if force and not in_order(seq, self.last):
                GAPS.inc()
            item = self.pending.pop(seq)
            out.append(item)
            self.last = seq
            # A terminal event ends the stream, unless a later attempt (a re-drive) follows it.
            if item.terminal and not any(s > seq for s in self.pending):
                self.done = True
                break
        return out

    def ready_at_open(self) -> bool:
        """Does the stream's first item come at once? Yes when the history it was given holds the
        next event in order: `items` then yields it before waiting for anything
        (`LeanEventSourceResponse(first_ready=...)` starts its disconnect listener after it)."""
        after = [item.seq for item in self.history or () if item.seq > self.last]
        return bool(after) and in_order(min(after), self.last)

    def bind_writer(self, write: BodyWriter | None) -> None:
        """The response's direct writer (`LeanEventSourceResponse(on_writer=...)`), or None."""
        self._write = write

    def _direct(self, item: Item) -> bool:
        """Deliver `item` now, from the hub's dispatch, if it is the next event and not the last:
        the stream is waiting with nothing pending, so writing it here is what the stream's task
        would do, minus waking the task. Anything else (a duplicate, a jump ahead, the terminal
        event, a socket that is not writable now) is left to the task (False)."""
        write = self._write
        if write is None or item.terminal or self.pending or not in_order(item.seq, self.last):
            return False
        if not write(item.frame()):
            return False
        self.last = item.seq
        self.last_write = time.monotonic()
        SENT.inc()
        return True

    def _blocked(self) -> bool:
        return bool(self.pending) and not in_order(min(self.pending), self.last)

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """The stream's events one by one (`items`, flattened; a keepalive as `KEEPALIVE`)."""
        async for ready in self.items():
            if ready is None:
                yield KEEPALIVE
            for item in ready or ():
                SENT.inc()
                yield ServerSentEvent(data=item.data, event=item.event, id=str(item.seq))

    async def batches(self) -> AsyncIterator[bytes]:
        """The stream as SSE body chunks: everything deliverable at one moment in one chunk (one
        write, `gateway/sse.py`), each event's frame encoded once for all its streams
        (`Item.frame`); the chunk that ends the stream is a `LastChunk`."""
        async for ready in self.items():
            yield KEEPALIVE_FRAME if ready is None else _chunk(ready, self.done)

    async def items(self) -> AsyncIterator[list[Item] | None]:
        """The stream as lists of items, each what is deliverable at one moment (None: time for a
        keepalive). After the last list, `done` says whether the job's stream ended."""
        clock = time.monotonic
        deadline = clock() + self.max_stream_s
        self.last_write = clock()
        gap_deadline: float | None = None
        gap_read_at = -1
        if self.history is None:
            await self._fill()
        else:  # the resync flag stays: anything flagged since that read is read again below
            for item in self.history:
                self._add(item)
            self.history = None
        while True:
            if ready := self._ready():
                yield ready
                self.last_write = clock()
            if self.done:
                return
            if self.sub.resync:
                await self._fill()
                continue
            gap_deadline = (gap_deadline or clock() + self.gap_wait_s) if self.pending else None
            now = clock()
            if now >= deadline:
                return  # the client reconnects with Last-Event-ID and continues
            if gap_deadline is not None and now >= gap_deadline and not self.view_ready():
                gap_deadline = now + self.gap_wait_s  # the rebuild brings it back: keep waiting
            elif gap_deadline is not None and now >= gap_deadline:
                await self._fill()
                if ready := self._ready(force=True):
                    yield ready
                    self.last_write = clock()
                if self.done:
                    return
                gap_deadline = None
                continue
            if now - self.last_write >= self.keepalive_s:
                yield None
                self.last_write = now
                continue
            wake = min(deadline, gap_deadline or math.inf, self.last_write + self.keepalive_s)
            direct = self._direct if self._write is not None and not self.pending else None
            if not await self.sub.wait(wake - now, direct):
                continue
            for item in self.sub.drain():
                self._add(item)
            if self._blocked() and gap_read_at != self.last:
                # A live event jumped ahead: the missing ones may be in history (read once per gap).
                gap_read_at = self.last
                await self._fill()
