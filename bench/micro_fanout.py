"""SSE fan-out of the gateway: N concurrent clients, each following its own job.

Private gateway processes (`python -m gateway`, `gateways` of them on one free port, as
`ECO2_GATEWAY_PROCESSES` runs them) on a private redis-server, so no other traffic reaches them
(pub/sub is server-wide). Steps: N synthetic jobs get their `queued` state; N clients connect (at
`connect_rate`/s) and each waits on its stream; then every job's remaining 9 events are applied
through `StateStore.apply` (what the router does: history, state, PUBLISH) at `rate` events/s in
total, stage by stage across all jobs, each event's `ts` set just before it is applied. The same
run against Centrifugo (the same clients and events through its server API) is bench/peer.py.

With `streams` > 1 the streams end as real ones do (churn): each client follows one job to its
terminal event, its stream closes, and it opens a new one for its next job, whose `queued` state
was applied just before the previous job's terminal event; `streams` jobs per client in all, the
events of every client's current job applied round by round at `rate`, the clients' jobs
staggered so that a ninth of them end a stream in every round (steady churn, not all at once).
Reported beside the rest: streams opened per second, the gateway's CPU per stream (open, 10
events, close), and stalls: spans over 50 ms in which an applied event waited and no client
received anything (a server pausing every stream, e.g. for a garbage collection; or the
generator, whose loop lag is reported beside; or the gateway's Redis, whose AOF rewrites -- a fork,
then a child writing the whole dataset beside it -- are read from its log and each stall that
meets one is marked).

Measured: delivery latency (event ts -> client receipt, same clock), lost/duplicated events per
client, the gateway's memory per connection (VmRSS before and after the clients connected), its
Redis connections (`CLIENT LIST` entries named after its pid: fixed, whatever N), its CPU, and the
load generator's CPU (one asyncio process holding all N client sockets).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from contract.events import ScanEvent, ScanJob
from contract.settings import Settings
from runtime.metrics import GC_PAUSE
from view import StateStore

from . import harness, synthetic, wire
from .load import check_seqs
from .redis_log import Rewrite, read_rewrites
from .stats import CpuMeter, GcPauses, LoopLag, machine, percentile, quiet_gc, rss_kib, summary, tree_cpu_s

TARGET_CLIENTS = 10_000
TARGET_P99_MS = 100.0
STALL_MS = 50.0  # churn: no gap in the merged delivery longer than this
EVENTS_PER_JOB = 10
JOB_SECONDS = 15.0  # the original's model time per job: a live job emits its 10 events over ~15 s


@dataclass
class FanoutConfig:
    clients: int = 10_000
    rate: float = 0.0  # events/s applied in total; 0 = clients * 10 / 15 (every client's job live)
    connect_rate: float = 500.0  # new client connections per second
    timeout_s: float = 300.0
    name: str = ""
    gateways: int = 1  # gateway processes sharing the port (SO_REUSEPORT)
    streams: int = 1  # jobs each client follows one after the other (> 1: streams that end)

    @property
    def events_per_s(self) -> float:
        return self.rate or self.clients * EVENTS_PER_JOB / JOB_SECONDS


async def _gateway_conns(client: aioredis.Redis, pids: list[int]) -> int:
    names = {f"eco2-gateway-{pid}" for pid in pids}
    return sum(1 for c in await client.client_list() if c.get("name") in names)


@dataclass
class Server:
    """The fan-out server under test and how the benchmark drives it."""

    name: str  # "gateway" | "centrifugo"
    pids: list[int]  # its processes: CPU and memory per connection
    prepare: Callable[[list[list[ScanEvent]]], Awaitable[None]]  # before the clients connect
    publish: Callable[[list[ScanEvent]], Awaitable[object]]  # one batch of live events
    follow: Callable[[ScanJob, Fanout], Coroutine[Any, Any, wire.Follow]]
    # What it needs beside it (the gateway's Redis: history, state, pub/sub): counted with it.
    helper_pids: list[int] = field(default_factory=list)
    redis_conns: Callable[[], Awaitable[int]] | None = None
    # Whether a client's first event (queued) comes from a history read when it connects;
    # otherwise the connect reply stands for it and seq 1 is not checked.
    history_on_connect: bool = True
    # The server's /metrics text (one process's, where several share a port), for its GC pauses.
    metrics: Callable[[], Awaitable[str]] | None = None
    # Its Redis's persistence counters (INFO) and log (its AOF rewrites), to match stalls to them.
    redis_info: Callable[[], Awaitable[dict[str, Any]]] | None = None
    redis_log: Path | None = None


class Fanout:
    def __init__(self, cfg: FanoutConfig) -> None:
        self.cfg = cfg
        self.delivery: list[float] = []
        self.recent: collections.deque[tuple[float, float]] = collections.deque()
        self.streaming = 0
        self.events = 0
        self.publishing = False
        self.last_received = 0.0
        self.stalls: list[float] = []  # stalls over STALL_MS while publishing (see on_event)
        self.stalled_at: list[tuple[float, float]] = []  # (wall-clock end, length) of each stall
        self.max_gap = 0.0
        self.max_gap_end = 0.0  # wall clock: when the longest gap (a stall or not) ended

    def connected(self) -> None:
        self.streaming += 1

    def on_event(self, ev: dict[str, Any], received: float) -> None:
        self.events += 1
        if int(ev["seq"]) == 1:
            self.streaming += 1  # a stream's first event: the queued one, read from history
            return
        lat = received - float(ev["ts"])
        self.delivery.append(lat)
        self.recent.append((time.monotonic(), lat))
        if self.publishing:
            # How long nothing at all was delivered while this event was waiting: since it was
            # applied or since the previous delivery, whichever is later. The publisher's pacing
            # (idle between batches) does not count; a server pausing every stream does.
            gap = received - max(float(ev["ts"]), self.last_received)
            if gap > self.max_gap:
                self.max_gap, self.max_gap_end = gap, received
            if gap * 1000 > STALL_MS:
                self.stalls.append(gap)
                self.stalled_at.append((received, gap))
            self.last_received = max(self.last_received, received)


@contextlib.asynccontextmanager
async def gateway_server(s: Settings, cfg: FanoutConfig, run: str) -> AsyncIterator[Server]:
    """`cfg.gateways` private gateway processes on one port, on a private Redis."""
    async with harness.private_redis(s) as (redis_url, redis_proc):
        port = harness.free_port()
        env = {
            "ECO2_GATEWAY_PORT": str(port),
            "ECO2_GATEWAY_PROCESSES": str(cfg.gateways),
            "ECO2_REDIS_URL": redis_url,
            # A client's next stream may open before the gateway has released its last one.
            "ECO2_MAX_CONNECTIONS": str(cfg.clients * (2 if cfg.streams > 1 else 1) + 100),
            "ECO2_MAX_STREAM_S": str(cfg.timeout_s + 60),
        }
        procs = [
            harness.python_proc(s, f"gateway-{run}-{i}", ["gateway"], env).start()
            for i in range(cfg.gateways)
        ]
        client = aioredis.from_url(redis_url)
        store = StateStore(client, s.state_ttl_s)
        pids = [p.pid for p in procs]
        try:
            for p in procs:
                await harness.wait_http(f"http://127.0.0.1:{port}/ready", p)

            async def prepare(evs: list[list[ScanEvent]]) -> None:
                for k in range(0, len(evs), 1000):
                    await store.apply([e[0] for e in evs[k : k + 1000]])

            async def follow(j: ScanJob, fan: Fanout) -> wire.Follow:
                return await wire.follow(
                    "127.0.0.1", port, j.job_id, j.user_id, timeout_s=cfg.timeout_s, on_event=fan.on_event
                )

            async def conns() -> int:
                return await _gateway_conns(client, pids)

            async def metrics() -> str:
                conn = wire.Connection("127.0.0.1", port)
                try:
                    return (await conn.request("GET", "/metrics")).body.decode()
                finally:
                    conn.close()

            async def info() -> dict[str, Any]:
                return await redis_info(client)

            yield Server(
                name="gateway",
                pids=pids,
                prepare=prepare,
                publish=store.apply,
                follow=follow,
                helper_pids=[redis_proc.pid],
                redis_conns=conns,
                metrics=metrics,
                redis_info=info,
                redis_log=redis_proc.log,
            )
        finally:
            for p in procs:
                p.stop()
            await client.aclose()


async def run_fanout(s: Settings, cfg: FanoutConfig, say: Any = print) -> dict[str, Any]:
    """Needs nothing of the stack: the gateway and its Redis are the benchmark's own."""
    run = synthetic.run_id()
    async with gateway_server(s, cfg, run) as server:
        return await fanout(server, cfg, run, say)


