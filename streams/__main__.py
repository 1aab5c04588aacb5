"""`python -m streams worker --stages vision,rule` or `python -m streams router`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from contract.events import PIPELINE
from contract.settings import get_settings
from contract.topics import stage_group
from runtime.health import serve
from runtime.metrics import track_event_loop

from .app import create_app, quiet_noisy_loggers
from .watch import watch_faust


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streams")
    sub = parser.add_subparsers(dest="role", required=True)
    worker = sub.add_parser("worker", help="run stage agents")
    worker.add_argument("--stages", default=None, help="comma-separated subset of " + ",".join(PIPELINE))
    sub.add_parser("router", help="run the event router (scan.events -> Redis)")
    args = parser.parse_args(argv)

    s = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    quiet_noisy_loggers()
    watch_view: Callable[[], Awaitable[None]] | None = None
    if args.role == "worker":
        stages = [x for x in (args.stages or s.stages).split(",") if x]
        unknown = set(stages) - set(PIPELINE)
        if unknown:
            parser.error(f"unknown stages {sorted(unknown)}; choose from {','.join(PIPELINE)}")
        stages = [st for st in PIPELINE if st in stages]  # canonical order -> stable group id
        from .registry import RegistryMismatch, check

        try:
            check()  # every stage of contract/pipeline.py has its agent, no agent is left over
        except RegistryMismatch as exc:
            logging.critical("%s", exc)
            raise SystemExit(3) from None
        from .groups import OverlappingStages, refuse_overlap, watch_overlap

        try:
            if not s.stage_overlap_ok:
                asyncio.run(refuse_overlap(s, stages))
        except OverlappingStages as exc:
            logging.critical("%s", exc)
            raise SystemExit(3) from None
        from .monitor import InboundOnly

        # Faust's per-event statistics are read by nobody here (streams/monitor.py).
        app = create_app(stage_group(stages), s, monitor=InboundOnly)
        from .stages import register

        register(app, s, stages)
        progress = watch_faust(app, s)

        def stop(message: str) -> None:
            # Uncommitted jobs are redelivered to the group that stays (at-least-once + memo).
            logging.critical("%s", message)
            os._exit(3)

        @app.task
        async def keep_refusing_overlap() -> None:
            if not s.stage_overlap_ok:
                await watch_overlap(s, stages, stop)

    else:
        use_uvloop()
        # ROUTER_GROUP unless a test isolates itself
        app = create_app(s.router_group, s, fetch=(s.router_fetch_min_bytes, s.router_fetch_max_wait_ms))
        from .router import register as register_router

        progress = watch_faust(app, s)
        watch_view = register_router(app, s, progress)
    serve(s.metrics_port, progress, s.metrics_host)  # /metrics, /health, /ready

    @app.task
    async def export_task_count() -> None:  # runs once the worker's event loop is up
        track_event_loop()
        freeze_startup_heap()

    from faust.worker import Worker

    if watch_view is None:
        no_spinner(Worker(app, loglevel="warning", quiet=True)).execute_from_commandline()
        return
    watch: Callable[[], Awaitable[None]] = watch_view

    class RouterWorker(Worker):
        async def on_execute(self) -> None:
            """As soon as the worker runs, before the app waits for its first assignment."""
            await super().on_execute()
            self.add_future(watch())

    no_spinner(RouterWorker(app, loglevel="warning", quiet=True)).execute_from_commandline()


def freeze_startup_heap() -> None:
    """Collect once, then put everything alive after start-up (modules, Faust's services, the
    pydantic schemas, the clients) out of the collector's reach with `gc.freeze()`: those objects
    live as long as the process, yet every full (generation 2) collection walked all of them
    again, a stall of the whole event loop (0.68 s wall for one on a loaded box, issue 19).
    Objects made later are collected as before."""
    gc.collect()
    gc.freeze()


def use_uvloop() -> None:
    """The router's event loops (Faust's and its consumer thread's) on uvloop: at the 300-VU
    rate the router's CPU is mostly per wake-up (a fetch, a thread hop, a batch, a Redis round
    trip), which uvloop's loop runs for less than asyncio's (issue 19's router profile)."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def no_spinner(worker: Any) -> Any:
    """Faust's worker drives a terminal spinner from the root logger: it sets the root level to
    DEBUG and adds a DEBUG handler, so every debug call of every library (httpcore, Faust's
    topics) built a LogRecord, found its caller and went through the handlers, for nothing once
    started (~3% of a stage worker's CPU, issue 19). Without it the root logger stays at WARNING."""
    worker.spinner = None
    return worker


if __name__ == "__main__":
    main()
