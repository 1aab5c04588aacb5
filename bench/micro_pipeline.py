"""Pipeline throughput with a zero-latency model: how many jobs/s the stack itself moves.

N jobs are submitted as fast as `concurrency` clients can POST them; the benchmark then watches
until every job is terminal in Redis (its state has a result: stages, router) and stored in
Postgres (a row in `scans`: the writer). With the model answering at once, the rate is what the
API, Kafka, the stage workers, the router and the writer cost on this box. The model's latency is
restored afterwards; the jobs stay in Redis and Postgres as any scan would (users `bench-pipe-*`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

import asyncpg
import redis.asyncio as aioredis

from contract import keys
from contract.settings import Settings

from . import harness, synthetic, wire
from .load import image_url
from .stats import CpuMeter, machine, summary


@dataclass
class PipelineConfig:
    jobs: int = 2000
    concurrency: int = 50  # POSTs in flight
    postgres: bool = True
    timeout_s: float = 300.0
    name: str = ""


class Watch:
    """Pending job ids, checked against Redis and Postgres until they are all done."""

    def __init__(self) -> None:
        self.submitted: dict[str, float] = {}  # job_id -> monotonic submit time
        self.redis_done: dict[str, float] = {}
        self.pg_done: dict[str, float] = {}
        self.submitting = True


async def _watch_redis(client: aioredis.Redis, w: Watch) -> None:
    while True:
        pending = [j for j in w.submitted if j not in w.redis_done]
        if not pending and not w.submitting:
            return
        for k in range(0, len(pending), 1000):
            part = pending[k : k + 1000]
            pipe = client.pipeline(transaction=False)
            for j in part:
                pipe.hexists(keys.state(j), "result")
            now = time.monotonic()
            for j, ok in zip(part, await pipe.execute(), strict=True):
                if ok:
                    w.redis_done[j] = now
        await asyncio.sleep(0.2)


async def _watch_postgres(s: Settings, w: Watch) -> None:
    conn = await asyncpg.connect(s.postgres_dsn)
    try:
        while True:
            pending = [j for j in w.submitted if j not in w.pg_done]
            if not pending and not w.submitting:
                return
            if pending:
                rows = await conn.fetch("SELECT job_id FROM scans WHERE job_id = ANY($1::text[])", pending)
                now = time.monotonic()
                for r in rows:
                    w.pg_done[r["job_id"]] = now
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def run_pipeline(s: Settings, cfg: PipelineConfig, say: Any = print) -> dict[str, Any]:
    needed = ["api", "workers", "model", "router"] + (["writer", "postgres"] if cfg.postgres else [])
    await harness.require(s, needed)
    pids = harness.service_pids(s)
    run = synthetic.run_id()
    api = urlparse(s.api_url)
    host, port = api.hostname or "127.0.0.1", api.port or 80
    w = Watch()
    post_lat: list[float] = []
    errors: dict[str, int] = {}
    series: list[dict[str, Any]] = []
    meter = CpuMeter()
    next_n = 0

    async def submitter(i: int) -> None:
        nonlocal next_n
        conn = wire.Connection(host, port)
        user = f"bench-pipe-{run}-{i}"
        try:
            while next_n < cfg.jobs:
                n = next_n
                next_n += 1
                body = json.dumps({"image_url": image_url(i, n)}).encode()
                t = time.monotonic()
                try:
                    r = await conn.request(
                        "POST", "/api/v1/scan", {"X-User-ID": user, "Content-Type": "application/json"}, body
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                if r.status != 202:
                    errors[f"HTTP {r.status}"] = errors.get(f"HTTP {r.status}", 0) + 1
                    continue
                post_lat.append(time.monotonic() - t)
                w.submitted[r.json()["job_id"]] = t
        finally:
            conn.close()

    async def sample(t0: float) -> None:
        while True:
            await asyncio.sleep(0.5)
            gen, box = meter.tick()
            series.append(
                {
                    "t": round(time.monotonic() - t0, 1),
                    "submitted": len(w.submitted),
                    "terminal_redis": len(w.redis_done),
                    "stored_postgres": len(w.pg_done),
                    "gen_cpu_pct": gen,
                    "machine_cpu_pct": box,
                }
            )

    started = time.time()
    client = aioredis.from_url(s.redis_url)
    cpu = harness.ServiceCpu(pids)
    async with harness.model_latency(s, (0.0, 0.0)):
        say(f"pipeline: submitting {cfg.jobs:,} jobs ({cfg.concurrency} at a time), zero-latency model")
        t0 = time.monotonic()
        sampler = asyncio.create_task(sample(t0))
        watchers = [asyncio.create_task(_watch_redis(client, w))]
        if cfg.postgres:
            watchers.append(asyncio.create_task(_watch_postgres(s, w)))
        try:
            await asyncio.gather(*(submitter(i) for i in range(cfg.concurrency)))
            submit_s = time.monotonic() - t0
            w.submitting = False
            say(
                f"pipeline: {len(w.submitted):,} submitted in {submit_s:.1f}s; waiting for Redis"
                + (" and Postgres" if cfg.postgres else "")
            )
            done, _ = await asyncio.wait(watchers, timeout=cfg.timeout_s)
            for t in done:
                t.result()  # surface a watcher's error
        finally:
            for t in [*watchers, sampler]:
                t.cancel()
            await asyncio.gather(*watchers, sampler, return_exceptions=True)
        services = cpu.result()
    statuses: list[Any] = []
    ids = list(w.submitted)
    for k in range(0, len(ids), 1000):
        pipe = client.pipeline(transaction=False)
        for j in ids[k : k + 1000]:
            pipe.hget(keys.state(j), "status")
        statuses += await pipe.execute()
    await client.aclose()

    n = len(w.submitted)

    def stage(done: dict[str, float]) -> dict[str, Any]:
        if not done:
            return {
                "jobs": 0,
                "all_done": False,
                "seconds": None,
                "jobs_per_s": None,
                "latency_s": summary([]),
            }
        last = max(done.values())
        return {
            "jobs": len(done),
            "all_done": len(done) == n,
            "seconds": round(last - t0, 2),
            "jobs_per_s": round(len(done) / (last - t0), 1),
            "latency_s": summary([done[j] - w.submitted[j] for j in done], 3),
        }

    results: dict[str, Any] = {
        "jobs": cfg.jobs,
        "submitted": n,
        "submit_errors": errors,
        "submit_s": round(submit_s, 2),
        "submit_jobs_per_s": round(n / submit_s, 1) if submit_s > 0 else None,
        "scan_api_ms": summary([x * 1000 for x in post_lat], 2),
        "redis_terminal": stage(w.redis_done),
        "failed_jobs": sum(1 for x in statuses if x in (b"failed", "failed")),
        "generator_cpu": meter.total(),
    }
    if cfg.postgres:
        results["postgres_stored"] = stage(w.pg_done)
    return {
        "kind": "pipeline",
        "name": cfg.name or f"pipeline-{cfg.jobs}",
        "title": f"Pipeline throughput, zero-latency model ({cfg.jobs:,} jobs)",
        "description": __doc__,
        "started_at": started,
        "config": asdict(cfg),
        "machine": machine(),
        "services_env": harness.service_env(pids),
        "results": results,
        "services_cpu": services,
        "cpu_per_job": harness.cpu_per_job(services, len(w.pg_done if cfg.postgres else w.redis_done)),
        "targets": [],
        "series": series,
        "panels": [
            (
                "jobs",
                [
                    ("submitted", "submitted"),
                    ("terminal_redis", "terminal in Redis"),
                    ("stored_postgres", "stored in Postgres"),
                ],
            ),
            ("CPU % of a core", [("gen_cpu_pct", "load generator"), ("machine_cpu_pct", "whole box")]),
        ],
    }
