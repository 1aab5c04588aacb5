"""Rebuild every job's Redis state and history from the `scan.events` log.

Redis is only a cache of the log: read all partitions from the beginning (`eco2 state rebuild`)
or from a point in time (the router's automatic rebuild: the state TTL's window, found with
offsets-for-times; or, after a restart that kept the view, from its checkpoint's offsets) to the
end they had when the rebuild started (a plain consumer, no group,
nothing committed) and apply in batches through the same idempotent StateStore the router uses,
so running it next to a live router is safe.

A flushed view is replayed newest first instead (`rebuild_newest_first`, the router's automatic
rebuild without a checkpoint): each partition in chunks going back from its end offsets, each
chunk applied newest record first. A job lives in one partition, so once its `queued` event (its
first) is back, every later event of it up to the end offsets is back too, and the live router
applies what comes after them: readers serve such a job while the rest of the day is replayed
(view/marker.py `job_whole`). The job a user waits on is minutes old: it is back in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from contract.events import ScanEvent, is_terminal
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
    first_chunk_s: float | None = None  # newest first: until the newest chunk of every partition was back
    expired: int = 0  # newest first: events of jobs whose finished TTL has run out (skipped)
    _echoed_at: float = field(default_factory=time.monotonic, repr=False)  # the last progress line

    def progress(self, total: int, t0: float, echo: Callable[[str], object], every_s: float) -> None:
        """Bring `seconds` up to date and echo a progress line at most every `every_s`."""
        now = time.monotonic()
        self.seconds = now - t0
        if now - self._echoed_at >= every_s:
            echo("  " + self.line(total))
            self._echoed_at = now

    def line(self, total: int) -> str:
        # `total` counts offsets, which include transaction markers: the percentage ends near 100.
        pct = 100.0 * self.events / total if total else 100.0
        return (
            f"{self.events} events read ({pct:.0f}% of {total} offsets), {self.new} new in Redis, "
            f"{len(self.jobs)} jobs, {self.invalid} invalid, {self.seconds:.1f}s"
        )



def _replay_consumer(s: Settings, **extra: int) -> AIOKafkaConsumer:
    """A group-less consumer reading `scan.events` from where it is told, committed records only
    (the API writes jobs + queued events in transactions); both rebuilds use it."""
    return AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **extra,
        **s.kafka_client_kwargs(),
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
    consumer = _replay_consumer(s)
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
            stats.progress(total, t0, echo, progress_every_s)
        stats.seconds = time.monotonic() - t0
        echo("done: " + stats.line(total))
        return stats
    finally:
        await consumer.stop()
        if client is not None:
            await client.aclose()


FIRST_CHUNK = 500  # records per partition in the first round; each next round doubles, up to `chunk`


def chunk_plan(begin: int, end: int, size: int, first: int | None = None) -> Iterator[tuple[int, int]]:
    """The ranges [lo, hi) of one partition, newest first: from `end` back to `begin`. The first
    range holds `first` records (default: `size`), each next one twice as many, up to `size`: the
    jobs of the last moments (the ones users wait on) are back after one small round, and the
    rest of the log goes in big ones."""
    hi = end
    step = max(min(first or size, size), 1)
    while hi > begin:
        lo = max(begin, hi - step)
        yield lo, hi
        hi = lo
        step = min(step * 2, max(size, 1))


def newest_first(
    events: list[tuple[int, ScanEvent]], ended: dict[str, float], now: float, finished_ttl_s: int
) -> list[tuple[int, ScanEvent]]:
    """One chunk's (offset, event) pairs in the order to apply them: newest offset first, so a
    job's queued event comes after all its later ones. Records in `ended` ({job id: terminal
    ts}) the jobs that finished, as their terminal event (the newest of a job) is met first;
    leaves out the events of jobs finished longer ago than `finished_ttl_s`: their keys have
    expired and an older event must not bring them back."""
    out: list[tuple[int, ScanEvent]] = []
    for offset, ev in sorted(events, key=lambda pair: pair[0], reverse=True):
        if is_terminal(ev.stage, ev.status):
            ended[ev.job_id] = max(ended.get(ev.job_id, ev.ts), ev.ts)
        end_ts = ended.get(ev.job_id)
        if end_ts is not None and now - end_ts >= finished_ttl_s:
            continue
        out.append((offset, ev))
    return out


async def rebuild_newest_first(
    s: Settings,
    store: StateStore,
    since_ms: int,
    chunk: int,
    live: StateStore | None = None,
    live_from: Mapping[int, int] | None = None,
    echo: Callable[[str], None] = print,
    batch: int = 500,
    progress_every_s: float = 1.0,
) -> RebuildStats:
    """Replay `scan.events` from offsets-for-times(`since_ms`) to the end offsets of now into
    `store`, newest first: rounds of one chunk per partition, going backwards (`FIRST_CHUNK`
    records, doubling each round up to `chunk`).

    `live_from` ({partition: offset}, the router group's committed offsets at the start): records
    at or above it may not have been applied by the router before the view was lost, and a stream
    may already follow their job (from a queued event the router applied after the flush), so
    they go through `live` (a store that publishes: an event is published once, by whichever
    applies it first). Below it the router never applies again: nothing to publish."""
    stats = RebuildStats()
    t0 = time.monotonic()
    # Each round seeks back: a fetch long-polling at a partition's end would hold it up.
    consumer = _replay_consumer(s, fetch_max_wait_ms=20)
    live_from = dict(live_from or {})
    await consumer.start()
    try:
        tps = [TopicPartition(EVENTS, p) for p in range(BY_NAME[EVENTS].partitions)]
        consumer.assign(tps)
        consumer.pause(*tps)  # fetched only while a range of theirs is read (`_read_ranges`)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        for tp in tps:
            at = found.get(tp)
            begin[tp] = min(max(at.offset if at is not None else end[tp], begin[tp]), end[tp])
        total = sum(end[tp] - begin[tp] for tp in tps)
        plans = {tp: chunk_plan(begin[tp], end[tp], chunk, FIRST_CHUNK) for tp in tps}
        echo(f"rebuilding newest first from {EVENTS}: {total} offsets, {len(tps)} partitions, chunk {chunk}")
        ended: dict[str, float] = {}
        while plans:
            ranges = {}
            for tp in list(plans):
                r = next(plans[tp], None)
                if r is None:
                    del plans[tp]
                else:
                    ranges[tp] = r
            if not ranges:
                break
            chunks = await _read_ranges(consumer, ranges)
            now = time.time()
            for tp, records in chunks.items():
                events: list[tuple[int, ScanEvent]] = []
                for offset, value in records:
                    stats.events += 1
                    try:
                        ev = ScanEvent.model_validate_json(value or b"")
                    except (ValidationError, ValueError):
                        stats.invalid += 1
                        continue
                    events.append((offset, ev))
                    stats.jobs.add(ev.job_id)
                ordered = newest_first(events, ended, now, store.finished_ttl_s)
                stats.expired += len(events) - len(ordered)
                # Newest first, so the records the router may not have applied come first.
                cut = live_from.get(tp.partition, 0)
                hot = [ev for off, ev in ordered if live is not None and off >= cut]
                cold = [ev for off, ev in ordered[len(hot) :]]
                for target, evs in ((live, hot), (store, cold)):
                    for i in range(0, len(evs), batch):
                        assert target is not None
                        stats.new += sum(await target.apply(evs[i : i + batch], ended))
            if stats.first_chunk_s is None:
                stats.first_chunk_s = time.monotonic() - t0
                echo(f"the newest chunk of every partition is back ({stats.first_chunk_s:.2f}s)")
            stats.progress(total, t0, echo, progress_every_s)
        stats.seconds = time.monotonic() - t0
        echo("done: " + stats.line(total))
        return stats
    finally:
        await consumer.stop()


async def _read_ranges(
    consumer: AIOKafkaConsumer, ranges: Mapping[TopicPartition, tuple[int, int]]
) -> dict[TopicPartition, list[tuple[int, bytes | None]]]:
    """Every record in [lo, hi) of each partition: (offset, value). A partition is paused again
    once its range is read: its fetcher would otherwise prefetch the newer records, replayed
    already, round after round."""
    out: dict[TopicPartition, list[tuple[int, bytes | None]]] = {tp: [] for tp in ranges}
    for tp, (lo, _) in ranges.items():
        consumer.seek(tp, lo)
    consumer.resume(*ranges)
    pending = set(ranges)
    while pending:
        got = await consumer.getmany(*pending, timeout_ms=1000)
        for tp, recs in got.items():
            hi = ranges[tp][1]
            out[tp].extend((rec.offset, rec.value) for rec in recs if rec.offset < hi)
        for tp in list(pending):
            if await consumer.position(tp) >= ranges[tp][1]:
                pending.discard(tp)
                consumer.pause(tp)
    return out
