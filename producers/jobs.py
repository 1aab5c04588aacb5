"""Writes new jobs to Kafka: the job to `scan.vision` and its `queued` event, atomically.

A Kafka transaction makes both records visible together or not at all. A producer runs one
transaction at a time, so concurrent requests are grouped: whatever arrives while a transaction
commits goes into the next one (group commit). A few producers (`api_txn_producers`) commit in
parallel, so a request waits for about one commit, not for the one in progress plus its own.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

from contract import trace
from contract.events import ScanEvent, ScanJob
from contract.settings import Settings
from contract.topics import API_TRANSACTIONAL_ID_PREFIX, BY_NAME, EVENTS, VISION, partition_for

MAX_BATCH = 200


@dataclass
class _Pending:
    job: ScanJob
    event: ScanEvent
    traceparent: str
    done: asyncio.Future[None]


class JobWriter:
    def __init__(self, s: Settings) -> None:
        self.s = s
        prefix = f"{API_TRANSACTIONAL_ID_PREFIX}-{socket.gethostname()}-{os.getpid()}"
        self.producers = [
            AIOKafkaProducer(
                bootstrap_servers=s.kafka_bootstrap,
                enable_idempotence=True,
                acks="all",
                linger_ms=0,
                transactional_id=f"{prefix}-{i}",
                **s.kafka_client_kwargs(),
            )
            for i in range(max(1, s.api_txn_producers))
        ]
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.producers))
        self._tasks = [
            asyncio.create_task(self._run(p), name=f"job-writer-{i}") for i, p in enumerate(self.producers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(p.stop() for p in self.producers), return_exceptions=True)

    async def submit(self, job: ScanJob, event: ScanEvent, traceparent: str) -> None:
        """Returns once the job and its queued event are committed to Kafka."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(job, event, traceparent, fut))
        await fut

    async def _run(self, producer: AIOKafkaProducer) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._commit(producer, batch)
            except Exception as exc:
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
            else:
                for p in batch:
                    if not p.done.done():
                        p.done.set_result(None)

    @staticmethod
    async def _commit(producer: AIOKafkaProducer, batch: list[_Pending]) -> None:
        async with producer.transaction():
            for p in batch:
                key = p.job.job_id.encode()
                hdrs = trace.headers(p.traceparent)
                await producer.send(
                    VISION,
                    p.job.model_dump_json().encode(),
                    key=key,
                    partition=partition_for(p.job.job_id, BY_NAME[VISION].partitions),
                    headers=hdrs,
                )
                await producer.send(
                    EVENTS,
                    p.event.model_dump_json().encode(),
                    key=key,
                    partition=partition_for(p.job.job_id, BY_NAME[EVENTS].partitions),
                    headers=hdrs,
                )
