"""Rebuild every job's Redis state and history from the `scan.events` log.

Redis is only a cache of the log: read all partitions from the beginning (`eco2 state rebuild`)
or from a point in time (the router's automatic rebuild: the state TTL's window, found with
offsets-for-times; or, after a restart that kept the view, from its checkpoint's offsets) to the
end they had when the rebuild started (a plain consumer, no group,
nothing committed) and apply in batches through the same idempotent StateStore the router uses,
so running it next to a live router is safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from contract.events import ScanEvent
from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS

from .state import StateStore


@dataclass
class RebuildStats:
    events: int = 0  # records read
    new: int = 0  # events Redis did not have
    invalid: int = 0  # records that are not a ScanEvent (skipped)
    jobs: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def line(self, total: int) -> str:
        # `total` counts offsets, which include transaction markers: the percentage ends near 100.
        pct = 100.0 * self.events / total if total else 100.0
        return (
            f"{self.events} events read ({pct:.0f}% of {total} offsets), {self.new} new in Redis, "
            f"{len(self.jobs)} jobs, {self.invalid} invalid, {self.seconds:.1f}s"
        )


async def rebuild(
    s: Settings,
    echo: Callable[[str], None] = print,
    batch: int = 500,
    progress_every_s: float = 1.0,
    since_ms: int | None = None,
    store: StateStore | None = None,
    start_offsets: Mapping[int, int] | None = None,
) -> RebuildStats:
    """Replay `scan.events` into Redis: from the beginning, or from the first offset at or after
    `since_ms` (epoch milliseconds) in each partition, or from `start_offsets` ({partition:
    offset}) where given; through `store` when given."""
    stats = RebuildStats()
    t0 = time.monotonic()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # the API writes jobs + queued events in transactions
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **s.kafka_client_kwargs(),
    )
    client = None
    if store is None:
        client = aioredis.from_url(s.redis_url)
        store = StateStore(client, s.state_ttl_s, s.result_ttl_s)
    await consumer.start()
    try:
        tps = [TopicPartition(EVENTS, p) for p in range(BY_NAME[EVENTS].partitions)]
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        starts = dict(start_offsets or {})
        if since_ms is None and not starts:
            await consumer.seek_to_beginning(*tps)
        else:
            rest = [tp for tp in tps if tp.partition not in starts]
            found = await consumer.offsets_for_times({tp: since_ms or 0 for tp in rest}) if rest else {}
            for tp in tps:
                if tp.partition in starts:
                    begin[tp] = min(max(starts[tp.partition], begin[tp]), end[tp])
                else:
                    at = found.get(tp)
                    begin[tp] = at.offset if at is not None else end[tp]  # None: nothing that recent
                consumer.seek(tp, begin[tp])
        total = sum(end[tp] - begin[tp] for tp in tps)
        remaining = {tp for tp in tps if end[tp] > begin[tp]}
        echo(f"rebuilding from {EVENTS}: {total} offsets in {len(tps)} partitions")
        last_echo = time.monotonic()
        while remaining:
            records = await consumer.getmany(*remaining, timeout_ms=1000, max_records=batch)
            events: list[ScanEvent] = []
            for tp, recs in records.items():
                for rec in recs:
                    if rec.offset >= end[tp]:
                        continue  # newer than the snapshot: the live router handles it
                    stats.events += 1
                    try:
                        ev = ScanEvent.model_validate_json(rec.value or b"")
                    except (ValidationError, ValueError):
                        stats.invalid += 1
                        continue
                    events.append(ev)
                    stats.jobs.add(ev.job_id)
            if events:
                stats.new += sum(await store.apply(events))
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
            stats.seconds = time.monotonic() - t0
            if time.monotonic() - last_echo >= progress_every_s:
                echo("  " + stats.line(total))
                last_echo = time.monotonic()
        stats.seconds = time.monotonic() - t0
        echo("done: " + stats.line(total))
        return stats
    finally:
        await consumer.stop()
        if client is not None:
            await client.aclose()
