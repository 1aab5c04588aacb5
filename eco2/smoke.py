"""A round-trip through every infrastructure service: proves the stack is really usable."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from contract.settings import Settings
from contract.topics import EVENTS, shard_of


async def run(s: Settings, echo: Callable[[str], None]) -> bool:
    import asyncpg
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    key = f"smoke-{uuid.uuid4().hex[:12]}"
    payload = {"job_id": key, "stage": "smoke"}
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        md = await producer.send_and_wait(
            EVENTS, json.dumps(payload).encode(), key=key.encode(), partition=shard_of(key)
        )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(EVENTS, md.partition)
        consumer.assign([tp])
        consumer.seek(tp, md.offset)
        msg = await consumer.getone()
        kafka_ok = json.loads(msg.value) == payload
    finally:
        await consumer.stop()
    echo(f"kafka     {'ok' if kafka_ok else 'MISMATCH'}  {EVENTS}[{md.partition}]@{md.offset}")

    r = aioredis.from_url(s.redis_url)
    try:
        await r.set(key, "1", ex=60)
        redis_ok = await r.get(key) == b"1"
    finally:
        await r.aclose()
    echo(f"redis     {'ok' if redis_ok else 'MISMATCH'}")

    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        pg_ok = await conn.fetchval("SELECT $1::text", key) == key
    finally:
        await conn.close()
    echo(f"postgres  {'ok' if pg_ok else 'MISMATCH'}")
    return kafka_ok and redis_ok and pg_ok
