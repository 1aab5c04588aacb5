"""Process metrics every Python component exports beside its own: the asyncio task count and
the garbage collector's pauses.

A task leaked per connection or per job (sse-starlette 3.1.1 leaked one watcher task per SSE
connection: sse-starlette #152) shows as a task count that keeps climbing under steady load, long
before memory or CPU give it away; `eco2 bench soak` samples this gauge from every component.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

ASYNCIO_TASKS = "eco2_asyncio_tasks"  # the metric's name; the soak and dashboards read it
GC_PAUSE = "eco2_gc_pause_seconds"

# A collection stops the whole process: every stream of a gateway waits it out (issue 13 saw
# 100-170 ms pauses every few seconds before the gateway's thresholds were raised).
_GC_PAUSES = Histogram(
    GC_PAUSE,
    "garbage collection pauses (the process does nothing else meanwhile)",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
_gc_started: list[float] = []


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[:] = [time.perf_counter()]
    elif _gc_started:
        _GC_PAUSES.labels(str(info.get("generation", ""))).observe(time.perf_counter() - _gc_started[0])


class _LoopTasks(Collector):
    """Counts the unfinished tasks of the tracked event loops at scrape time (the scrape may run
    in prometheus-client's own HTTP thread: `asyncio.all_tasks(loop)` is safe from there)."""

    def __init__(self) -> None:
        self.loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        total = 0
        for loop in list(self.loops):
            if not loop.is_closed():
                total += len(asyncio.all_tasks(loop))
        yield GaugeMetricFamily(ASYNCIO_TASKS, "asyncio tasks not yet done in this process", value=total)


_collector: _LoopTasks | None = None
_lock = threading.Lock()


def track_event_loop(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Export `eco2_asyncio_tasks` for `loop` (default: the running one) and the process's GC
    pauses (`eco2_gc_pause_seconds`). Idempotent."""
    global _collector
    loop = loop or asyncio.get_running_loop()
    with _lock:
        if _collector is None:
            _collector = _LoopTasks()
            REGISTRY.register(_collector)
        _collector.loops.add(loop)
        if _on_gc not in gc.callbacks:
            gc.callbacks.append(_on_gc)


def add_metrics_route(app: Any) -> None:
    """`GET /metrics` on a FastAPI app, answered 200 as Prometheus expects (a mounted ASGI app
    answers `/metrics` with a 307 to `/metrics/`, which the runbooks' curl did not follow)."""
    from fastapi import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
