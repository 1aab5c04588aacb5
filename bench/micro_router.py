"""Router events/s, two ways.

- direct: the router's per-event work without Kafka (parse the record's JSON into a ScanEvent, then
  `StateStore.apply` batches of `router_batch_max`, one round trip at a time as the agent does)
  against a private redis-server configured as the stack's. It bounds what one router process can do.
- lag drain: a private router process (`python -m streams router`, own consumer group committed at
  the log's end, a private redis-server) started on a backlog of M synthetic events produced to scan.events;
  the rate at which its applied-events counter climbs is the real router's throughput, Faust and
  Kafka fetches included. The stack's own router also routes the synthetic events (they are on the
  shared topic): the benchmark waits for it to finish first so the two never share the CPU, and
  removes the synthetic jobs from the stack's Redis afterwards. Synthetic jobs get no terminal event, so
  the Postgres writer ignores them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import redis.asyncio as aioredis

from contract.events import ScanEvent
from contract.settings import Settings
from contract.topics import ROUTER_GROUP
from view import StateStore

from . import harness, synthetic
from .stats import machine, self_cpu_s, tree_cpu_s

TARGET_EVENTS_PER_S = 10_000


@dataclass
class RouterConfig:
    events: int = 100_000
    batch: int = 0  # 0 = the router's setting (router_batch_max)
    lag_drain: bool = True
    timeout_s: float = 300.0
    name: str = ""


def _interleaved(evs_by_job: list[list[ScanEvent]]) -> list[ScanEvent]:
    """Stage-major order (every job's first event, then every job's second...), so batches mix
    many jobs as the live topic does."""
    out: list[ScanEvent] = []
    for k in range(max(len(e) for e in evs_by_job)):
        out.extend(e[k] for e in evs_by_job if k < len(e))
    return out


async def direct(s: Settings, cfg: RouterConfig, run: str, redis_url: str, redis_pid: int) -> dict[str, Any]:
    batch = cfg.batch or s.router_batch_max
    jobs = [synthetic.job(run, n) for n in range(max(cfg.events // 10, 1))]
    raws = [ev.model_dump_json().encode() for ev in _interleaved([synthetic.events(j) for j in jobs])]
    client = aioredis.from_url(redis_url)
    store = StateStore(client, s.state_ttl_s)

    async def apply_all() -> tuple[float, float, float, int]:
        redis0 = tree_cpu_s([redis_pid]).get(redis_pid, 0.0)
        cpu0, t0 = self_cpu_s(), time.perf_counter()
        fresh = 0
        for k in range(0, len(raws), batch):
            evs = [ScanEvent.model_validate_json(r) for r in raws[k : k + batch]]
            fresh += sum(await store.apply(evs))
        dt = time.perf_counter() - t0
        redis1 = tree_cpu_s([redis_pid]).get(redis_pid, 0.0)
        return dt, self_cpu_s() - cpu0, redis1 - redis0, fresh

    try:
        dt, cpu, redis_cpu, fresh = await apply_all()
        rdt, _, _, refresh = await apply_all()  # a replay: every event is a duplicate now
    finally:
        await client.aclose()
    n = len(raws)
    return {
        "events": n,
        "batch": batch,
        "seconds": round(dt, 3),
        "events_per_s": round(n / dt, 1),
        "new_events": fresh,
        "python_cpu_s": round(cpu, 2),
        "redis_cpu_s": round(redis_cpu, 2),
        "replay_events_per_s": round(n / rdt, 1),
        "replay_new_events": refresh,
    }


def _routed(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("eco2_router_events_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _wait_lag(s: Settings, group: str, timeout_s: float) -> tuple[int, float]:
    t0 = time.monotonic()
    while True:
        lag = await synthetic.group_lag(s, group)
        if lag == 0 or time.monotonic() - t0 > timeout_s:
            return lag, time.monotonic() - t0
        await asyncio.sleep(0.5)


async def lag_drain(s: Settings, cfg: RouterConfig, run: str, redis_url: str, say: Any) -> dict[str, Any]:
    group = f"eco2-bench-router-{run}"
    await synthetic.commit_at_end(s, group)
    jobs = [synthetic.job(run, n) for n in range(max(cfg.events // 9, 1))]
    evs = _interleaved([synthetic.events(j, terminal=False) for j in jobs])
    say(f"router lag drain: producing {len(evs):,} synthetic events to scan.events")
    produce_s = await synthetic.produce(s, evs)
    say("router lag drain: waiting for the stack's router to route them too (so it is idle later)")
    stack_lag, stack_wait_s = await _wait_lag(s, ROUTER_GROUP, cfg.timeout_s)

    port = harness.free_port()
    proc = harness.python_proc(
        s,
        f"router-{run}",
        ["streams", "router"],
        {
            "ECO2_ROUTER_GROUP": group,
            "ECO2_REDIS_URL": redis_url,
            "ECO2_METRICS_PORT": str(port),
        },
    ).start()
    samples: list[dict[str, float]] = []
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        await harness.wait_http(url, proc)
        say(f"router lag drain: private router pid {proc.pid} consuming the backlog")
        cpu0 = tree_cpu_s([proc.pid]).get(proc.pid, 0.0)
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                routed = _routed((await http.get(url)).text)
                samples.append({"t": round(time.monotonic() - t0, 2), "routed": routed})
                if routed >= len(evs) or time.monotonic() - t0 > cfg.timeout_s:
                    break
                if not proc.alive():
                    raise harness.BenchError(f"private router exited:\n{proc.tail()}")
                await asyncio.sleep(0.2)
        cpu = tree_cpu_s([proc.pid]).get(proc.pid, 0.0) - cpu0
        lag, _ = await _wait_lag(s, group, 30.0)
    finally:
        proc.stop()
        client = aioredis.from_url(s.redis_url)  # what the stack's router made of them
        try:
            await synthetic.delete_jobs(client, [j.job_id for j in jobs])
        finally:
            await client.aclose()
    started = next((x for x in samples if x["routed"] > 0), None)
    end = samples[-1]
    rate = None
    if started is not None and end["t"] > started["t"]:
        rate = round((end["routed"] - started["routed"]) / (end["t"] - started["t"]), 1)
    return {
        "events": len(evs),
        "produce_s": round(produce_s, 2),
        "stack_router_caught_up_s": round(stack_wait_s, 1),
        "stack_router_lag_left": stack_lag,
        "routed": int(end["routed"]),
        "events_per_s": rate,
        "router_cpu_s": round(cpu, 2),
        "events_per_cpu_s": round(end["routed"] / cpu, 1) if cpu > 0 else None,
        "group_lag_after": lag,
        "series": samples,
    }


async def run_router(s: Settings, cfg: RouterConfig, say: Any = print) -> dict[str, Any]:
    await harness.require(s, ["kafka", "redis"])
    pids = harness.service_pids(s)
    run = synthetic.run_id()
    started = time.time()
    cpu = harness.ServiceCpu(pids)
    say(f"router direct: {cfg.events:,} events through StateStore.apply")
    results: dict[str, Any] = {}
    series: list[dict[str, float]] = []
    async with harness.private_redis(s) as (url, redis_proc):
        d = await direct(s, cfg, run, url, redis_proc.pid)
        say(f"router direct: {d['events_per_s']:,.0f} events/s")
        results["direct"] = d
    if cfg.lag_drain:
        async with harness.private_redis(s) as (url, _):
            lag = await lag_drain(s, cfg, run, url, say)
        series = lag.pop("series")
        results["lag_drain"] = lag
        say(f"router lag drain: {lag['events_per_s'] or 0:,.0f} events/s")
    best = results.get("lag_drain", {}).get("events_per_s") or None
    targets = [
        _target("router events/s (lag drain, real router)", best),
        _target("router events/s (direct, StateStore.apply)", d["events_per_s"]),
    ]
    rows: list[dict[str, float | None]] = [{**x, "events_per_s": None} for x in series]
    for a, b in zip(rows, rows[1:], strict=False):  # per-sample rate for the plot
        dt = max(float(b["t"] or 0) - float(a["t"] or 0), 1e-6)
        b["events_per_s"] = round((float(b["routed"] or 0) - float(a["routed"] or 0)) / dt, 1)
    return {
        "kind": "router",
        "name": cfg.name or "router",
        "title": "Router events/s",
        "description": __doc__,
        "started_at": started,
        "config": asdict(cfg),
        "machine": machine(),
        "results": results,
        "services_cpu": cpu.result(),
        "targets": targets,
        "series": rows,
        "panels": [
            ("events", [("routed", "events routed (private router)")]),
            ("events/s", [("events_per_s", "rate")]),
        ],
    }


def _target(name: str, measured: float | None) -> dict[str, Any]:
    verdict = "n/a" if measured is None else ("PASS" if measured >= TARGET_EVENTS_PER_S else "MISS")
    return {
        "target": name,
        "goal": f">= {TARGET_EVENTS_PER_S:,} events/s",
        "measured": None if measured is None else f"{measured:,.0f} events/s",
        "verdict": verdict,
    }
