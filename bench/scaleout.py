"""Scale-out: throughput at 1, 2 and 3 stage-worker processes with each process capped at a fixed
concurrency (so the process count, not the model, limits throughput), the time a new process
needs to take its share, and events/s and SSE delivery through two routers and two gateways.

Runs on a private production-shaped stack (bench/cluster.py: three Kafka nodes, own ports and
data), so the shared stack is not disturbed. Each step offers the same burst of jobs, every one
followed over SSE; throughput = jobs finished per second between the first and the last job's end
seen over SSE (the steady state, without the pipeline's fill).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from contract.events import PIPELINE
from contract.settings import Settings
from contract.topics import stage_group

from . import harness
from .cluster import (
    COMPLETED_SEQS,
    PrivateStack,
    conflicting_results,
    events_by_job,
    group_timeline,
    scan_load,
    settled_after,
    terminal_rows,
)
from .stats import machine, summary

EVENTS_PER_JOB = len(COMPLETED_SEQS)


@dataclass
class ScaleoutConfig:
    processes: int = 3  # measure 1..processes worker processes
    concurrency: int = 2  # jobs in flight per stage per worker process (ECO2_STAGE_CONCURRENCY)
    model_latency_s: float = 1.0  # fixed simulated model latency per call (two calls per job)
    jobs: int = 96  # the burst offered at every step (8 per stage partition)
    rate: float = 40.0  # POSTs per second of the burst
    kafka_nodes: int = 3
    routers: int = 2
    gateways: int = 2
    name: str = ""


def _services_pids(stack: PrivateStack) -> dict[str, int]:
    out = {}
    for f in (stack.local_dir / "run").glob("*.pid"):
        try:
            out[f.stem] = int(f.read_text().split()[0])
        except ValueError:
            continue
    return out


async def _step(stack: PrivateStack, s: Settings, cfg: ScaleoutConfig, workers: int) -> dict[str, Any]:
    pids = _services_pids(stack)
    cpu = harness.ServiceCpu({k: v for k, v in pids.items() if k.startswith("workers")})
    serving = harness.ServiceCpu(
        {k: v for k, v in pids.items() if k.startswith(("router", "gateway", "api"))}
    )
    r = await scan_load(s, cfg.jobs, cfg.rate, follow_every=1, tag=f"scale{workers}-{int(time.time())}")
    serving_cpu = serving.result()
    rows = await terminal_rows(s, list(r.accepted), 120)
    events = await events_by_job(s, set(r.accepted))
    ends = sorted(r.finished.values())
    # Steady state: jobs finished between the first and the last end (no pipeline fill).
    span = ends[-1] - ends[0] if len(ends) > 1 else 0.0
    by_seq = {seq: [d for q, d in r.delivery_s if q == seq] for seq in COMPLETED_SEQS}
    wrong = sum(1 for seqs in r.streams.values() if seqs != COMPLETED_SEQS)
    workers_cpu = cpu.result()
    cpu_s = sum(float(v["cpu_s"] or 0) for v in workers_cpu.values())
    return {
        "workers": workers,
        "accepted": len(r.accepted),
        "post_errors": len(r.errors),
        "stored": len(rows),
        "seconds_first_to_last_end": round(span, 2),
        "jobs_per_s": round((len(ends) - 1) / span, 2) if span else None,
        "ceiling_jobs_per_s": round(workers * cfg.concurrency / cfg.model_latency_s, 2),
        "events_per_s": round((len(ends) - 1) * EVENTS_PER_JOB / span, 1) if span else None,
        "sse_streams_exact": len(r.streams) - wrong,
        "sse_stream_errors": len(r.stream_errors),
        "sse_delivery_ms": summary([d * 1000 for _, d in r.delivery_s], 1),
        "sse_delivery_p95_ms_by_seq": {
            str(seq): summary([d * 1000 for d in ds], 1)["p95"] for seq, ds in by_seq.items()
        },
        "serving_cpu_s": {k: v["cpu_s"] for k, v in serving_cpu.items()},
        "conflicting_results": len(conflicting_results(events)),
        "workers_cpu_s": round(cpu_s, 2),
        "workers_cpu_ms_per_job": round(1000 * cpu_s / max(1, len(r.finished)), 1),
    }


async def run_scaleout(shared: Settings, cfg: ScaleoutConfig, say: Any = print) -> dict[str, Any]:
    started = time.time()
    stack = PrivateStack.create(
        shared,
        ECO2_KAFKA_NODES=cfg.kafka_nodes,
        ECO2_KAFKA_HEAP="384m",
        ECO2_WORKER_PROCESSES=1,
        ECO2_ROUTER_PROCESSES=cfg.routers,
        ECO2_GATEWAY_PROCESSES=cfg.gateways,
        ECO2_STAGE_CONCURRENCY=cfg.concurrency,
        ECO2_SIM_LATENCY_MIN_S=cfg.model_latency_s,
        ECO2_SIM_LATENCY_MAX_S=cfg.model_latency_s,
    )
    steps: list[dict[str, Any]] = []
    joins: list[dict[str, Any]] = []
    s = stack.settings
    try:
        say(f"scaleout: starting a private stack in {stack.local_dir}")
        await asyncio.to_thread(stack.up)
        for n in range(1, cfg.processes + 1):
            if n > 1:
                timeline: list[tuple[float, str, int]] = []
                stop = asyncio.Event()
                sampler = asyncio.create_task(
                    group_timeline(s, stage_group(list(PIPELINE)), stop, out=timeline)
                )
                t_add = time.monotonic()
                await asyncio.to_thread(stack.up, f"workers-{n}", ECO2_WORKER_PROCESSES=n)
                ready = time.monotonic() - t_add
                deadline = time.monotonic() + 90
                while settled_after(timeline, t_add, n) is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                stop.set()
                await sampler
                share = settled_after(timeline, t_add, n)
                joins.append(
                    {
                        "workers": n,
                        "process_ready_s": round(ready, 2),
                        "owns_its_share_s": round(share, 2) if share is not None else None,
                    }
                )
                say(f"scaleout: worker {n} ready after {ready:.1f}s, owns its partitions after {share}s")
            step = await _step(stack, s, cfg, n)
            steps.append(step)
            say(
                f"scaleout: {n} worker(s): {step['jobs_per_s']} jobs/s (ceiling {step['ceiling_jobs_per_s']})"
            )
    finally:
        await asyncio.to_thread(stack.down)
    return {
        "kind": "scaleout",
        "name": cfg.name or f"scaleout-{cfg.processes}w-c{cfg.concurrency}",
        "title": "Scale-out: stage-worker processes at a fixed per-process concurrency",
        "description": __doc__,
        "started_at": started,
        "config": asdict(cfg),
        "machine": machine(),
        "results": {
            "steps": {str(x["workers"]): x for x in steps},
            "joins": {str(j["workers"]): j for j in joins},
        },
        "targets": [],
        "series": [{"t": x["workers"], **x} for x in steps],
        "panels": [
            (
                "jobs/s",
                [("jobs_per_s", "measured"), ("ceiling_jobs_per_s", "processes x concurrency / latency")],
            ),
            ("events/s", [("events_per_s", "events through 2 routers / 2 gateways")]),
        ],
    }
