"""A consumer that stops fetching during a rebalance (as Faust does) rejoins its group however
long the rebalance took (streams/rejoin.py).

The unit tests pin what the patch relies on in aiokafka and fail when upstream changes it. The
integration test runs the stall on the real broker in ~15 s: a consumer that, like Faust, stops
fetching in its revoke callback and resumes only when assigned, and whose revoke takes longer
than `max_poll_interval` (what a Kafka outage of minutes does to the router and stage workers).
Unpatched aiokafka never rejoins (the test proves it still does not, so the patch is still
needed); patched, it is assigned again within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.consumer import group_coordinator, subscription_state
from aiokafka.consumer.subscription_state import SubscriptionState

from contract.settings import Settings
from streams import rejoin

from .conftest import scratch_topic

rejoin.install()


# --- what the patch relies on in aiokafka -------------------------------------------------------


def test_aiokafka_still_refuses_to_rejoin_an_idle_consumer() -> None:
    """The guard the patch defuses. If this fails, aiokafka changed the rejoin path (#1187,
    #1189): check whether streams/rejoin.py is still needed, and what it must patch now."""
    source = inspect.getsource(group_coordinator.GroupCoordinator.ensure_active_group)
    assert "idle_time = self._subscription.fetcher_idle_time" in source
    assert "idle_time >= self._max_poll_interval" in source
    assert source.index("_on_join_prepare") < source.index("idle_time >= self._max_poll_interval")
    heartbeat = inspect.getsource(group_coordinator.GroupCoordinator._heartbeat_routine)
    assert "self._subscription.fetcher_idle_time" in heartbeat  # the check the patch keeps


async def test_the_idle_clock_pauses_during_a_reassignment(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(subscription_state.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(rejoin.time, "monotonic", lambda: now[0])
    state = SubscriptionState()
    state.subscribe({"t"})
    tp = TopicPartition("t", 0)
    state.assign_from_subscribed({tp})
    with state.fetch_context():
        now[0] += 1
    now[0] += 50  # idle: nothing fetched for 50 s
    assert state.fetcher_idle_time == 50
    state.begin_reassignment()  # the revoke: Faust stops fetching until the next assignment
    now[0] += 300
    assert state.reassignment_in_progress
    assert state.fetcher_idle_time == 0  # unpatched: 350, and ensure_active_group never rejoins
    state.assign_from_subscribed({tp})
    assert state.fetcher_idle_time == 0  # a full max_poll_interval from the assignment
    now[0] += 7
    assert state.fetcher_idle_time == 7  # and it counts again: a stuck app still leaves the group


async def test_a_consumer_without_subscription_is_unchanged() -> None:
    state = SubscriptionState()
    assert state.reassignment_in_progress  # aiokafka's answer without a subscription
    assert state.fetcher_idle_time >= 0


# --- the stall on the real broker ---------------------------------------------------------------

MAX_POLL_MS = 2000
REVOKE_S = 3.5  # longer than max_poll_interval: the outage's slow revoke, in miniature


class FaustLike(ConsumerRebalanceListener):  # type: ignore[misc]
    """Fetches only while assigned: the revoke stops the flow, the assignment resumes it."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.assignments = 0

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.flowing.clear()
        if revoked:
            await asyncio.sleep(REVOKE_S)  # Faust waits for in-flight work, commits, flushes

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.assignments += 1
        self.flowing.set()


@pytest.fixture
async def topic_name(settings: Settings) -> AsyncIterator[str]:
    async with scratch_topic(settings, "test-rejoin", 1) as name:
        yield name


async def _rejoins_after_slow_revoke(bootstrap: str, topic: str, wait_s: float) -> tuple[int, int]:
    """(assignments before the rebalance, after it) and records fetched after it."""
    listener = FaustLike()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-group",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,  # the broker's minimum
        heartbeat_interval_ms=500,
        max_poll_interval_ms=MAX_POLL_MS,
        retry_backoff_ms=100,
    )
    consumer.subscribe([topic], listener=listener)
    await consumer.start()
    fetched = 0
    parked = asyncio.Event()

    async def drain() -> None:
        nonlocal fetched
        while True:
            if not listener.flowing.is_set():
                parked.set()
                await listener.flowing.wait()
                parked.clear()
            batch = await consumer.getmany(timeout_ms=100)
            fetched += sum(len(v) for v in batch.values())

    task = asyncio.create_task(drain())
    try:
        deadline = time.monotonic() + 30
        while listener.assignments < 1:
            assert time.monotonic() < deadline, "never assigned at start"
            await asyncio.sleep(0.1)
        before = listener.assignments
        # The outage: the drain loop stops fetching (Faust's sat in a commit, its stream buffers
        # full), then the broker is back and the member must rejoin.
        listener.flowing.clear()
        await parked.wait()
        fetched = 0
        # What a heartbeat answered UNKNOWN_MEMBER_ID does once the broker is back (the member's
        # session expired during the outage): rejoin, revoking first.
        consumer._coordinator.request_rejoin()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"after")
        finally:
            await producer.stop()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not (listener.assignments > before and fetched):
            await asyncio.sleep(0.1)
        return listener.assignments - before, fetched
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()


@pytest.mark.integration
async def test_a_consumer_whose_revoke_outlasts_max_poll_interval_rejoins(
    settings: Settings, topic_name: str
) -> None:
    rejoined, fetched = await _rejoins_after_slow_revoke(settings.kafka_bootstrap, topic_name, 20)
    assert rejoined >= 1 and fetched >= 1


@pytest.mark.integration
async def test_unpatched_aiokafka_still_stalls(
    settings: Settings, topic_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream bug, still there: without the patch the same consumer never rejoins. When
    this fails, aiokafka fixed it and streams/rejoin.py can go."""
    idle, assign = SubscriptionState._eco2_rejoin_originals  # type: ignore[attr-defined]
    monkeypatch.setattr(SubscriptionState, "fetcher_idle_time", idle)
    monkeypatch.setattr(SubscriptionState, "assign_from_subscribed", assign)
    rejoined, fetched = await _rejoins_after_slow_revoke(
        settings.kafka_bootstrap, topic_name, REVOKE_S + 4 * MAX_POLL_MS / 1000
    )
    assert (rejoined, fetched) == (0, 0)
