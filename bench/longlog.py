"""A long `scan.events` log for `eco2 chaos --seed-log N`: what a day of traffic leaves behind.

A day at the soak's rate is ~1.1 million events, almost all of jobs that finished more than
`result_ttl_s` ago (their Redis keys have expired; their results are in Postgres). The seeded
events are such jobs: whole successful jobs of bench users, produced now (so within the rebuild's
window, which offsets-for-times finds by record time) with event times older than the finished
TTL. A rebuild after a flush must read every one of them; it is what made the first stream wait.
The router and the writer skip them (stopped while seeding, their groups moved past): a day of
log was consumed during the day, not in the minutes before the run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from contract.events import ScanEvent, ScanJob, ScanResult, make_event
from contract.pipeline import PIPELINE
from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS, partition_for
from eco2 import services, stack


def old_job_events(s: Settings, run: str, n: int, now: float) -> list[ScanEvent]:
    """The events of one finished job, `result_ttl_s` + 10 min + `n` ms in the past."""
    job = ScanJob(
        job_id=f"seed-{run}-{n}",
        user_id=f"seed-{run}",
        image_url="https://example.com/bottle.jpg",
        model="gpt-4o-mini",
        created_at=now,
    )
    events = [make_event(job, "queued", "completed")]
    for stage in PIPELINE:
        events += [make_event(job, stage, "started"), make_event(job, stage, "completed")]
    ts = now - s.result_ttl_s - 600 - n / 1000
    result = ScanResult(
        job_id=job.job_id,
        user_id=job.user_id,
        status="completed",
        image_url=job.image_url,
        classification={"major_category": "recyclable", "middle_category": "clear_pet_bottle"},
        created_at=ts,
        finished_at=ts,
    )
    events.append(make_event(job, "done", "completed", result=result))
    for ev in events:
        ev.ts = ts
    return events


async def seed(s: Settings, events: int, out: Callable[[str], None] = print) -> dict[str, float]:
    """Produce about `events` events of old finished jobs to `scan.events`; returns the count and
    the seconds it took. The router and the writer are stopped meanwhile and their groups moved
    past the seeded events: a day's log was consumed over the day, not just before the run (the
    live router takes ~1,500 of these a second on this box, a day's worth ~12 minutes)."""
    consumers = [services.find("router"), services.find("writer")]
    await asyncio.to_thread(stack.stop_together, s, consumers)
    run = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    sent = 0
    try:
        producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            acks="all",
            linger_ms=50,
            max_batch_size=512 * 1024,
            **s.kafka_client_kwargs(),
        )
        await producer.start()
        now = time.time()
        try:
            n = 0
            while sent < events:
                batch = []
                for _ in range(200):
                    for ev in old_job_events(s, run, n, now):
                        batch.append(
                            await producer.send(
                                EVENTS,
                                ev.model_dump_json().encode(),
                                key=ev.job_id.encode(),
                                partition=partition_for(ev.job_id, BY_NAME[EVENTS].partitions),
                            )
                        )
                    n += 1
                await asyncio.gather(*batch)
                sent += len(batch)
                if n % 20000 == 0:
                    out(f"chaos: seeded {sent} events of old jobs ({time.monotonic() - t0:.0f}s)")
        finally:
            await producer.stop()
        for group in (s.router_group, s.writer_group):
            await skip_to_end(s, group)
    finally:
        for svc in consumers:
            await stack.start(s, svc)
    return {"events": sent, "seconds": round(time.monotonic() - t0, 1)}


async def skip_to_end(s: Settings, group: str) -> None:
    """Commit the end of scan.events for `group` (its members stopped)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        **s.kafka_client_kwargs(),
    )
    await consumer.start()
    try:
        tps = [TopicPartition(EVENTS, p) for p in range(BY_NAME[EVENTS].partitions)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.commit({tp: OffsetAndMetadata(end[tp], "") for tp in tps})
    finally:
        await consumer.stop()
