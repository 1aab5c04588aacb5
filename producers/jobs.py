"""Writes new jobs to Kafka: the job to `scan.vision` and its `queued` event, atomically.

A Kafka transaction makes both records visible together or not at all. A producer runs one
transaction at a time, so concurrent requests are grouped: whatever arrives while a transaction
commits goes into the next one (group commit), which keeps the API's latency near one commit.
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
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
            transactional_id=f"{API_TRANSACTIONAL_ID_PREFIX}-{socket.gethostname()}-{os.getpid()}",
            **s.kafka_client_kwargs(),
        )
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.producer.start()
        self._task = asyncio.create_task(self._run(), name="job-writer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.producer.stop()

    async def submit(self, job: ScanJob, event: ScanEvent, traceparent: str) -> None:
        """Returns once the job and its queued event are committed to Kafka."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(job, event, traceparent, fut))
        await fut

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._commit(batch)
            except Exception as exc:
                for p in batch:
                    if not p.done.done():
                        p.done.set_exception(exc)
            else:
                for p in batch:
                    if not p.done.done():
                        p.done.set_result(None)

    async def _commit(self, batch: list[_Pending]) -> None:
        async with self.producer.transaction():
            for p in batch:
                key = p.job.job_id.encode()
                hdrs = trace.headers(p.traceparent)
                await self.producer.send(
                    VISION,
                    p.job.model_dump_json().encode(),
                    key=key,
                    partition=partition_for(p.job.job_id, BY_NAME[VISION].partitions),
                    headers=hdrs,
                )
                await self.producer.send(
                    EVENTS,
                    p.event.model_dump_json().encode(),
                    key=key,
                    partition=partition_for(p.job.job_id, BY_NAME[EVENTS].partitions),
                    headers=hdrs,
                )
