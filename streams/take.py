"""Batches of a Faust stream that start with their first event: the router's `take_events`.

Faust's `Stream.take_events(max_, within)` wakes up every `within` seconds whether or not an event
came, and cuts a batch wherever that clock happens to fall. At the router's 20 ms that was 50
wake-ups a second (each one a few asyncio tasks in `mode`'s `Service.wait`): half the idle
router's CPU (issue 19's profile), and a fetch's events split over two Redis round trips.
`take_after_first` waits, without a timer, for the first event, then up to `within` for more
(or until `max_`), so a batch is what came in about one fetch and an idle router sleeps. An event
waits at most `within` (Faust's: up to `within` too, `within`/2 on average).

Acks work as in Faust's: the batch's events are acked only when the consumer asks for the next
batch (or stops), so a batch is applied before its offsets can be committed. This copies Faust's
`take_events` (faust-streaming, pinned in requirements.lock) with that one change, and uses the
same Stream internals (`_enable_passive`, `_processors`, the generator tracking).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from faust.streams import _tracks_buffer_agen
from faust.types import EventT, StreamT
from mode.utils.futures import notify


@_tracks_buffer_agen
async def take_after_first(
    stream: StreamT[Any], max_: int, within: float
) -> AsyncGenerator[Sequence[EventT], None]:
    """Lists of up to `max_` events: each one cut `within` seconds after its first event."""
    s: Any = stream  # the internals below are not on StreamT
    events: list[EventT] = []
    first = asyncio.Event()
    full = asyncio.Event()
    consumed = asyncio.Event()
    consuming: asyncio.Future[None] | None = None

    async def add_to_buffer(value: Any) -> Any:
        nonlocal consuming
        try:
            if consuming is not None:  # the batch taken is still being processed
                try:
                    await consuming
                finally:
                    consuming = None
            event = s.current_event
            if event is None:
                raise RuntimeError("take_after_first found current_event is None")
            events.append(event)
            first.set()
            if len(events) >= max_:
                full.set()
                consumed.clear()  # never more than max_ in a batch
                await s.wait(consumed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            s.log.exception("Error adding to take buffer: %r", exc)
            await s.crash(exc)
        return value

    enable_acks = s.enable_acks
    s.enable_acks = False  # acked below, once the batch has been processed
    s.add_processor(add_to_buffer)
    s._enable_passive(aiter(s.channel))
    try:
        while not s.should_stop:
            # mode's wait returns "stopped" on a timeout too: the loop's condition decides.
            await s.wait_for_stopped(first)  # no timer: an idle router sleeps
            if events and not full.is_set():
                await s.wait_for_stopped(full, timeout=within)
            if not events:  # stopping
                continue
            consuming = s.loop.create_future()
            try:
                yield list(events)
            finally:
                for event in events:
                    await s.ack(event)
                events.clear()
                first.clear()
                notify(consuming)
                full.clear()
                consumed.set()
    finally:
        s.enable_acks = enable_acks
        s._processors.remove(add_to_buffer)
