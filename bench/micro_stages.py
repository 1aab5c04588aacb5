"""CPU of the stage engine per job, in one process: `Pipeline.handle` through every stage.

`python -m bench.micro_stages --jobs 400 --concurrency 20` drives each job through vision, rule,
answer and reward as a worker would (the real agents, the real model client against the stack's
model stand-in set to zero latency, the stack's Redis for the memo), with the Kafka sends
recorded instead of produced. It prints the process CPU per job and counts the pydantic parses
and dumps per job: what the engine itself costs, without Faust, Kafka or a crowded box's other
processes (issue 19).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from contract.events import PIPELINE, ScanJob, now
from contract.settings import get_settings
from contract.topics import STAGE_TOPICS
from streams import registry
from streams.app import create_app
from streams.stages import Pipeline

COUNTS: collections.Counter[str] = collections.Counter()


def count_pydantic() -> None:
    """Count BaseModel's parse/dump entry points (only for the counting pass: it slows them)."""
    for name in ("model_dump", "model_dump_json", "__init__", "model_copy"):
        original = getattr(BaseModel, name)

        def method(self: Any, *a: Any, __o: Any = original, __n: str = name, **k: Any) -> Any:
            COUNTS[__n] += 1
            return __o(self, *a, **k)

        setattr(BaseModel, name, method)
    for name in ("model_validate", "model_validate_json", "model_construct"):
        func = BaseModel.__dict__[name].__func__

        def cm(cls: Any, *a: Any, __o: Any = func, __n: str = name, **k: Any) -> Any:
            COUNTS[__n] += 1
            return __o(cls, *a, **k)

        setattr(BaseModel, name, classmethod(cm))


async def run(jobs: int, concurrency: int, count: bool, freeze: bool = False) -> dict[str, Any]:
    s = get_settings()
    registry.load()
    p = Pipeline(create_app(f"micro-stages-{uuid.uuid4().hex[:6]}", s.model_copy(
        update={"local_dir": Path("/tmp/micro-stages")})), s)
    sends: collections.Counter[str] = collections.Counter()
    nxt: dict[str, bytes] = {}

    async def send(name: str, job_id: str, value: str, traceparent: str) -> None:
        sends[name] += 1
        if name in STAGE_TOPICS.values():
            nxt[job_id] = value.encode()

    p._send = send  # type: ignore[method-assign]

    async def one() -> None:
        job = ScanJob(job_id=f"micro-{uuid.uuid4().hex[:12]}", user_id="u-micro",
                      image_url="https://example.com/bottle.jpg", created_at=now())
        raw = job.model_dump_json().encode()
        for stage in PIPELINE:
            await p.handle(stage, raw, [])
            raw = nxt.pop(job.job_id, b"")

    sem = asyncio.Semaphore(concurrency)

    async def bounded() -> None:
        async with sem:
            await one()

    await asyncio.gather(*(bounded() for _ in range(min(50, jobs))))  # warm-up: connections
    if count:
        count_pydantic()
    COUNTS.clear()
    sends.clear()
    gc.collect()
    if freeze:
        gc.freeze()
    in_gc = {"s": 0.0, "t": 0.0, "n": 0}

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            in_gc["t"] = time.process_time()
        else:
            in_gc["s"] += time.process_time() - in_gc["t"]
            in_gc["n"] += 1

    gc.callbacks.append(timed)
    c0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(bounded() for _ in range(jobs)))
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    gc.callbacks.remove(timed)
    await p.redis.aclose()
    return {
        "jobs": jobs,
        "cpu_ms_per_job": round(1000 * cpu / jobs, 3),
        "wall_s": round(wall, 2),
        "gc_ms_per_job": round(1000 * in_gc["s"] / jobs, 3),
        "gc_collections": in_gc["n"],
        "sends_per_job": {k: v / jobs for k, v in sends.items()},
        "pydantic_per_job": {k: v / jobs for k, v in COUNTS.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--count", action="store_true", help="count pydantic calls (slower)")
    ap.add_argument("--freeze", action="store_true", help="gc.freeze() after the warm-up")
    args = ap.parse_args()
    s = get_settings()
    base = f"http://{s.model_host}:{s.model_port}"
    before = httpx.get(f"{base}/admin/latency").json()
    httpx.put(f"{base}/admin/latency", json={"min_s": 0, "max_s": 0}).raise_for_status()
    try:
        print(json.dumps(asyncio.run(run(args.jobs, args.concurrency, args.count, args.freeze)), indent=1))
    finally:
        httpx.put(f"{base}/admin/latency", json=before).raise_for_status()


if __name__ == "__main__":
    main()