def stall_causes(
    fan: Fanout,
    lag: LoopLag,
    own_gc: GcPauses,
    rewrites: Sequence[Rewrite] = (),
    window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Which stalls the generator itself explains: its loop was held up (lag) or it collected
    garbage during the stall. The rest were the servers' (or Redis's, or the box's). Each stall
    that meets one of Redis's AOF rewrites (from the server's decision to fork until its child
    exited) says how long after the rewrite's start it began (`redis_rewrite_ms`); with the
    publishing `window` (wall clock), the stalls per second inside rewrites and outside them.
    The longest gap is described the same way, whether it was a stall or not."""

    def row(end: float, gap: float) -> dict[str, Any]:
        start = end - gap
        rw = next((w for w in rewrites if w.overlaps(start, end)), None)
        return {
            "end": round(end, 3),
            "ms": round(gap * 1000, 1),
            "generator_lag_ms": round(lag.late_at(start, end) * 1000, 1),
            "generator_gc_ms": round(own_gc.during(start, end) * 1000, 1),
            "redis_rewrite_ms": None if rw is None else round((start - rw.started) * 1000, 1),
        }

    rows = [row(end, gap) for end, gap in fan.stalled_at]
    own = [r for r in rows if max(r["generator_lag_ms"], r["generator_gc_ms"]) >= STALL_MS / 2]
    longest = sorted(rows, key=lambda r: -r["ms"])[:25]
    out: dict[str, Any] = {
        "count": len(rows),
        "generator_held_up": len(own),
        "during_redis_rewrite": sum(1 for r in rows if r["redis_rewrite_ms"] is not None),
    }
    if window is not None:
        t0, t1 = window
        inside = sum(
            max(min(t1, w.ended if w.ended is not None else t1) - max(t0, w.started), 0.0) for w in rewrites
        )
        outside = max(t1 - t0 - inside, 0.0)
        n_in = out["during_redis_rewrite"]
        out["redis_rewrites"] = sum(1 for w in rewrites if w.overlaps(t0, t1))
        out["redis_rewrite_s"] = round(inside, 2)
        out["per_s_during_rewrite"] = round(n_in / inside, 2) if inside > 0 else None
        out["per_s_otherwise"] = round((len(rows) - n_in) / outside, 2) if outside > 0 else None
    # The longest gap, a stall or not: what a run without stalls came closest to, and when.
    out["longest_gap"] = row(fan.max_gap_end, fan.max_gap) if fan.max_gap_end else None
    out["longest"] = longest
    return out


REDIS_INFO = (
    "aof_rewrites",
    "total_forks",
    "latest_fork_usec",
    "aof_last_cow_size",
    "aof_current_size",
    "aof_base_size",
    "used_memory",
    "aof_delayed_fsync",
)


async def redis_info(client: aioredis.Redis) -> dict[str, Any]:
    """The persistence counters of Redis that say what its forks cost (INFO persistence, stats,
    memory)."""
    got: dict[str, Any] = {}
    for section in ("persistence", "stats", "memory"):
        got.update(await client.info(section))
    return {k: got.get(k) for k in REDIS_INFO}


def _redis_delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """What Redis's persistence did while publishing: rewrites and forks (counts), the last fork's
    pause and copy-on-write, and how big the dataset and the AOF ended."""
    if a is None or b is None:
        return None
    mib = 1024 * 1024
    return {
        "aof_rewrites": b["aof_rewrites"] - a["aof_rewrites"],
        "forks": b["total_forks"] - a["total_forks"],
        "latest_fork_ms": round(b["latest_fork_usec"] / 1000, 1),
        "last_cow_mib": round(b["aof_last_cow_size"] / mib, 1),
        "used_memory_mib": round(b["used_memory"] / mib, 1),
        "aof_mib": round(b["aof_current_size"] / mib, 1),
        "aof_delayed_fsync": b["aof_delayed_fsync"] - a["aof_delayed_fsync"],
    }


def _rss(pids: list[int]) -> int:
    return sum(rss_kib(pid) or 0 for pid in pids)


def _cpu(pids: list[int]) -> float:
    return sum(tree_cpu_s(pids).values())


async def fanout(server: Server, cfg: FanoutConfig, run: str, say: Any) -> dict[str, Any]:
    nofile = harness.raise_fd_limit()
    if cfg.clients + 200 > nofile:
        raise harness.BenchError(
            f"{cfg.clients} clients need more open files than this process may have ({nofile})"
        )
    started = time.time()
    streams = max(cfg.streams, 1)
    # jobs[i][q]: client i's q-th job (one user per client, as one phone scans one item after another)
    jobs = [
        [synthetic.job(run, i * streams + q, user=f"bench-{run}-{i}") for q in range(streams)]
        for i in range(cfg.clients)
    ]
    fan = Fanout(cfg)
    tasks: list[asyncio.Task[list[wire.Follow]]] = []
    series: list[dict[str, Any]] = []
    meter = CpuMeter()
    lag = LoopLag()
    own_gc = GcPauses()
    sampler: asyncio.Task[None] | None = None
    pids, every = server.pids, server.pids + server.helper_pids
    conns = server.redis_conns
    try:
        rss0 = _rss(pids)
        conns0 = await conns() if conns else None
        evs = [[synthetic.events(j) for j in mine] for mine in jobs]
        await server.prepare([mine[0] for mine in evs])
        quiet_gc()
        # No collection in the generator while it measures: with 2,000 clients' objects its young
        # collections (threshold 50,000) held its loop up 50-260 ms, and every one of them was
        # counted as the server's stall (issue 23). The run's garbage cycles wait for the end.
        gc.disable()
        own_gc.start()
        lag.start()
        sampler = asyncio.create_task(_sample(fan, tasks, server, meter, lag, series))

        say(
            f"fanout: connecting {cfg.clients:,} SSE clients to {server.name} (pids {pids}) "
            f"at {cfg.connect_rate:g}/s"
        )
        t_conn = time.monotonic()
        per_tick = max(int(cfg.connect_rate / 10), 1)
        for k in range(0, len(jobs), per_tick):
            for mine in jobs[k : k + per_tick]:
                tasks.append(asyncio.create_task(_client(server, mine, fan)))
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 60.0
        while (
            fan.streaming < cfg.clients and time.monotonic() < deadline and not all(t.done() for t in tasks)
        ):
            await asyncio.sleep(0.2)
        connect_s = time.monotonic() - t_conn
        await asyncio.sleep(1.0)  # let allocations settle before reading memory
        rss1 = _rss(pids)
        conns1 = await conns() if conns else None
        connected = fan.streaming
        say(
            f"fanout: {connected:,} streaming after {connect_s:.1f}s; {server.name} RSS {rss0 / 1024:.0f} -> "
            f"{rss1 / 1024:.0f} MiB, {conns1} Redis connections"
        )

        rate = cfg.events_per_s
        live = cfg.clients * streams * (EVENTS_PER_JOB - 1)
        say(
            f"fanout: applying {live:,} events at {rate:,.0f}/s"
            + (f", {streams} streams per client one after the other" if streams > 1 else "")
        )
        fan.publishing = True
        cpu_gw0, cpu_all0 = _cpu(pids), _cpu(every)
        gc0 = gc_pauses(await server.metrics()) if server.metrics else None
        redis0 = await server.redis_info() if server.redis_info else None
        wall_pub = time.time()
        t_pub = time.monotonic()
        sent = 0
        step = max(int(rate * 0.05), 1)  # events per Redis round trip: 20 round trips a second
        live_per_job = EVENTS_PER_JOB - 1
        # With churn, client i starts i % 9 rounds late, so a ninth of the clients end a stream in
        # every round (steady churn), not all of them in the same one (a thundering herd).
        offset = [i % live_per_job if streams > 1 else 0 for i in range(len(jobs))]
        for r in range(live_per_job * streams + max(offset)):
            due = [i for i in range(len(jobs)) if 0 <= r - offset[i] < live_per_job * streams]
            for j0 in range(0, len(due), step):
                batch: list[ScanEvent] = []
                now = time.time()
                for i in due[j0 : j0 + step]:
                    q, k = divmod(r - offset[i], live_per_job)
                    k += 1
                    if k == live_per_job and q + 1 < streams:
                        batch.append(evs[i][q + 1][0])  # the next scan is queued before this ends
                    e = evs[i][q][k]
                    e.ts = now
                    batch.append(e)
                await server.publish(batch)
                sent += len(due[j0 : j0 + step])  # live events only: rate is theirs
                ahead = t_pub + sent / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        publish_s = time.monotonic() - t_pub
        done, pending = await asyncio.wait(tasks, timeout=60.0)
        fan.publishing = False
        wall_end = time.time()
        redis1 = await server.redis_info() if server.redis_info else None
        opened = fan.streaming  # every stream's first event (or connect reply) counts it
        gw_cpu = _cpu(pids) - cpu_gw0
        all_cpu = _cpu(every) - cpu_all0
        rss2 = _rss(pids)
        gc1 = gc_pauses(await server.metrics()) if server.metrics else None
        peaks = [r["gateway_redis_conns"] for r in series if r.get("gateway_redis_conns") is not None]
        conns_peak = max([conns1, *peaks]) if conns1 is not None else None
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        own_gc.stop()
        gc.enable()
        if sampler is not None:
            sampler.cancel()
            await lag.stop()
            await asyncio.gather(sampler, return_exceptions=True)

    follows = [f for t in done if not t.cancelled() and t.exception() is None for f in t.result()]
    finished = [f for f in follows if f.terminal is not None]
    first = [] if server.history_on_connect else [1]  # the connect reply stands for seq 1
    checks = [check_seqs(first + f.seqs, None) for f in finished]
    errors = collections.Counter(f.error for f in follows if f.error)
    errors.update(
        type(t.exception()).__name__ for t in done if not t.cancelled() and t.exception() is not None
    )
    delivery = summary([x * 1000 for x in fan.delivery], 2)
    mem_per_conn = (rss1 - rss0) / connected if connected else None
    results = {
        "clients": cfg.clients,
        "connected": connected,
        "connect_s": round(connect_s, 1),
        "finished": len(finished),
        "unfinished": cfg.clients * streams - len(finished),
        "streams_per_client": streams,
        "streams_opened": opened,
        "streams_per_s": round(opened / publish_s, 1) if streams > 1 and publish_s > 0 else None,
        "gateway_cpu_ms_per_stream": round(1000 * gw_cpu / opened, 3) if streams > 1 and opened else None,
        "stalls_over_50ms": len(fan.stalls),
        "max_delivery_gap_ms": round(fan.max_gap * 1000, 1),
        "errors": dict(errors.most_common(5)),
        "events_applied": sent,
        "apply_rate_target": round(rate, 1),
        "apply_rate_achieved": round(sent / publish_s, 1) if publish_s > 0 else None,
        "events_received": fan.events,
        "delivery_ms": delivery,
        "lost": sum(c["lost"] for c in checks),
        "duplicated": sum(c["duplicated"] for c in checks),
        "out_of_order_clients": sum(c["out_of_order"] for c in checks),
        "reconnects": sum(f.reconnects for f in follows),
        "refusals": dict(collections.Counter(str(code) for f in follows for code, _ in f.refusals)),
        "server": server.name,
        "processes": len(pids),
        "gateway_rss_mib": {
            "before": round(rss0 / 1024, 1),
            "connected": round(rss1 / 1024, 1),
            "after": round(rss2 / 1024, 1),
        },
        "gateway_kib_per_connection": round(mem_per_conn, 1) if mem_per_conn is not None else None,
        "gateway_redis_connections": {"before": conns0, "connected": conns1, "peak": conns_peak},
        "gateway_cpu_s_while_publishing": round(gw_cpu, 2),
        "gateway_cpu_pct_while_publishing": round(100 * gw_cpu / max(publish_s, 1e-6), 1),
        # With what it needs beside it (the gateway's Redis; Centrifugo: nothing) per 1,000 events.
        "server_cpu_pct_while_publishing": round(100 * all_cpu / max(publish_s, 1e-6), 1),
        "server_cpu_ms_per_1000_events": round(1000 * 1000 * all_cpu / max(sent, 1), 1),
        # One gateway process's collections while publishing (several share the port: any one).
        "gateway_gc_pauses": _gc_delta(gc0, gc1),
        "generator_cpu": meter.total(),
        "generator_loop_lag_ms": lag.summary_ms(),
        "generator_gc_pauses_ms": own_gc.summary_ms(),
        # Redis's AOF rewrites while publishing (each a fork; INFO before and after).
        "redis": _redis_delta(redis0, redis1),
        "stalls": stall_causes(fan, lag, own_gc, read_rewrites(server.redis_log), (wall_pub, wall_end)),
    }
    p99 = delivery["p99"]
    bad = sum(c["lost"] + c["duplicated"] for c in checks)
    targets = [
        {
            "target": f"{TARGET_CLIENTS:,} SSE clients on one gateway",
            "goal": f">= {TARGET_CLIENTS:,} streaming",
            "measured": connected,
            "verdict": ("PASS" if connected >= TARGET_CLIENTS else "MISS")
            if cfg.clients >= TARGET_CLIENTS
            else "n/a",
        },
        {
            "target": "all clients served",
            "goal": f"{cfg.clients:,} streaming and {cfg.clients * streams:,} streams finished",
            "measured": f"{connected:,} / {len(finished):,}",
            "verdict": "PASS"
            if connected == cfg.clients and len(finished) == cfg.clients * streams
            else "MISS",
        },
        {
            "target": "delivery p99",
            "goal": f"<= {TARGET_P99_MS:g} ms",
            "measured": None if p99 is None else f"{p99:.1f} ms",
            "verdict": "n/a" if p99 is None else ("PASS" if p99 <= TARGET_P99_MS else "MISS"),
        },
        *(
            [
                {
                    "target": "no stall (an event waiting while no client received anything)",
                    "goal": f"<= {STALL_MS:g} ms",
                    "measured": f"{fan.max_gap * 1000:.1f} ms ({len(fan.stalls)} over)",
                    "verdict": "PASS" if not fan.stalls else "MISS",
                }
            ]
            if streams > 1
            else []
        ),
        {
            "target": "lost/duplicated events",
            "goal": "0",
            "measured": bad,
            "verdict": "PASS" if bad == 0 and finished else "MISS",
        },
    ]
    who = server.name if len(pids) == 1 else f"{len(pids)} {server.name} processes"
    churn = f", {streams} streams each, one after the other" if streams > 1 else ""
    return {
        "kind": "fanout",
        "name": cfg.name or f"fanout-{cfg.clients}",
        "title": f"SSE fan-out: {cfg.clients:,} clients{churn} on {who}",
        "description": __doc__,
        "started_at": started,
        "config": {**asdict(cfg), "events_per_s": round(rate, 1)},
        "machine": machine(),
        "results": results,
        "targets": targets,
        "series": series,
        "panels": [
            ("clients", [("open", "clients streaming"), ("right:streams_per_s", "streams opened/s")]),
            ("events/s", [("events_per_s", "events delivered")]),
            (
                "delivery",
                [
                    ("p99_ms", "delivery p99 (ms, 1 s)"),
                    ("p50_ms", "delivery p50 (ms, 1 s)"),
                    ("gen_loop_lag_ms", "generator loop lag max (ms)"),
                ],
            ),
            (
                "resources",
                [("gateway_rss_mib", "gateway RSS (MiB)"), ("right:gateway_cpu_pct", "gateway CPU %")],
            ),
            ("CPU % of a core", [("gen_cpu_pct", "load generator"), ("machine_cpu_pct", "whole box")]),
        ],
    }


def gc_pauses(metrics: str) -> dict[str, dict[str, float]]:
    """Per generation: collections, seconds in them, and how many took over STALL_MS (from the
    `eco2_gc_pause_seconds` histogram of runtime/metrics.py)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(metrics):
        if fam.name != GC_PAUSE:
            continue
        for sample in fam.samples:
            g = out.setdefault(
                sample.labels.get("generation", ""), {"count": 0.0, "seconds": 0.0, "over": 0.0}
            )
            if sample.name.endswith("_count"):
                g["count"] = sample.value
            elif sample.name.endswith("_sum"):
                g["seconds"] = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == STALL_MS / 1000:
                g["over"] = -sample.value  # count - (those <= STALL_MS), completed below
    for g in out.values():
        g["over"] += g["count"]
    return out


