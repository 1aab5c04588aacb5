"""`python -m persistence`: run the Postgres writer until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from contract.settings import get_settings
from runtime.health import serve
from runtime.metrics import track_event_loop

from .writer import Writer


async def _run() -> None:
    s = get_settings()
    writer = Writer(s)
    serve(s.metrics_port, writer.progress, s.metrics_host)  # /metrics, /health, /ready
    track_event_loop()
    task = asyncio.create_task(writer.run())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    asyncio.run(_run())


if __name__ == "__main__":
    main()
