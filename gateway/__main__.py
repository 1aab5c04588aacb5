"""`python -m gateway`: the SSE gateway on ECO2_GATEWAY_HOST:ECO2_GATEWAY_PORT."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import socket
import time
from collections.abc import Callable

import uvicorn

from contract.settings import get_settings

from .app import create_app

GC_THRESHOLDS = (700, 5, 5000)
# Young collections on a clock as well (`young_collections`): every GC_TICK_S a generation-0
# collection, every GC_MIDDLE_EVERY-th tick a generation-1 one.
GC_TICK_S = 0.025
GC_MIDDLE_EVERY = 4
GC_BUSY_S = 0.002  # ... once the process has used this much CPU since the last one
GC_IDLE_SLOWDOWN = 10
SLOW_GC_S = 0.05  # a collection that paused every stream this long is logged (a delivery stall)

log = logging.getLogger("eco2.gateway")


class SlowGcLog:
    """A `gc.callbacks` hook: logs each collection that held the process up over `SLOW_GC_S`, with
    its generation, its CPU time beside its wall time (on a busy box most of a long pause can be
    the process waiting for a core, not the collection working) and what it collected, so a stall
    clients saw can be matched to one."""

    def __init__(self, limit_s: float = SLOW_GC_S) -> None:
        self.limit_s = limit_s
        self._t0 = self._cpu0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0, self._cpu0 = time.perf_counter(), time.thread_time()
            return
        took = time.perf_counter() - self._t0
        if took >= self.limit_s:
            log.warning(
                "gc: a generation %s collection held every stream up %.1f ms (CPU %.1f ms, %s collected)",
                info.get("generation"),
                took * 1000,
                (time.thread_time() - self._cpu0) * 1000,
                info.get("collected"),
            )


async def young_collections(
    tick_s: float = GC_TICK_S,
    middle_every: int = GC_MIDDLE_EVERY,
    busy_s: float = GC_BUSY_S,
    cpu: Callable[[], float] = time.process_time,
) -> None:
    """Collect the young generations on a clock, so that each collection stays small (issue 23).

    CPython's allocation count (`gc.get_count()[0]`, which triggers a young collection past
    threshold 0) goes up for every new tracked object and down for every freed one, whichever
    generation that one was in. Under churn the streams that end free old objects as fast as the
    streams that open allocate new ones: the count stays low while the youngest generation grows,
    and the collection that finally comes walks tens of thousands of objects (5-18 ms of CPU for
    a generation-0 one, 19-29 ms for a generation-1 one, with 2,000 streams churning; each stops
    every stream of the process). Collected every `tick_s`, a young generation holds only what
    `tick_s` allocated; the thresholds still apply between ticks. A tick collects only once the
    process has used `busy_s` of CPU since the last collection (what it allocates goes with the
    work it does), and after an idle tick the clock slows down `GC_IDLE_SLOWDOWN` times: an idle
    gateway is barely woken."""
    n = 0
    last = cpu()
    idle = False
    while True:
        await asyncio.sleep(tick_s * (GC_IDLE_SLOWDOWN if idle else 1))
        now = cpu()
        idle = now - last < busy_s
        if idle:
            continue
        last = now
        n += 1
        gc.collect(1 if n % middle_every == 0 else 0)


def raise_fd_limit() -> None:
    """Every client is a socket: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def main() -> None:
    s = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raise_fd_limit()
    app = create_app(s, background=[young_collections])
    # Every collection stops every stream. Freeze the start-up objects (never scanned again), keep
    # young collections small and full ones rare: with 2,000 streams churning (issue 13) a young
    # collection with threshold 50,000 took ~160 ms, the default's full one ~430 ms; at
    # (700, 5, 1000) young ones take ~1 ms, middle ones ~7 ms, delivery p99 92 -> 17 ms. Young
    # collections also run on a clock (`young_collections`, issue 23), about 5x as many middle ones
    # as before: threshold 2 went 1000 -> 5000 so that full collections stay as rare.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.callbacks.append(SlowGcLog())
    config = uvicorn.Config(
        app,
        host=s.gateway_host,
        port=s.gateway_port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=75,  # above the clients' poll/reconnect gaps: no reset races
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    if s.gateway_processes > 1:
        server.run(sockets=[shared_socket(s.gateway_host, s.gateway_port)])
    else:
        server.run()


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket several gateway processes bind together (SO_REUSEPORT): the kernel
    spreads new connections over them. Each process has its own Redis pub/sub connection and
    serves any job (history + live come from Redis), so no stickiness is needed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    main()
