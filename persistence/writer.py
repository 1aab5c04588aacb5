"""The Postgres writer: terminal events of `scan.events` -> `scans` and `character_ownership`.

Kafka delivers at least once; idempotent writes (store.py) make that exactly once in Postgres.
A batch's offsets, exactly those, are committed only after its rows are committed and its dead
letters acknowledged. Postgres down or slow: the writer keeps its batch and retries with backoff,
holding its position (no commit, no skip). Only bad data is dead-lettered: invalid terminal
events at once, rows Postgres rejects after `writer_max_retries` attempts one by one, so one poison
record never blocks or sinks the rest of its batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeAlias, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError

from contract import trace
from contract.events import DeadLetter, ScanResult
from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS, PERSISTENCE_DLQ, partition_for
from runtime import idle_fetch
from runtime.health import Policy, Progress, unread, watch

from . import metrics, store
from .batcher import Batcher
from .migrate import migrate
from .records import Bad, decode, parse

log = logging.getLogger("persistence.writer")
T = TypeVar("T")
Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


class Writer:
    def __init__(self, s: Settings, group: str | None = None) -> None:
        self.s = s
        self.group = group or s.writer_group
        self.batcher: Batcher[Record] = Batcher(s.batch_size, s.batch_timeout_s)
        self.assigned = asyncio.Event()  # set once the group gave this writer its partitions
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._pool: asyncpg.Pool | None = None
        self.progress = Progress(self.group, Policy.of(s))
        self._flushing: list[Record] = []  # the batch being written (pending work for /health)
        # When each pending record was fetched, for the oldest in-flight age per partition (the
        # record that holds the partition's commit; the stuck-message alert reads it).
        self._arrived: dict[tuple[str, int, int], float] = {}

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume and write until cancelled."""
        watcher = asyncio.create_task(watch(self.progress, self._pending, self.s.health_interval_s))
        try:
            await self.start()
            while True:
                await self.poll_once()
        finally:
            watcher.cancel()
            await self.close()

    async def _pending(self) -> tuple[dict[TopicPartition, int], dict[TopicPartition, float]]:
        """Per owned partition: records in the pending batch plus unread ones, and the age of the
        oldest pending record (for /health and eco2_consumer_oldest_in_flight_seconds)."""
        consumer = self._consumer
        tps = consumer.assignment() if consumer is not None else set()
        if consumer is None or not tps:
            return {}, {}
        ends = await consumer.end_offsets(list(tps))
        pending = unread(ends, {tp: await consumer.position(tp) for tp in tps})
        return pending | self._in_flight(pending), self._oldest(tps)

    def _in_flight(self, pending: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        out = dict(pending)
        for m in [*self._flushing, *self.batcher.items()]:
            tp = TopicPartition(m.topic, m.partition)
            out[tp] = out.get(tp, 0) + 1
        return out

    def _oldest(self, tps: set[TopicPartition]) -> dict[TopicPartition, float]:
        """Age of each partition's oldest fetched-but-uncommitted record (0 when none); forgets
        the arrival of records no longer pending (written, or dropped in a rebalance)."""
        now = time.monotonic()
        ages = dict.fromkeys(tps, 0.0)
        seen: set[TopicPartition] = set()
        arrived: dict[tuple[str, int, int], float] = {}
        for m in [*self._flushing, *self.batcher.items()]:  # oldest first
            key = (m.topic, m.partition, m.offset)
            arrived[key] = self._arrived.get(key, now)
            tp = TopicPartition(m.topic, m.partition)
            if tp not in seen:
                seen.add(tp)
                ages[tp] = now - arrived[key]
        self._arrived = arrived
        return ages

    async def start(self) -> None:
        s = self.s
        self._pool = await asyncpg.create_pool(
            s.postgres_dsn, min_size=0, max_size=2, timeout=10, command_timeout=s.writer_statement_timeout_s
        )
        await self._hold("migrate", self._migrate)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            enable_idempotence=True,
            acks="all",
            compression_type=s.kafka_compression_type,
            **s.kafka_client_kwargs(),
        )
        await self._hold("kafka producer start", self._producer.start)
        idle_fetch.install(s.kafka_idle_fetch_wait_ms)  # idle, one long-poll a second, not five
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # the API produces in transactions
            fetch_min_bytes=s.writer_fetch_min_bytes,
            fetch_max_wait_ms=s.writer_fetch_max_wait_ms,
            **s.kafka_client_kwargs(),
        )
        await self._hold("kafka consumer start", self._consumer.start)
        self._consumer.subscribe([EVENTS], listener=_Rebalance(self))
        log.info("writer started: group %s, batch %d / %.2fs", self.group, s.batch_size, s.batch_timeout_s)

    async def close(self) -> None:
        """Stop without committing anything pending: uncommitted records are simply re-read."""
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        if self._pool is not None:
            self._pool.terminate()

    async def _migrate(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            applied = await migrate(conn)
        if applied:
            log.info("applied migrations %s", ", ".join(applied))

    # --- the loop --------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Fetch what arrives before the pending batch is due, then flush every due batch."""
        assert self._consumer is not None
        got = await self._consumer.getmany(
            timeout_ms=int(self.batcher.wait_s() * 1000), max_records=max(self.batcher.room(), 1)
        )
        now = time.monotonic()
        for msgs in got.values():
            for m in msgs:
                self._arrived[(m.topic, m.partition, m.offset)] = now
                self.batcher.add(m)
        if got:
            self.progress.progressed()
        while self.batcher.due():
            await self.flush(self.batcher.take())

    async def flush(self, msgs: list[Record]) -> None:
        self._flushing = msgs
        try:
            await self._flush(msgs)
        finally:
            self._flushing = []

    async def _flush(self, msgs: list[Record]) -> None:
        t0 = time.perf_counter()
        metrics.BATCH_SIZE.observe(len(msgs))
        todo: list[tuple[Record, ScanResult]] = []
        dead: list[tuple[Record, Bad, int]] = []
        for m in msgs:
            out = parse(m.value)
            if out is None:
                metrics.RECORDS.labels("skipped").inc()
            elif isinstance(out, Bad):
                dead.append((m, out, 1))
            else:
                todo.append((m, out))
        dead += await self._store(todo)
        for m, bad, attempts in dead:
            await self._hold("dead letter", partial(self._dead_letter, m, bad, attempts))
        await self._commit(msgs)
        metrics.FLUSH_SECONDS.observe(time.perf_counter() - t0)

    # --- postgres --------------------------------------------------------------------------

    async def _store(self, todo: list[tuple[Record, ScanResult]]) -> list[tuple[Record, Bad, int]]:
        """Write the batch in one statement; if Postgres rejects its data, find the poison rows."""
        if not todo:
            return []
        try:
            await self._hold("batch write", partial(self._write, [r for _, r in todo]))
            metrics.RECORDS.labels("stored").inc(len(todo))
            return []
        except Exception as exc:  # only data errors get past _hold
            log.warning("batch of %d rejected (%s): writing its records one by one", len(todo), exc)
        dead: list[tuple[Record, Bad, int]] = []
        for m, r in todo:
            error = await self._write_one(r)
            if error is None:
                metrics.RECORDS.labels("stored").inc()
                continue
            value = decode(m.value)
            assert isinstance(value, dict)  # it parsed before
            dead.append((m, Bad("postgres_rejected", error, value), max(self.s.writer_max_retries, 1)))
        return dead

    async def _write_one(self, result: ScanResult) -> str | None:
        """Write one record alone, up to writer_max_retries times; the last error if never."""
        error = ""
        tries = max(self.s.writer_max_retries, 1)
        for attempt in range(1, tries + 1):
            try:
                await self._hold("row write", partial(self._write, [result]))
                return None
            except Exception as exc:  # a data error
                error = f"{type(exc).__name__}: {exc}"
                if attempt < tries:
                    metrics.RETRIES.labels("rejected").inc()
                    await asyncio.sleep(self.s.retry_backoff_s)
        return error

    async def _write(self, results: list[ScanResult]) -> None:
        assert self._pool is not None
        written = await store.write_batch(self._pool, results)
        metrics.ROWS.labels("scans").inc(written.scans)
        metrics.ROWS.labels("character_ownership").inc(written.ownership)

    async def _hold(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` until it succeeds, backing off while anything but bad data fails."""
        attempt = 0
        while True:
            try:
                return await fn()
            except Exception as exc:
                if store.is_data_error(exc):
                    raise
                attempt += 1
                metrics.RETRIES.labels("hold").inc()
                self.progress.waiting(what)  # alive (holding its position), not ready
                delay = min(self.s.retry_backoff_s * 2 ** min(attempt - 1, 16), self.s.writer_backoff_max_s)
                log.warning(
                    "%s failed (%s: %s); retry %d in %.1fs", what, type(exc).__name__, exc, attempt, delay
                )
                await asyncio.sleep(delay)

    # --- kafka -----------------------------------------------------------------------------

    async def _dead_letter(self, m: Record, bad: Bad, attempts: int) -> None:
        assert self._producer is not None
        key = m.key.decode(errors="replace") if m.key else _job_id(bad.value)
        letter = DeadLetter(
            source="writer",
            topic=m.topic,
            key=key,
            value=bad.value,
            reason=bad.reason,
            error=f"{bad.error} (at {m.topic}[{m.partition}]@{m.offset})",
            attempts=attempts,
        )
        await self._producer.send_and_wait(
            PERSISTENCE_DLQ,
            letter.model_dump_json().encode(),
            key=key.encode() if key else None,
            partition=partition_for(key, BY_NAME[PERSISTENCE_DLQ].partitions) if key else 0,
            headers=trace.headers(trace.child_of(trace.from_headers(m.headers))),
        )
        metrics.DEAD_LETTERS.labels(bad.reason).inc()
        metrics.RECORDS.labels("dead_lettered").inc()
        log.warning("dead-lettered %s@%d job %s: %s: %s", m.topic, m.offset, key, bad.reason, bad.error)

    async def _commit(self, msgs: list[Record]) -> None:
        """Commit exactly the offsets of this batch, for the partitions this writer still owns."""
        assert self._consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for m in msgs:
            tp = TopicPartition(m.topic, m.partition)
            offsets[tp] = max(offsets.get(tp, 0), m.offset + 1)
        owned = self._consumer.assignment()
        mine = {tp: off for tp, off in offsets.items() if tp in owned}
        if not mine:
            return
        consumer = self._consumer

        async def commit() -> None:
            try:
                await consumer.commit(mine)
                self.progress.progressed()
            except (CommitFailedError, IllegalStateError) as exc:
                # Rebalanced meanwhile: the new owner re-reads these records; rewriting is a no-op.
                log.warning("commit skipped after a rebalance: %s", exc)

        await self._hold("commit", commit)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        gone = set(revoked)
        n = self.writer.batcher.drop(lambda m: TopicPartition(m.topic, m.partition) in gone)
        if n:
            log.info("dropped %d pending records of revoked partitions (they will be re-read)", n)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        self.writer.progress.rebalanced(assigned)
        self.writer.assigned.set()


def _job_id(value: dict[str, Any]) -> str | None:
    job_id = value.get("job_id")
    return str(job_id) if job_id is not None else None
