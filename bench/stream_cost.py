"""Gateway CPU for one SSE stream's whole life: open, replay a finished job's 10 events, close.

`python -m bench.stream_cost [--streams N] [--rounds R]`: N finished jobs taken from Redis, each
followed once to its terminal event over one keep-alive connection (what an app does for every
scan: a new stream per job, closed after the last event). A gateway's process CPU over the N
streams / N is the cost of one stream's open and close plus its 10 events.

Two gateways are measured, in alternating rounds after the same warm-up:
- `production`: a gateway process of the benchmark's own, on the stack's Redis, with the
  product's stream leases (`streams_max` as contract/settings.py has it, not the local stack's 0):
  every open takes a lease and every close gives it back, as in deploy/;
- `stack`: the stack's gateway, as `eco2 stack up` runs it (no leases unless the checkout sets
  ECO2_STREAMS_MAX).
When Redis holds fewer finished jobs than N, the jobs are streamed again in turn (each stream
reads and parses its job's history again: nothing is cached across streams).
Not part of `make test`; seconds to run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import redis.asyncio as aioredis

from contract import keys
from contract.settings import Settings, get_settings

from . import harness
from .load import EXPECTED_SEQS
from .stats import tree_cpu_s

LEASE_FIELDS = ("streams_max", "stream_lease_s")


async def finished_jobs(redis_url: str, n: int) -> list[tuple[str, str]]:
    """(job_id, user_id) of up to n completed jobs with their whole history (tests leave synthetic
    jobs with gaps in Redis, whose streams wait out the gap)."""
    r = aioredis.from_url(redis_url, decode_responses=True)
    out: list[tuple[str, str]] = []
    try:
        async for key in r.scan_iter(match=keys.state("*"), count=1000):
            user, stage = await r.hmget(key, ["user_id", "stage"])  # type: ignore[misc]
            if (
                stage == "done"
                and user
                and await r.zcard(keys.history(key.rsplit(":", 1)[1])) == len(EXPECTED_SEQS)
            ):
                out.append((key.rsplit(":", 1)[1], str(user)))
                if len(out) >= n:
                    break
    finally:
        await r.aclose()
    return out


def production_env(port: int) -> dict[str, str]:
    """A gateway with the product's stream leases (contract/settings.py's defaults), one process."""
    env = {f"ECO2_{f.upper()}": str(Settings.model_fields[f].default) for f in LEASE_FIELDS}
    return {**env, "ECO2_GATEWAY_PORT": str(port), "ECO2_GATEWAY_PROCESSES": "1"}


@contextlib.asynccontextmanager
async def production_gateway(s: Settings) -> AsyncIterator[tuple[str, int]]:
    """The benchmark's own gateway with leases on: yields (base url, pid)."""
    port = harness.free_port()
    proc = harness.python_proc(s, "stream-cost-gateway", ["gateway"], production_env(port))
    proc.start()
    try:
        url = f"http://{s.gateway_host}:{port}"
        await harness.wait_http(f"{url}/ready", proc)
        yield url, proc.pid
    finally:
        proc.stop()


async def follow(base_url: str, jobs: list[tuple[str, str]]) -> int:
    """Each job's stream to its end, one after another on one connection; the events read."""
    events = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        for job_id, user in jobs:
            async with http.stream(
                "GET", f"/api/v1/scan/{job_id}/events", headers={"X-User-ID": user}
            ) as resp:
                if resp.status_code != 200:
                    raise SystemExit(f"stream of {job_id}: HTTP {resp.status_code}")
                async for line in resp.aiter_lines():
                    events += line.startswith("data:")
    return events


async def measure(base_url: str, pid: int, jobs: list[tuple[str, str]]) -> dict[str, float]:
    cpu0, t0 = tree_cpu_s([pid]).get(pid, 0.0), time.perf_counter()
    events = await follow(base_url, jobs)
    wall = time.perf_counter() - t0
    cpu = tree_cpu_s([pid]).get(pid, 0.0) - cpu0
    return {
        "cpu_ms": round(1000 * cpu / len(jobs), 3),
        "wall_ms": round(1000 * wall / len(jobs), 2),
        "events_per_stream": round(events / len(jobs), 2),
    }


async def run(streams: int, rounds: int = 3, warmup: int = 100, which: str = "both") -> dict[str, Any]:
    s = get_settings()
    found = await finished_jobs(s.redis_url, streams)
    if not found:
        raise SystemExit("no finished jobs in Redis: run a scan or a load test first")
    jobs = list(itertools.islice(itertools.cycle(found), streams))
    targets: dict[str, tuple[str, int]] = {}
    leases: dict[str, bool] = {"production": True}
    async with contextlib.AsyncExitStack() as stack:
        if which in ("both", "production"):
            targets["production"] = await stack.enter_async_context(production_gateway(s))
        if which in ("both", "stack"):
            pid = harness.service_pids(s)["gateway"]
            targets["stack"] = (s.gateway_url, pid)
            env = harness.service_env({"gateway": pid}).get("gateway", {})
            leases["stack"] = int(env.get("ECO2_STREAMS_MAX", s.streams_max)) > 0
        for url, _ in targets.values():
            await follow(url, jobs[:warmup])  # lazy imports, script loads, pools filled
        per: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (url, pid) in targets.items():
                per[name].append(await measure(url, pid, jobs))
    out: dict[str, Any] = {
        "streams": streams,
        "distinct_jobs": len(found),
        "rounds": rounds,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for name, results in per.items():
        cpu = [r["cpu_ms"] for r in results]
        out[name] = {
            "leases": leases[name],
            "gateway_cpu_ms_per_stream": round(statistics.median(cpu), 3),
            "rounds_cpu_ms": cpu,
            "wall_ms_per_stream": statistics.median(r["wall_ms"] for r in results),
            "events_per_stream": results[-1]["events_per_stream"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_cost")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=100, help="streams per gateway before measuring")
    parser.add_argument(
        "--gateway",
        choices=["both", "production", "stack"],
        default="both",
        help="production: the benchmark's own gateway with stream leases; stack: the stack's",
    )
    a = parser.parse_args()
    print(json.dumps(asyncio.run(run(a.streams, a.rounds, a.warmup, a.gateway))))


if __name__ == "__main__":
    main()
