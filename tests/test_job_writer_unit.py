"""The API's Kafka writer (producers/jobs.py) with a fake producer: a POST is answered 202 only
when every record of its transaction was acknowledged. After a broker restart aiokafka can fail a
record's delivery (OutOfOrderSequenceNumber) and still commit the transaction without it; `eco2
chaos` saw 12 jobs answered 202 that were never in Kafka."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka.errors import OutOfOrderSequenceNumber

from contract.events import ScanJob, make_event, now
from contract.settings import Settings
from producers import jobs as jobs_module
from producers.jobs import JobWriter, _Pending


class FakeProducer:
    """Sends resolve (or fail) like aiokafka's: `send` returns a delivery future."""

    def __init__(self, fail_delivery: bool) -> None:
        self.fail_delivery = fail_delivery
        self.committed = 0
        self.aborted = 0

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        try:
            yield
        except BaseException:
            self.aborted += 1
            raise
        self.committed += 1  # aiokafka commits whatever the deliveries did

    async def send(self, *args: Any, **kw: Any) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_delivery:
            asyncio.get_running_loop().call_soon(fut.set_exception, OutOfOrderSequenceNumber())
        else:
            asyncio.get_running_loop().call_soon(fut.set_result, None)
        return fut


def pending() -> _Pending:
    job = ScanJob(job_id="j1", user_id="u", image_url="https://x.example.com/a.jpg", created_at=now())
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    return _Pending(job, make_event(job, "queued", "completed"), "", done)


@pytest.mark.parametrize("fail", [False, True])
async def test_a_transaction_commits_only_acknowledged_records(fail: bool) -> None:
    producer = FakeProducer(fail_delivery=fail)
    batch = [pending(), pending()]
    if fail:
        with pytest.raises(OutOfOrderSequenceNumber):
            await JobWriter._commit(producer, batch)  # type: ignore[arg-type]
        assert (producer.committed, producer.aborted) == (0, 1)
    else:
        await JobWriter._commit(producer, batch)  # type: ignore[arg-type]
        assert (producer.committed, producer.aborted) == (1, 0)


async def test_a_failed_delivery_answers_the_request_with_an_error() -> None:
    """Through the writer's loop: the request's submit raises (the API answers 503), not returns."""
    w = JobWriter(Settings(api_txn_producers=1, api_submit_timeout_s=5))
    w.producers = [FakeProducer(fail_delivery=True)]  # type: ignore[list-item]
    replaced = asyncio.Event()

    async def replace(i: int, exc: BaseException) -> None:
        replaced.set()

    w._replace = replace  # type: ignore[method-assign]
    task = asyncio.create_task(w._run(0))
    try:
        p = pending()
        with pytest.raises(OutOfOrderSequenceNumber):
            await w.submit(p.job, p.event, "")
        assert replaced.is_set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class CountingProducer(FakeProducer):
    """Records the jobs of each committed transaction."""

    def __init__(self) -> None:
        super().__init__(fail_delivery=False)
        self.transactions: list[int] = []
        self._sends = 0

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self._sends = 0
        async with super().transaction():
            yield
        self.transactions.append(self._sends // 2)  # two records per job

    async def send(self, *args: Any, **kw: Any) -> asyncio.Future[None]:
        self._sends += 1
        return await super().send(*args, **kw)


async def spaced_submits(window_ms: int, n: int = 3) -> list[int]:
    """n POSTs 20 ms apart through one producer: the jobs of each transaction."""
    w = JobWriter(Settings(api_txn_producers=1, api_txn_window_ms=window_ms, api_submit_timeout_s=30))
    producer = CountingProducer()
    w.producers = [producer]  # type: ignore[list-item]
    task = asyncio.create_task(w._run(0))
    try:
        submits = []
        for _ in range(n):
            p = pending()
            submits.append(asyncio.create_task(w.submit(p.job, p.event, "")))
            await asyncio.sleep(0.02)
        await asyncio.gather(*submits)  # every one answered (202)
        return producer.transactions
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_a_window_each_lone_post_is_its_own_transaction() -> None:
    assert await spaced_submits(0) == [1, 1, 1]


async def test_a_window_gathers_the_posts_that_arrive_within_it() -> None:
    """The window (1 s, far longer than the 40 ms the three POSTs take) closes one transaction
    around them; every POST is still answered only once it is committed."""
    assert await spaced_submits(1000) == [3]


async def test_a_full_batch_does_not_wait_out_the_window() -> None:
    w = JobWriter(Settings(api_txn_producers=1, api_txn_window_ms=60_000, api_submit_timeout_s=30))
    producer = CountingProducer()
    w.producers = [producer]  # type: ignore[list-item]
    task = asyncio.create_task(w._run(0))
    try:
        batch = [pending() for _ in range(jobs_module.MAX_BATCH)]
        async with asyncio.timeout(30):  # far less than the 60 s window
            await asyncio.gather(*(w.submit(p.job, p.event, "") for p in batch))
        assert producer.transactions == [jobs_module.MAX_BATCH]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
