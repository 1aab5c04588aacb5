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