def _gc_delta(
    a: dict[str, dict[str, float]] | None, b: dict[str, dict[str, float]] | None
) -> dict[str, dict[str, float]] | None:
    if a is None or b is None:
        return None
    zero = {"count": 0.0, "seconds": 0.0, "over": 0.0}
    return {
        gen: {k: round(v - a.get(gen, zero)[k], 3) for k, v in vals.items()}
        for gen, vals in sorted(b.items())
    }


async def _client(server: Server, jobs: list[ScanJob], fan: Fanout) -> list[wire.Follow]:
    """One client: its jobs' streams one after the other, each opened once the last one ended."""
    follows: list[wire.Follow] = []
    for j in jobs:
        f = await server.follow(j, fan)
        follows.append(f)
        if f.terminal is None:
            break  # its error is reported; the rest of its jobs count as unfinished
    return follows


async def _sample(
    fan: Fanout,
    tasks: list[asyncio.Task[list[wire.Follow]]],
    server: Server,
    meter: CpuMeter,
    lag: LoopLag,
    series: list[dict[str, Any]],
) -> None:
    t0 = last_t = time.monotonic()
    lag_at = 0
    last_events = last_streams = 0
    last_cpu = _cpu(server.pids)
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        while fan.recent and fan.recent[0][0] < now - 1.0:
            fan.recent.popleft()
        lats = [x * 1000 for _, x in fan.recent]
        cpu = _cpu(server.pids)
        gen, box = meter.tick()
        lag_at, lag_max = lag.since(lag_at)
        rss = _rss(server.pids)
        series.append(
            {
                "t": round(now - t0, 1),
                "streaming": fan.streaming,
                "open": sum(1 for t in tasks if not t.done()),
                "streams_per_s": round((fan.streaming - last_streams) / max(now - last_t, 1e-3)),
                "events_per_s": round((fan.events - last_events) / max(now - last_t, 1e-3)),
                "p50_ms": _round(percentile(lats, 50)),
                "p99_ms": _round(percentile(lats, 99)),
                "gateway_rss_mib": round(rss / 1024, 1),
                # per second of the actual interval: a busy generator wakes up late
                "gateway_cpu_pct": round(100 * (cpu - last_cpu) / max(now - last_t, 1e-3), 1),
                "gateway_redis_conns": await server.redis_conns() if server.redis_conns else None,
                "gen_cpu_pct": gen,
                "gen_loop_lag_ms": lag_max,
                "machine_cpu_pct": box,
            }
        )
        last_events, last_cpu, last_streams, last_t = fan.events, cpu, fan.streaming, now


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
