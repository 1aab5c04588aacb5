"""The router's self-healing: notice that Redis lost the view and replay it from `scan.events`.

Every `view_check_s` the router looks at the view marker (view/marker.py). When it is missing,
written by another Redis run (a restart), or rebuilding with no live rebuilder, one router process
claims the rebuild and replays the window the view is meant to hold (`state_ttl_s`, or
`rebuild_window_s`) from the offsets-for-times of its start to the end offsets at that moment,
through the same idempotent apply, while the router agent keeps routing new events. Then it marks
the view ready, unless the view was lost again meanwhile (the next check starts over).

While the view is ready, every `view_checkpoint_s` a router records the group's committed
offsets as the view's checkpoint (everything below them is applied: the commit rule). A restart
that reloads the AOF brings the checkpoint back only if everything written before it came back
too (the AOF is a sequential log), so that rebuild starts at the checkpoint: seconds of events,
not the day of the window. A flushed or emptied Redis has no checkpoint: the whole window, replayed
newest first (view/rebuild.py `rebuild_newest_first`), and the marker says so, so that readers
serve each job as soon as its part of the log is back (seconds), not after the whole day.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import Counter, Gauge

from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS
from view import Claim, StateStore, checkpoint
from view.rebuild import RebuildStats, rebuild, rebuild_newest_first

from .app import trace_logger

log = trace_logger("eco2.router.heal")

# result: done | superseded | failed
REBUILDS = Counter("eco2_view_rebuilds_total", "automatic view rebuilds", ["result"])
# result: new | duplicate
REPLAYED = Counter("eco2_view_rebuild_events_total", "events replayed by automatic rebuilds", ["result"])
REBUILDING = Gauge("eco2_view_rebuilding", "1 while this process rebuilds the Redis view")
LAST_SECONDS = Gauge("eco2_view_rebuild_last_seconds", "duration of the last finished rebuild")
LAST_EVENTS = Gauge("eco2_view_rebuild_last_events", "events replayed by the last finished rebuild")
LAST_FIRST_CHUNK = Gauge(
    "eco2_view_rebuild_last_first_chunk_seconds",
    "newest-first rebuilds: until the newest chunk of every partition was back (recent jobs served)",
)
# from: checkpoint | window
STARTS = Counter("eco2_view_rebuild_starts_total", "automatic rebuilds by where they started", ["start"])
CHECKPOINTS = Counter("eco2_view_checkpoints_total", "view checkpoints written")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def window_s(s: Settings) -> int:
    return s.rebuild_window_s or s.state_ttl_s


class Healer:
    """One per router process: checks the marker and runs at most one rebuild at a time."""

    def __init__(self, s: Settings, store: StateStore, group: str | None = None) -> None:
        self.s = s
        self.group = group or s.router_group  # whose committed offsets the checkpoint records
        self._admin: AIOKafkaAdminClient | None = None
        self._checkpoint_at = 0.0
        # Replayed events are not published: streams are held or resynced from history when the
        # view turns ready, so a flood of old events on pub/sub would only cost the gateways CPU.
        self.store = StateStore(store.redis, store.ttl_s, store.finished_ttl_s, publish=False)
        # ... except the records the router may not have applied yet (newest first, `live_from`).
        self.live = StateStore(store.redis, store.ttl_s, store.finished_ttl_s, publish=True)
        lease = max(int(s.view_check_s * 10), 5)
        self.claim = Claim(store.redis, f"{socket.gethostname()}-{os.getpid()}", lease)
        self.task: asyncio.Task[None] | None = None

    async def check(self) -> None:
        """One look at the marker: claim and start a rebuild, or renew the running one's lease."""
        try:
            if self.task is not None and not self.task.done():
                if not await self.claim.renew():
                    log.warning("view lost again during the rebuild; it will be redone")
                return
            if await self.claim.take():
                self.task = asyncio.create_task(self._rebuild(), name="view-rebuild")
            elif (
                self.s.view_checkpoint_s
                and time.monotonic() - self._checkpoint_at >= self.s.view_checkpoint_s
            ):
                self._checkpoint_at = time.monotonic()
                await self._checkpoint()
        except Exception as exc:  # Redis down: the router's apply retries; check again next tick
            log.warning("view check failed: %s", exc)

    async def _committed(self) -> dict[int, int]:
        """The router group's committed offsets of `scan.events` ({partition: offset})."""
        if self._admin is None:
            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.s.kafka_bootstrap, **self.s.kafka_client_kwargs()
            )
            await admin.start()
            self._admin = admin
        tps = [TopicPartition(EVENTS, p) for p in range(BY_NAME[EVENTS].partitions)]
        committed = await self._admin.list_consumer_group_offsets(self.group, partitions=tps)
        return {tp.partition: m.offset for tp, m in committed.items() if m is not None and m.offset >= 0}

    async def _checkpoint(self) -> None:
        """The group's committed offsets (read first), then the checkpoint, if the view is ready."""
        offsets = await self._committed()
        # The server run the claim check saw a moment ago (the Lua re-checks the marker against it).
        if offsets and self.claim.run_id and await checkpoint(self.store.redis, self.claim.run_id, offsets):
            CHECKPOINTS.inc()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self._admin is not None:
            await self._admin.close()

    async def _rebuild(self) -> None:
        since = time.time() - window_s(self.s)
        REBUILDING.set(1)
        t0 = time.monotonic()
        try:
            resume = await self.claim.resume_offsets()
            if resume is not None:
                where = f"from the checkpoint of {_utc(resume[1])} {resume[0]}"
            else:
                where = f"since {_utc(since)} ({window_s(self.s)}s window)"
            STARTS.labels("window" if resume is None else "checkpoint").inc()
            log.warning("view rebuild started (epoch %s): replaying scan.events %s", self.claim.epoch, where)
            echo = lambda line: log.info("rebuild: %s", line.strip())  # noqa: E731
            stats: RebuildStats
            if resume is not None:  # seconds of events: all or nothing, as readers always did
                stats = await rebuild(
                    self.s, echo=echo, since_ms=int(since * 1000), store=self.store, start_offsets=resume[0]
                )
            else:
                # Committed first: everything below it was applied before the flush and will not be
                # applied by the router again (the commit rule), so it needs no publishing.
                live_from = await self._committed()
                if not await self.claim.replay_newest_first():
                    raise RuntimeError("the view was lost again before the replay began")
                stats = await rebuild_newest_first(
                    self.s,
                    self.store,
                    int(since * 1000),
                    self.s.rebuild_chunk,
                    live=self.live,
                    live_from=live_from,
                    echo=echo,
                )
            REPLAYED.labels("new").inc(stats.new)
            REPLAYED.labels("duplicate").inc(stats.events - stats.invalid - stats.new)
            took = time.monotonic() - t0
            if await self.claim.finish():
                REBUILDS.labels("done").inc()
                LAST_SECONDS.set(took)
                LAST_EVENTS.set(stats.events)
                if stats.first_chunk_s is not None:
                    LAST_FIRST_CHUNK.set(stats.first_chunk_s)
                log.warning(
                    "view rebuild done (epoch %s): %d events replayed (%d new), %d jobs, %.1fs "
                    "(newest chunks back after %s); view ready",
                    self.claim.epoch,
                    stats.events,
                    stats.new,
                    len(stats.jobs),
                    took,
                    "-" if stats.first_chunk_s is None else f"{stats.first_chunk_s:.2f}s",
                )
            else:
                REBUILDS.labels("superseded").inc()
                log.warning("view rebuild %s superseded: the view was lost again meanwhile", self.claim.epoch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Kafka or Redis failed mid-way: the lease lapses, a check retries
            REBUILDS.labels("failed").inc()
            log.warning("view rebuild failed (%s: %s); it will be retried", type(exc).__name__, exc)
        finally:
            REBUILDING.set(0)
