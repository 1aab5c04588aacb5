"""Health of a Faust consumer (stage workers, router): what runtime/health.py judges, sampled
from Faust's consumer and the in-flight counts of streams/commits.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtime.health import Policy, Progress, unread, watch

from . import commits


def internals(app: Any) -> dict[str, Any]:
    """Faust's and aiokafka's own view of the consumer, for /health: which layer is stuck.

    Read from the event loop while the consumer thread may change it: a snapshot, not a
    consistent state. Every lookup is guarded, so a renamed attribute shows up as missing."""

    def get(obj: Any, *path: str) -> Any:
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                return None
        return obj

    consumer = app.consumer
    fetcher = getattr(app, "_fetcher", None)
    kafka = get(consumer, "_thread", "_consumer")
    coordinator = get(kafka, "_coordinator")
    idle = get(kafka, "_subscription", "fetcher_idle_time")
    return {
        "flow_active": get(consumer, "flow_active"),
        "fetcher": get(fetcher, "state"),
        "fetcher_tasks": len(get(fetcher, "_futures") or ()),
        "generation": get(app, "consumer_generation_id"),
        "coordinator_generation": get(coordinator, "generation"),
        "coordinator_id": get(coordinator, "coordinator_id"),
        "rebalancing": get(app, "rebalancing"),
        "fetch_idle_s": round(idle, 1) if isinstance(idle, (int, float)) else None,
    }


async def _positions(consumer: Any, tps: frozenset[Any]) -> Mapping[Any, int | None]:
    """The consumer's position of every partition in one hop to its thread. Faust's `position`
    is a hop per partition (a future, a queue and two cross-thread wake-ups each): 16 partitions
    every `health_interval_s` were ~2% of a stage worker's CPU (issue 19)."""
    thread = getattr(consumer, "_thread", None)
    if thread is None or not hasattr(thread, "call_thread"):  # not Faust's threaded consumer
        return {tp: await consumer.position(tp) for tp in tps}
    kafka = thread._ensure_consumer()

    async def read() -> dict[Any, int | None]:  # runs on the consumer's own thread and loop
        return {tp: await kafka.position(tp) for tp in tps}

    return await thread.call_thread(read)  # type: ignore[no-any-return]


def watch_faust(app: Any, s: Any) -> Progress:
    """Start watching a Faust app's consumer (stage workers, router) once its worker runs.

    Progress = a message delivered to a stream (commits.InFlight counts them) or a committed
    offset that moved; pending = unacked in-flight messages + unread records below the end."""
    progress = Progress(app.conf.id, Policy.of(s))
    state: dict[str, Any] = {"deliveries": -1, "committed": None}

    async def sample() -> tuple[Mapping[Any, int], Mapping[Any, float]]:
        consumer = app.consumer
        progress.internals = internals(app)
        flight: commits.InFlight = consumer.in_flight
        tps = frozenset(consumer.assignment())
        if tps != progress.assigned:
            progress.rebalanced(tps)
        committed = commits.committed_offsets(consumer)
        if flight.deliveries != state["deliveries"] or committed != state["committed"]:
            if state["committed"] is not None:
                progress.progressed()
            state.update(deliveries=flight.deliveries, committed=committed)
        if not tps:
            return {}, {}
        ends = await consumer.highwaters(*tps)
        positions = await _positions(consumer, tps)
        pending = unread(ends, positions)
        for tp in tps:
            pending[tp] = pending.get(tp, 0) + flight.outstanding(tp)
        return pending, {tp: flight.oldest_age(tp) for tp in tps}

    @app.task
    async def _watch_health() -> None:
        await watch(progress, sample, s.health_interval_s)

    return progress
