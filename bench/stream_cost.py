"""Gateway CPU for one SSE stream's whole life: open, replay a finished job's 10 events, close.

`python -m bench.stream_cost [--streams N]` against the stack's gateway: N finished jobs taken
from Redis, each followed once to its terminal event over one keep-alive connection (what an app
does for every scan: a new stream per job, closed after the last event). The gateway's process
CPU over the N streams / N is the cost of one stream's open and close plus its 10 events.
Not part of `make test`; seconds to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx
import redis.asyncio as aioredis

from contract import keys
from contract.settings import get_settings

from . import harness
from .load import EXPECTED_SEQS
from .stats import tree_cpu_s


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


async def run(streams: int) -> dict[str, float]:
    s = get_settings()
    pid = harness.service_pids(s)["gateway"]
    jobs = await finished_jobs(s.redis_url, streams)
    if not jobs:
        raise SystemExit("no finished jobs in Redis: run a scan or a load test first")
    events = 0
    async with httpx.AsyncClient(base_url=s.gateway_url, timeout=30) as http:
        cpu0, t0 = tree_cpu_s([pid]).get(pid, 0.0), time.perf_counter()
        for job_id, user in jobs:
            async with http.stream(
                "GET", f"/api/v1/scan/{job_id}/events", headers={"X-User-ID": user}
            ) as resp:
                async for line in resp.aiter_lines():
                    events += line.startswith("data:")
        wall = time.perf_counter() - t0
        cpu = tree_cpu_s([pid]).get(pid, 0.0) - cpu0
    return {
        "streams": len(jobs),
        "events": events,
        "gateway_cpu_ms_per_stream": round(1000 * cpu / len(jobs), 3),
        "wall_ms_per_stream": round(1000 * wall / len(jobs), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_cost")
    parser.add_argument("--streams", type=int, default=500)
    print(json.dumps(asyncio.run(run(parser.parse_args().streams))))


if __name__ == "__main__":
    main()
