"""Offset commits that never pass a message still being processed.

Faust (0.15.x) works out the offset to commit from its list of acked offsets plus the "gaps" it
saw between fetched offsets, and both go wrong when an agent runs many jobs at once
(faust-streaming issues #606, #312):
- the gap it records between two fetched messages includes the later message's own offset, so
  on a topic written in transactions (every record is followed by a commit marker) a later ack
  fills in an earlier message that is still in flight;
- a single unacked offset at the head of the partition is taken for a compacted hole, so one
  slow job at the committed position is committed over as soon as the next one is acked.
Either way a worker killed at that moment loses the job for good.

The rule here is simpler and holds whatever the holes are: per partition, commit the lowest
offset fetched and handed to a stream but not yet acked; with none outstanding, one past the
last offset handed over. Holes (transaction markers, compaction) need no bookkeeping at all.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from faust.transport import consumer as faust_consumer


class InFlight:
    """Per partition: the messages handed to streams, in offset order, and the next offset.

    Tracked by message, not offset: after a rebalance the same offset is fetched again while the
    old copy may still sit in a stream's buffer, where Faust acks it unprocessed (stale
    generation). Only the newest copy of an offset counts."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._taken: dict[Any, OrderedDict[int, Any]] = defaultdict(OrderedDict)
        self._since: dict[Any, dict[int, float]] = defaultdict(dict)  # offset -> when delivered
        self._next: dict[Any, int] = {}
        self.clock = clock
        self.deliveries = 0  # ever: the health watcher's evidence that fetching goes on

    def delivered(self, tp: Any, message: Any) -> None:
        self.deliveries += 1
        self._taken[tp][message.offset] = message
        self._since[tp][message.offset] = self.clock()
        if message.offset + 1 > self._next.get(tp, -1):
            self._next[tp] = message.offset + 1

    def dropped(self, tp: Any, message: Any) -> None:
        """No stream took it, so nothing will ever ack it (Faust skips it as well)."""
        offset, taken = message.offset, self._taken.get(tp)
        if taken is not None and taken.get(offset) is message:
            del taken[offset]
            self._since[tp].pop(offset, None)

    def committable(self, tp: Any) -> int | None:
        """The offset the group may commit for `tp`: everything below it is done.

        Offsets arrive in increasing order within one assignment, so the first unacked message
        in delivery order is the lowest one."""
        taken = self._taken.get(tp)
        while taken:
            offset, message = next(iter(taken.items()))
            if not message.acked:
                return offset
            taken.popitem(last=False)
            self._since[tp].pop(offset, None)
        return self._next.get(tp)

    def outstanding(self, tp: Any) -> int:
        """Messages of `tp` handed to streams and not acked yet."""
        return sum(1 for m in self._taken.get(tp, {}).values() if not m.acked)

    def oldest_age(self, tp: Any) -> float:
        """Seconds since the oldest unacked message of `tp` was delivered (0 when none): the
        message that holds the partition's commit."""
        head = self.committable(tp)
        taken = self._taken.get(tp)
        if head is None or not taken or head not in taken:
            return 0.0
        return max(0.0, self.clock() - self._since[tp].get(head, self.clock()))

    def forget(self, tps: Iterable[Any]) -> None:
        """Partitions revoked or re-assigned: they are read again from the committed offset."""
        for tp in tps:
            self._taken.pop(tp, None)
            self._since.pop(tp, None)
            self._next.pop(tp, None)


def committed_offsets(consumer: Any) -> Mapping[Any, int | None]:
    """The offsets Faust's consumer last committed, per partition (its own bookkeeping)."""
    return dict(consumer._committed_offset)


def install() -> None:
    """Patch Faust's consumer to commit by `InFlight`; idempotent, applied by `create_app`."""
    cls: Any = faust_consumer.Consumer
    if getattr(cls, "_eco2_in_flight_commits", False):
        return
    init = cls.__init__
    revoked, assigned = cls.on_partitions_revoked, cls.on_partitions_assigned

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.in_flight = InFlight()
        deliver: Callable[[Any], Awaitable[Any]] = self.callback

        async def callback(message: Any) -> Any:
            # Recorded before a stream can see it, so an ack never comes first. A delivery cut
            # short (flow stopped for a rebalance) stays outstanding until the partition is
            # revoked: stalling a commit is safe, passing the message is not.
            self.in_flight.delivered(message.tp, message)
            result = await deliver(message)
            if message.refcount == 0 and not message.acked:
                self.in_flight.dropped(message.tp, message)
            return result

        self.callback = callback

    def new_offset(self: Any, tp: Any) -> int | None:
        # Acks are read from each message's `acked` flag: Faust's Cython stream iterator sets it
        # without calling Consumer.ack, so there is no method to hook. Faust's own list of acked
        # offsets is now only its signal that there is something to commit.
        self._acked[tp].clear()
        self._acked_index[tp].clear()
        committable: int | None = self.in_flight.committable(tp)
        return committable

    async def add_gap(self: Any, tp: Any, offset_from: int, offset_to: int) -> None:
        return None  # holes need no bookkeeping: see the module docstring

    async def on_revoked(self: Any, tps: Any) -> None:
        await revoked(self, tps)  # may still commit what finished while it waited
        self.in_flight.forget(tps)

    async def on_assigned(self: Any, tps: Any, generation_id: int = 0) -> None:
        self.in_flight.forget(tps)
        await assigned(self, tps, generation_id)

    cls.__init__ = __init__
    cls._new_offset = new_offset
    cls._add_gap = add_gap
    cls.on_partitions_revoked = on_revoked
    cls.on_partitions_assigned = on_assigned
    cls._eco2_in_flight_commits = True
