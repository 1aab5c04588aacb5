"""Writes new jobs to Kafka: the job to the first stage's topic and its `queued` event, atomically.

A Kafka transaction makes both records visible together or not at all. A producer runs one
transaction at a time, so concurrent requests are grouped: whatever arrives while a transaction
commits goes into the next one (group commit). A few producers (`api_txn_producers`) commit in
parallel, so a request waits for about one commit, not for the one in progress plus its own.
With `api_txn_window_ms`, the producer gathering a batch also waits that long after its first
job (one producer gathers at a time, the others commit meanwhile): more jobs per transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from prometheus_client import Histogram

from contract import trace
from contract.events import ScanEvent, ScanJob
from contract.settings import Settings
from contract.topics import API_TRANSACTIONAL_ID_PREFIX, BY_NAME, EVENTS, FIRST_TOPIC, partition_for

MAX_BATCH = 200
TXN_TIMEOUT_S = 30.0  # longest a producer spends on one transaction before it is replaced
log = logging.getLogger("eco2.api.jobs")

# A POST's `txn` phase (producers/api.py) split: `wait` from submit until a producer takes the
# job, `send` the records' round trips (AddPartitionsToTxn, Produce) until every one is
# acknowledged, `commit` the EndTxn round trip.
TXN_PHASE = Histogram(
    "eco2_api_txn_phase_seconds",
    "time of each phase of a POST's Kafka transaction",
    ["phase"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25),
)
TXN_JOBS = Histogram(
    "eco2_api_txn_jobs", "jobs per POST transaction", buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200)
)
_WAIT, _SEND, _COMMIT = (TXN_PHASE.labels(p) for p in ("wait", "send", "commit"))


@dataclass
class _Pending:
    job: ScanJob
    event: ScanEvent
    traceparent: str
    done: asyncio.Future[None]
    queued_at: float = field(default_factory=time.perf_counter)


class JobWriter:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.prefix = f"{API_TRANSACTIONAL_ID_PREFIX}-{socket.gethostname()}-{os.getpid()}"
        self.producers = [self._producer(i) for i in range(max(1, s.api_txn_producers))]
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.window_s = max(0, s.api_txn_window_ms) / 1000.0
        self._gathering = asyncio.Lock()  # one producer fills its window at a time
        self._tasks: list[asyncio.Task[None]] = []

    def _producer(self, i: int) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.s.kafka_bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
            compression_type=self.s.kafka_compression_type,
            transactional_id=f"{self.prefix}-{i}",
            request_timeout_ms=10000,
            **self.s.kafka_client_kwargs(),
        )

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.producers))
        self._tasks = [
            asyncio.create_task(self._run(i), name=f"job-writer-{i}") for i in range(len(self.producers))
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(p.stop() for p in self.producers), return_exceptions=True)

    async def submit(self, job: ScanJob, event: ScanEvent, traceparent: str) -> None:
        """Returns once the job and its queued event are committed to Kafka; TimeoutError after
        `api_submit_timeout_s` (then the job was not written, unless its transaction was
        already committing)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(job, event, traceparent, fut))
        try:
            async with asyncio.timeout(self.s.api_submit_timeout_s):
                await asyncio.shield(fut)
        except TimeoutError:
            fut.cancel()  # a producer that has not taken it yet skips it
            raise

    async def _run(self, i: int) -> None:
        while True:
            async with self._gathering:
                batch = await self._gather()
            batch = [p for p in batch if not p.done.done()]  # given up on by their requests
            if not batch:
                continue
            taken = time.perf_counter()
            for p in batch:
                _WAIT.observe(taken - p.queued_at)
            TXN_JOBS.observe(len(batch))
            try:
                async with asyncio.timeout(TXN_TIMEOUT_S):
                    await self._commit(self.producers[i], batch)
            except Exception as exc:
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
                await self._replace(i, exc)
            else:
                for p in batch:
                    if not p.done.done():
                        p.done.set_result(None)

    async def _gather(self) -> list[_Pending]:
        """The next batch: the first job to come, what arrives within the window after it, and
        whatever else is already queued (up to MAX_BATCH)."""
        batch = [await self.queue.get()]
        if self.window_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.window_s
            while len(batch) < MAX_BATCH and (left := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(left):  # a cancelled get leaves its job queued
                        batch.append(await self.queue.get())
                except TimeoutError:
                    break
        while len(batch) < MAX_BATCH and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    async def _replace(self, i: int, exc: BaseException) -> None:
        """A fresh producer for slot i (same transactional id), started once Kafka answers."""
        log.warning("transaction failed (%s: %s); replacing producer %d", type(exc).__name__, exc, i)
        old = self.producers[i]
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await old.stop()
        delay = 0.5
        while True:
            fresh = self._producer(i)
            try:
                await fresh.start()
            except Exception as err:
                with contextlib.suppress(Exception):
                    await fresh.stop()
                log.warning("producer %d cannot start yet (%s); retrying in %.1fs", i, err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.producers[i] = fresh
            return

    @staticmethod
    async def _commit(producer: AIOKafkaProducer, batch: list[_Pending]) -> None:
        """One transaction for the batch, committed only once every record is acknowledged.

        aiokafka's commit does not check the records' deliveries: after a broker restart a
        batch can fail (OutOfOrderSequenceNumber) while the transaction still commits, without
        it. So each delivery is awaited inside the transaction: a failed one raises, the
        transaction aborts and the requests get a 503, never a 202 for a job that is not in
        Kafka (`eco2 chaos` found 12 such jobs in one Kafka restart)."""
        async with producer.transaction():
            deliveries = []
            for p in batch:
                key = p.job.job_id.encode()
                hdrs = trace.headers(p.traceparent)
                for topic, record in ((FIRST_TOPIC, p.job), (EVENTS, p.event)):
                    value = record.model_dump_json().encode()
                    partition = partition_for(p.job.job_id, BY_NAME[topic].partitions)
                    deliveries.append(
                        await producer.send(topic, value, key=key, partition=partition, headers=hdrs)
                    )
            t0 = time.perf_counter()
            await asyncio.gather(*deliveries)
            t1 = time.perf_counter()
            _SEND.observe(t1 - t0)
        _COMMIT.observe(time.perf_counter() - t1)
