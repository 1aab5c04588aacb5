"""Idle consumers long-poll for the first record; busy ones fetch as configured (runtime/idle_fetch.py).

Integration, on the real broker (~3 s): every FetchRequest a consumer sends is recorded, so the
test reads what the broker was asked (min bytes, max wait), not how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.protocol.fetch import FetchRequest

from contract.settings import Settings
from runtime import idle_fetch

from .conftest import scratch_topic

BUSY = (65536, 100)  # the consumer's own (min bytes, max wait ms)
IDLE_WAIT_MS = 1500


def test_the_patch_relies_on_fetch_request_fields() -> None:
    request = FetchRequest(7, 9, 1, 0, [])
    assert (request._max_wait_ms, request._min_bytes) == (7, 9)


@pytest.fixture
async def topic_name(settings: Settings) -> AsyncIterator[str]:
    async with scratch_topic(settings, "test-idle-fetch", 2) as name:
        yield name


Fetches = list[tuple[int, int, bool]]


async def _fetches(bootstrap: str, topic: str, paused: bool = False) -> tuple[Fetches, int]:
    """The (min bytes, max wait ms, answered with records) of each fetch of a consumer that idles,
    gets one record, and idles again; and how many records it read. `paused`: partition 0 stays
    paused throughout (as Faust pauses a partition whose stream buffer is full)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        fetch_min_bytes=BUSY[0],
        fetch_max_wait_ms=BUSY[1],
    )
    await consumer.start()
    sent: Fetches = []
    original = consumer._client.send

    async def send(node_id: int, request: Any, *args: Any, **kw: Any) -> Any:
        response = await original(node_id, request, *args, **kw)
        if isinstance(request, FetchRequest):
            data = any(len(p[-1] or b"") for _, parts in response.topics for p in parts)
            sent.append((request._min_bytes, request._max_wait_ms, data))
        return response

    consumer._client.send = send  # type: ignore[method-assign]
    consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
    if paused:
        consumer.pause(TopicPartition(topic, 0))
    read = 0

    async def drain() -> None:
        nonlocal read
        while True:
            got = await consumer.getmany(timeout_ms=200)
            read += sum(len(v) for v in got.values())

    task = asyncio.create_task(drain())
    try:
        async with asyncio.timeout(30):
            while sum(1 for f in sent if not f[2]) < 3:  # a few empty fetches first
                await asyncio.sleep(0.05)
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(topic, b"one", partition=1)
            finally:
                await producer.stop()
            while not read:
                await asyncio.sleep(0.05)
            while len(sent) < 3 + next(i for i, f in enumerate(sent) if f[2]):
                await asyncio.sleep(0.05)  # the fetch after the one with the record, and its next
        return list(sent), read
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()


@pytest.mark.integration
async def test_an_idle_consumer_long_polls_and_a_busy_one_batches(
    settings: Settings, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    idle_fetch.install(IDLE_WAIT_MS)
    monkeypatch.setattr(Fetcher, "_eco2_idle_wait_ms", IDLE_WAIT_MS)
    fetches, read = await _fetches(settings.kafka_bootstrap, topic_name)
    assert read == 1
    first_data = next(i for i, f in enumerate(fetches) if f[2])
    assert fetches[0][:2] == BUSY  # a fresh consumer starts as configured
    # after an empty fetch: one byte is enough, and the broker may hold it for the long wait
    assert all(f[:2] == (1, IDLE_WAIT_MS) for f in fetches[1 : first_data + 1])
    # the record came in a long poll (answered at once), and the next fetch batches again
    assert fetches[first_data][:2] == (1, IDLE_WAIT_MS)
    assert fetches[first_data + 1][:2] == BUSY
    assert fetches[first_data + 2][:2] == (1, IDLE_WAIT_MS)  # empty again: idle again


@pytest.mark.integration
async def test_off_every_fetch_is_as_configured(
    settings: Settings, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    idle_fetch.install(IDLE_WAIT_MS)
    monkeypatch.setattr(Fetcher, "_eco2_idle_wait_ms", 0)
    fetches, read = await _fetches(settings.kafka_bootstrap, topic_name)
    assert read == 1
    assert {f[:2] for f in fetches} == {BUSY}


@pytest.mark.integration
async def test_no_long_poll_while_a_partition_is_paused(
    settings: Settings, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused partition resumed during a long poll would wait for it: fetch as configured."""
    idle_fetch.install(IDLE_WAIT_MS)
    monkeypatch.setattr(Fetcher, "_eco2_idle_wait_ms", IDLE_WAIT_MS)
    fetches, read = await _fetches(settings.kafka_bootstrap, topic_name, paused=True)
    assert read == 1
    assert {f[:2] for f in fetches} == {BUSY}
