"""The event router: `scan.events` -> Redis state, history and live pub/sub, in batches.

At-least-once: `take_after_first` (streams/take.py, Faust's `take_events` without its idle clock)
acks a batch only when the agent asks for the next one, so the batch is applied to Redis first.
A Redis outage is retried with backoff for as long as it lasts (the agent simply stops asking
for events); nothing is dropped, and replays are harmless because
`StateStore.apply` is idempotent. Stopped while a batch still waits for Redis, the process exits
at once without committing (Faust would otherwise wait on the unacked batch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from contract.events import ScanEvent
from contract.settings import Settings
from contract.topics import EVENTS
from contract.trace import from_headers, trace_id
from runtime.health import Progress
from view import StateStore, client

from .app import topic, trace_logger
from .heal import Healer
from .take import take_after_first

log = trace_logger("eco2.router")

ROUTED = Counter("eco2_router_events_total", "events applied to Redis", ["result"])  # new | duplicate
INVALID = Counter("eco2_router_invalid_total", "records on scan.events that are not a ScanEvent")
BATCH = Histogram(
    "eco2_router_batch_size",
    "events per Redis round trip",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
APPLY = Histogram(
    "eco2_router_apply_seconds",
    "latency of one batched Redis apply",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
REDIS_ERRORS = Counter("eco2_router_redis_errors_total", "failed Redis applies (retried)")

# Exit code when stopped while holding a batch Redis has not taken: exiting hard keeps Faust
# from committing the batch's offsets on the way out, so the next router replays it.
EXIT_UNAPPLIED = 75


def parse(events: Sequence[Any]) -> list[ScanEvent]:
    """The valid ScanEvents of a Faust batch, each logged with its trace id."""
    out: list[ScanEvent] = []
    debug = log.isEnabledFor(logging.DEBUG)
    for event in events:
        try:
            ev = ScanEvent.model_validate_json(event.value)
        except (ValidationError, ValueError) as exc:
            INVALID.inc()
            msg = event.message
            log.error(
                "skipping invalid record %s[%s]@%s trace=%s: %s",
                msg.topic,
                msg.partition,
                msg.offset,
                trace_id(from_headers(event.headers)),
                exc,
            )
            continue
        # Per event at DEBUG: at 10k events/s an INFO line each would cost the router a core
        # (and its arguments are worked out only when DEBUG is on).
        if debug:
            log.debug(
                "route job=%s seq=%s stage=%s status=%s trace=%s",
                ev.job_id,
                ev.seq,
                ev.stage,
                ev.status,
                trace_id(from_headers(event.headers)),
            )
        out.append(ev)
    return out


class Stopping(Exception):
    """The worker is shutting down while a batch is still waiting for Redis."""


async def apply_until_done(
    store: StateStore,
    events: list[ScanEvent],
    s: Settings,
    stopping: Callable[[], bool] = lambda: False,
    progress: Progress | None = None,
) -> list[bool]:
    """Apply one batch, retrying with capped exponential backoff until Redis takes it."""
    delay = s.retry_backoff_s
    while True:
        t0 = time.perf_counter()
        try:
            new = await store.apply(events)
        except Exception as exc:  # any Redis/network failure: wait and try again, never drop
            REDIS_ERRORS.inc()
            if progress is not None:
                progress.waiting("redis")  # alive (retrying), not ready
            log.warning("redis apply of %d events failed (%s); retrying in %.1fs", len(events), exc, delay)
            until = time.monotonic() + delay
            while time.monotonic() < until:
                if stopping():
                    raise Stopping from exc
                await asyncio.sleep(min(0.2, delay))
            delay = min(delay * 2, 10.0)
            continue
        APPLY.observe(time.perf_counter() - t0)
        return new


def register(
    app: faust.App, s: Settings, progress: Progress | None = None
) -> Callable[[], Awaitable[None]]:
    """Define the router agent on `app` (its consumer group is app.conf.id). Returns the view
    watch, a loop for the worker to start at once (`watch_view_forever`): a Faust timer would only
    start after the first partition assignment, which after a router restart waits out the dead
    member's session (~10 s), and a flush in that time would wait for it."""
    stores: list[StateStore] = []
    healers: list[Healer] = []

    def store() -> StateStore:
        if not stores:  # created in the worker's event loop
            # A hung Redis must fail (and be retried), not block forever.
            name = f"eco2-router-{os.getpid()}"
            redis = client(s.redis_url, name, socket_timeout=10, socket_connect_timeout=5)
            stores.append(StateStore(redis, s.state_ttl_s, s.result_ttl_s))
        return stores[0]

    checks: list[asyncio.Task[None]] = []

    async def watch_view_forever() -> None:
        """Notice a lost view (flushed or restarted Redis) and rebuild it from the log, every
        `view_check_s`. A check runs beside the loop, so one slowed by a Redis outage never makes
        the ticks overlap."""
        while True:
            if not healers:
                healers.append(Healer(s, store(), group=app.conf.id))
            if not checks or checks[0].done():
                checks[:] = [asyncio.create_task(healers[0].check(), name="view-check")]
            await asyncio.sleep(s.view_check_s)

    @app.agent(topic(app, EVENTS), name="eco2-router")
    async def route(stream: faust.StreamT[bytes]) -> None:
        async for batch in take_after_first(stream, s.router_batch_max, s.router_batch_within_s):
            events = parse(batch)
            if not events:
                continue
            BATCH.observe(len(events))
            try:
                new = await apply_until_done(store(), events, s, lambda: bool(app.should_stop), progress)
            except (asyncio.CancelledError, Stopping):
                log.critical("stopped with %d events not yet in Redis; exiting without commit", len(events))
                logging.shutdown()
                os._exit(EXIT_UNAPPLIED)
            fresh = sum(new)
            ROUTED.labels("new").inc(fresh)
            ROUTED.labels("duplicate").inc(len(new) - fresh)

    return watch_view_forever
