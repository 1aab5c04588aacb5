"""The offset a stage worker commits never passes a message still being processed.

Runs Faust's real consumer class (patched by streams.commits) on hand-made messages; no broker.
The end-to-end check is tests/test_pipeline.py::test_a_slow_job_holds_its_partitions_commit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from contract.settings import Settings
from contract.topics import STAGE_TOPICS
from streams.app import create_app, topic
from streams.commits import InFlight

ANSWER = STAGE_TOPICS["answer"]
TP0 = TP(ANSWER, 0)

Deliver = Callable[[int], Awaitable[ConsumerMessage]]


@pytest.fixture
async def consumer(tmp_path: Any) -> tuple[Any, Deliver]:
    app = create_app("unit-commits", Settings(local_dir=tmp_path))
    app.topics.add(topic(app, ANSWER))
    await app.topics._update_indices()  # type: ignore[attr-defined]  # what the conductor does on subscribe: acks on for ANSWER

    async def into_stream(message: Any) -> None:
        message.incref()  # one stream holds it until it acks

    async def nothing(*_: Any) -> None:
        return None

    c: Any = app.transport.create_consumer(
        callback=into_stream, on_partitions_revoked=nothing, on_partitions_assigned=nothing
    )

    async def deliver(offset: int) -> ConsumerMessage:
        m = ConsumerMessage(ANSWER, 0, offset, 0.0, 0, [], b"job", b"{}", None, tp=TP0)
        await c.callback(m)  # the fetcher's path into the streams
        return m

    return c, deliver


async def test_a_slow_message_at_the_head_holds_the_commit(consumer: tuple[Any, Deliver]) -> None:
    c, deliver = consumer
    slow, *fast = [await deliver(o) for o in (10, 11, 12)]
    for m in fast:
        m.ack(c)
    assert c._new_offset(TP0) == 10  # Faust alone said 13 (faust-streaming #606)
    slow.ack(c)
    assert c._new_offset(TP0) == 13


async def test_transaction_markers_between_messages(consumer: tuple[Any, Deliver]) -> None:
    """Every record the scan API writes is followed by a commit marker: offsets 10, 12, 14."""
    c, deliver = consumer
    slow, *fast = [await deliver(o) for o in (10, 12, 14)]
    for m in fast:
        m.ack(c)
    assert c._new_offset(TP0) == 10
    slow.ack(c)
    assert c._new_offset(TP0) == 15


async def test_unacked_in_the_middle(consumer: tuple[Any, Deliver]) -> None:
    c, deliver = consumer
    first, middle, last = [await deliver(o) for o in (3, 4, 5)]
    first.ack(c)
    last.ack(c)
    assert c._new_offset(TP0) == 4
    middle.ack(c)
    assert c._new_offset(TP0) == 6


async def test_a_stale_copy_acked_unprocessed_does_not_count(consumer: tuple[Any, Deliver]) -> None:
    """After a rebalance offset 10 is fetched again; Faust acks the old copy still in a buffer
    without processing it (stale generation). The new copy, in flight, holds the commit."""
    c, deliver = consumer
    old = await deliver(10)
    new = await deliver(10)
    old.ack(c)
    assert c._new_offset(TP0) == 10
    new.ack(c)
    assert c._new_offset(TP0) == 11


def test_forgotten_partitions_commit_nothing() -> None:
    flight = InFlight()
    a, b = Msg(7), Msg(1)
    flight.delivered("a", a)
    flight.delivered("b", b)
    flight.forget(["a"])
    assert flight.committable("a") is None
    assert flight.committable("b") == 1
    b.acked = True
    assert flight.committable("b") == 2


class Msg:
    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.acked = False


async def test_the_faust_internals_health_reads_are_there(consumer: tuple[Any, Deliver]) -> None:
    """streams/watch.py reads Faust's committed offsets and the in-flight counters; fails when
    an upgrade renames them."""
    from streams.commits import committed_offsets

    c, deliver = consumer
    assert committed_offsets(c) == {}
    c._committed_offset[TP0] = 7
    assert committed_offsets(c) == {TP0: 7}
    before = c.in_flight.deliveries
    m = await deliver(7)
    assert c.in_flight.deliveries == before + 1 and c.in_flight.outstanding(TP0) == 1
    m.ack(c)
    assert c.in_flight.outstanding(TP0) == 0
