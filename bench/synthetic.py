"""Synthetic jobs and events for the micro-benchmarks, and the Kafka/Redis chores around them.

Synthetic job ids start with `bench-` so they are recognisable wherever they end up.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import OffsetAndMetadata

from contract import keys, trace
from contract.events import PIPELINE, ScanEvent, ScanJob, ScanResult, make_event, now
from contract.pipeline import SPEC
from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS, partition_for


def job(run: str, n: int, user: str | None = None) -> ScanJob:
    return ScanJob(
        job_id=f"bench-{run}-{n}",
        user_id=user or f"bench-{run}",
        image_url=f"https://images.example.com/bench/clear_pet-{n}.jpg",
        model="gpt-4o-mini",
        created_at=now(),
    )


def events(j: ScanJob, terminal: bool = True) -> list[ScanEvent]:
    """A successful job's events in order: queued, started/completed per stage, then (when
    `terminal`) done with a result of realistic size."""
    out = [make_event(j, "queued", "completed")]
    for stage in PIPELINE:
        out.append(make_event(j, stage, "started"))
        out.append(make_event(j, stage, "completed"))
    if terminal:
        result = ScanResult(
            job_id=j.job_id,
            user_id=j.user_id,
            status="completed",
            image_url=j.image_url,
            classification={
                "major_category": "recyclable",
                "middle_category": "clear_pet",
                "minor_category": "bottle",
                "situation_tags": ["label_attached"],
                "confidence": 0.93,
            },
            rules_key="recyclable/clear_pet",
            answer={
                "user_answer": "Bottle: empty it; remove the label; crush it; close the cap.",
                "disposal_steps": ["Empty it.", "Remove the label.", "Crush it.", "Close the cap."],
                "warnings": [],
                "gaps": [],
            },
            reward={"granted": True, "character_code": "char_pet", "character_name": "Petty", "reason": "ok"},
            timings={st.name: 7.5 if st.model else 0.001 for st in SPEC},  # model calls take seconds
            created_at=j.created_at,
            finished_at=now(),
        )
        out.append(make_event(j, "done", "completed", result=result))
    return out


def run_id() -> str:
    return uuid.uuid4().hex[:8]


async def delete_jobs(client: aioredis.Redis, job_ids: Iterable[str]) -> None:
    """Remove what the benchmark put in Redis (state, history, memo-free: only its own keys)."""
    ids = list(job_ids)
    for k in range(0, len(ids), 1000):
        names = [name for jid in ids[k : k + 1000] for name in (keys.state(jid), keys.history(jid))]
        await client.delete(*names)


# --- Kafka ---------------------------------------------------------------------------------------


def _events_tps() -> list[TopicPartition]:
    return [TopicPartition(EVENTS, p) for p in range(BY_NAME[EVENTS].partitions)]


async def end_offsets(s: Settings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **s.kafka_client_kwargs())
    await consumer.start()
    try:
        end = await consumer.end_offsets(_events_tps())
        return {tp.partition: off for tp, off in end.items()}
    finally:
        await consumer.stop()


async def commit_at_end(s: Settings, group: str) -> dict[int, int]:
    """Point a fresh consumer group at the end of scan.events (it will read only what comes next)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        **s.kafka_client_kwargs(),
    )
    await consumer.start()
    try:
        tps = _events_tps()
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.commit({tp: OffsetAndMetadata(end[tp], "") for tp in tps})
        return {tp.partition: off for tp, off in end.items()}
    finally:
        await consumer.stop()


async def group_lag(s: Settings, group: str) -> int:
    """Events of scan.events the group has not committed yet."""
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, **s.kafka_client_kwargs())
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group, partitions=_events_tps())
    finally:
        await admin.close()
    end = await end_offsets(s)
    lag = 0
    for tp in _events_tps():
        meta = committed.get(tp)
        done = meta.offset if meta is not None and meta.offset >= 0 else 0
        lag += max(end[tp.partition] - done, 0)
    return lag


async def produce(s: Settings, evs: list[ScanEvent]) -> float:
    """Produce events to scan.events as the pipeline does (explicit shard, traceparent header);
    returns the seconds it took."""
    producer = AIOKafkaProducer(
        bootstrap_servers=s.kafka_bootstrap,
        acks="all",
        linger_ms=5,
        max_batch_size=256 * 1024,
        **s.kafka_client_kwargs(),
    )
    await producer.start()
    parts = BY_NAME[EVENTS].partitions
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        pending = []
        tp = trace.new_traceparent()
        for ev in evs:
            fut = await producer.send(
                EVENTS,
                ev.model_dump_json().encode(),
                key=ev.job_id.encode(),
                partition=partition_for(ev.job_id, parts),
                headers=trace.headers(tp),
            )
            pending.append(fut)
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return loop.time() - t0
