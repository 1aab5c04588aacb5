"""Reading one job's events back from `scan.events` (its shard) for assertions."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from contract.pipeline import is_terminal
from contract.settings import Settings
from contract.topics import DLQ, EVENTS, shard_of


async def read_partition(
    s: Settings, topic: str, partition: int, since_ms: int, until: Any, timeout_s: float = 60.0
) -> list[Any]:
    """Messages of one partition from `since_ms` on, until `until(messages)` is true."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        # The end offset is taken first: when nothing is as new as `since_ms` yet, reading starts
        # there, so a message appended between the two look-ups is still read (seek_to_end would
        # resolve later and could skip it).
        end = (await consumer.end_offsets([tp]))[tp]
        offsets = await consumer.offsets_for_times({tp: since_ms})
        consumer.seek(tp, end if offsets[tp] is None else offsets[tp].offset)
        got: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while not until(got):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}[{partition}]: condition not met; got {len(got)} messages")
            batch = await consumer.getmany(tp, timeout_ms=500)
            got.extend(batch.get(tp, []))
        return got
    finally:
        await consumer.stop()


async def job_events(
    s: Settings, job_ids: list[str], since_ms: int, timeout_s: float = 90.0
) -> dict[str, list[dict[str, Any]]]:
    """Every event on scan.events of these jobs, up to and including each one's terminal event."""

    def per_job(msgs: list[Any]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {j: [] for j in job_ids}
        for m in msgs:
            key = m.key.decode() if m.key else ""
            if key in out:
                out[key].append(json.loads(m.value))
        return out

    def finished(msgs: list[Any]) -> bool:
        return all(
            any(is_terminal(e["stage"], e["status"]) for e in evs)
            for evs in per_job(msgs).values()
        )

    shards = sorted({shard_of(j) for j in job_ids})
    results = await asyncio.gather(
        *[
            read_partition(
                s,
                EVENTS,
                p,
                since_ms,
                lambda msgs, p=p: finished_for(msgs, [j for j in job_ids if shard_of(j) == p]),
                timeout_s,
            )
            for p in shards
        ]
    )
    merged: dict[str, list[dict[str, Any]]] = {}
    for msgs in results:
        for j, evs in per_job(msgs).items():
            merged.setdefault(j, []).extend(evs)
    assert finished([m for r in results for m in r])
    return merged


def finished_for(msgs: list[Any], job_ids: list[str]) -> bool:
    terminal = set()
    for m in msgs:
        key = m.key.decode() if m.key else ""
        if key in job_ids:
            e = json.loads(m.value)
            if is_terminal(e["stage"], e["status"]):
                terminal.add(key)
    return terminal >= set(job_ids)


async def dead_letters(
    s: Settings, job_id: str, since_ms: int, timeout_s: float = 60.0
) -> list[dict[str, Any]]:
    msgs = await read_partition(
        s,
        DLQ,
        0,
        since_ms,
        lambda ms: any(m.key and m.key.decode() == job_id for m in ms),
        timeout_s,
    )
    return [json.loads(m.value) for m in msgs if m.key and m.key.decode() == job_id]
