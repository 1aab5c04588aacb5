"""Which asyncio event loop the Kafka-side processes run on, and the metric that says so.

uvicorn already serves the API, gateway and model stand-in on uvloop (`uvicorn[standard]`); Faust
(stage workers, router) and the writer's `asyncio.run` would get asyncio's pure-Python selector
loop, whose per-callback and per-socket overhead is a large share of their CPU per scan
(docs/benchmarks.md, "CPU per scan"). `ECO2_EVENT_LOOP=asyncio` switches back for an A/B run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import InfoMetricFamily
from prometheus_client.registry import Collector

from .settings import Settings

EVENT_LOOP_METRIC = "eco2_event_loop"  # info: loop="uvloop" | "asyncio"


def use(s: Settings) -> None:
    """Set the loop policy before Faust's worker or `asyncio.run` makes the process's loop
    (the documented switch of Faust's `mode`: `mode.loop.use("uvloop")` does the same)."""
    if s.event_loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


class _LoopInfo(Collector):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.name = loop_name(loop)

    def collect(self) -> Iterator[InfoMetricFamily]:
        yield InfoMetricFamily(
            EVENT_LOOP_METRIC, "the event loop this process runs on", value={"loop": self.name}
        )


_exported = False


def export(loop: asyncio.AbstractEventLoop) -> None:
    """Export `eco2_event_loop_info{loop=...}` for the process's loop (once)."""
    global _exported
    if not _exported:
        REGISTRY.register(_LoopInfo(loop))
        _exported = True
