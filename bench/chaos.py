"""`eco2 chaos`: the load test's SSE scenario while, on a timeline, every component is killed.

VUs post scans and follow each job's stream with resume (bench/load.py, mode sse) while the run
kill -9s the API, the stage workers, the router, the gateway and the writer, restarts Kafka and
Postgres, kill -9s Redis (AOF loses up to a second) and FLUSHALLs it once, each followed by a
restart through the stack's own table (`eco2.stack.start`). Afterwards it checks what the project
promises: every accepted job has exactly one terminal row in Postgres; every client's seq list is
exact; late joiners read whole histories; no 5xx but declared 503s (counted); and how long each
component took to be back. Loopback only, bounded: the load stops by itself and every fault ends
with its restart, whatever happens (a Ctrl-C still restarts what was killed).

The flush is measured as a user sees it (issue 22): the time until the stream of the newest job
accepted before the FLUSHALL is served again, whole from its first event (`first_stream_s`), and
the time until the whole view is back (`back_s`), on a log made long with `--seed-log N` (events
of old finished jobs, bench/longlog.py) where the stack's own log is short.

`--rollout` (`ChaosConfig.rollout`) is a Deployment rollout instead: under load each of the
workers, router, writer, gateway and API gets SIGTERM in turn, drains and is started again. On top
of the checks above it proves no model call was repeated: the model stand-in counts each job's
calls (`/admin/stats?by=job`), and every completed job must have exactly one vision and one
answer call. A process still running `drain_timeout_s` after its SIGTERM is SIGKILLed and counted.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

import view
from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS
from eco2 import services, stack

from . import harness, longlog, wire
from .load import EXPECTED_SEQS, LoadConfig, LoadRun, check_seqs
from .resume import consumers_resumed
from .stats import machine

COMPONENTS = ("api", "workers", "router", "gateway", "writer")  # killed with SIGKILL, restarted
RESTARTED = ("kafka", "postgres")  # stopped as an operator would, restarted
FAULTS: tuple[str, ...] = (*COMPONENTS, "kafka", "postgres", "redis", "flush")
ROLLOUT: tuple[str, ...] = ("workers", "router", "writer", "gateway", "api")  # SIGTERM, in this order


@dataclass
class ChaosConfig:
    vus: int = 30
    hold_s: float = 200.0  # load at full VUs; the faults are spread over it
    ramp_up_s: float = 10.0
    ramp_down_s: float = 5.0
    warmup_s: float = 15.0  # load before the first fault
    faults: tuple[str, ...] = FAULTS
    model_latency: tuple[float, float] | None = (1.0, 2.0)
    job_timeout_s: float = 240.0  # a VU's patience for one job (outages included)
    grace_s: float = 180.0
    settle_s: float = 180.0  # after the load: how long to wait for every accepted job's row
    late_joiners: int = 0  # 0 = every accepted job is read once more from the start afterwards
    back_timeout_s: float = 180.0
    name: str = ""
    progress: bool = True
    rollout: bool = False  # SIGTERM + restart of each of `faults` (components only), no SIGKILL
    drain_timeout_s: float = 60.0  # rollout: a process still up this long after SIGTERM is killed
    seed_log: int = 0  # events of old finished jobs produced to scan.events before the load
    first_stream_goal_s: float = 5.0  # a flush: the newest job's stream served again within this
    kafka_down_s: float = 0.0  # how long Kafka stays stopped (minutes: the outage consumers must survive)

    @classmethod
    def for_rollout(cls, **kw: Any) -> ChaosConfig:
        """The rollout run's defaults: 60 VUs, the hosted model's 5-10 s, every component once."""
        return cls(**{"vus": 60, "model_latency": (5.0, 10.0), "faults": ROLLOUT, "rollout": True, **kw})

    @property
    def spacing_s(self) -> float:
        usable = max(self.ramp_up_s + self.hold_s - self.warmup_s - 20.0, 1.0)
        return usable / max(len(self.faults), 1)


@dataclass
class Fault:
    what: str
    action: str
    at_s: float  # seconds since the load started
    back_s: float | None = None  # until the component answered again (view ready for a flush)
    error: str | None = None
    drain_s: float | None = None  # rollout: from SIGTERM until the process had exited
    first_stream_s: float | None = None  # flush: until the newest job's whole stream was served
    log_events: int | None = None  # flush: offsets of scan.events in the rebuild's window
    resumed_s: float | None = None  # kafka: after it was back, until every consumer consumed again


class ChaosLoad(LoadRun):
    """The load run, with the patience for outages: a stream may reconnect many times."""

    def __init__(self, s: Settings, cfg: LoadConfig, out: Callable[[str], None] | None = None) -> None:
        super().__init__(s, cfg, out)
        self.max_reconnects = 200


async def _back(s: Settings, name: str, t0: float, timeout_s: float) -> float:
    """Restart a service through the stack table; seconds from the fault until it is ready."""
    svc = services.find(name)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await stack.start(s, svc)
            return time.monotonic() - t0
        except stack.StackError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def _view_ready(s: Settings, t0: float, timeout_s: float) -> float:
    r = aioredis.from_url(s.redis_url, socket_connect_timeout=2)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if await view.current(r) == "ready":
                    return time.monotonic() - t0
            except (OSError, aioredis.RedisError):
                pass
            if time.monotonic() > deadline:
                raise harness.BenchError(f"the Redis view was not ready {timeout_s:.0f}s after the fault")
            await asyncio.sleep(0.2)
    finally:
        await r.aclose()


async def window_offsets(s: Settings) -> int:
    """Offsets of scan.events a rebuild of the view replays now (the router's window)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, **s.kafka_client_kwargs())
    await consumer.start()
    try:
        tps = [TopicPartition(EVENTS, p) for p in range(BY_NAME[EVENTS].partitions)]
        end = await consumer.end_offsets(tps)
        since_ms = int((time.time() - (s.rebuild_window_s or s.state_ttl_s)) * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
        begin = await consumer.beginning_offsets(tps)
        return sum(end[tp] - max(begin[tp], f.offset if (f := found.get(tp)) else end[tp]) for tp in tps)
    finally:
        await consumer.stop()


Probe = Callable[[float], Coroutine[Any, Any, float | None]]


def stream_probe(s: Settings, load: LoadRun) -> Probe:
    """After a flush (wall time `flushed`): follow the newest job accepted before it from its first
    event; seconds until its stream was served, or None (refused to the end, or not whole: then a
    partial history was served, which the caller reports as a failure)."""
    gw = s.gateway_url.removeprefix("http://").split(":")

    async def probe(flushed: float) -> float | None:
        jobs = [j for j in load.jobs if j.job_id is not None]
        if not jobs:
            return None
        j = jobs[-1]
        f = await wire.follow(
            gw[0],
            int(gw[1]),
            str(j.job_id),
            f"bench-{load.run_id}-{j.vu}",
            timeout_s=120.0,
            max_reconnects=200,
        )
        if f.terminal is None or not f.received or any(check_seqs(f.seqs, j.failed_stage).values()):
            return None
        return round(f.received[0] - flushed, 2)

    return probe


async def inject(
    s: Settings, what: str, at_s: float, timeout_s: float, probe: Probe | None = None, down_s: float = 0.0
) -> Fault:
    """One fault and the recovery from it (the restart always runs, even when cancelled).
    Kafka stays stopped `down_s`; once it is back, every consumer must resume by itself."""
    t0 = time.monotonic()
    flushed = time.time()
    probing: asyncio.Task[float | None] | None = None
    svc = services.find("redis" if what == "flush" else what)
    if what in COMPONENTS or what == "redis":
        action = "kill -9, restart"
        pid = stack.read_pid(s, svc)
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)
            while stack.read_pid(s, svc) is not None:
                await asyncio.sleep(0.05)
    elif what in RESTARTED:
        action = "stop, start"
        await asyncio.to_thread(stack.stop, s, svc)
        if what == "kafka" and down_s:
            action = f"stop, {down_s:g}s down, start"
            try:
                await asyncio.sleep(down_s)
            except asyncio.CancelledError:
                await asyncio.shield(_back(s, svc.name, t0, timeout_s))
                raise
    elif what == "flush":
        action = "FLUSHALL"
        r = aioredis.from_url(s.redis_url)
        try:
            await r.flushall()
            flushed = time.time()
        finally:
            await r.aclose()
        if probe is not None:
            probing = asyncio.create_task(probe(flushed))
    else:
        raise harness.BenchError(f"unknown fault {what!r}; choose from {', '.join(FAULTS)}")
    fault = Fault(what, action, round(at_s, 1))
    try:
        if what != "flush":
            await asyncio.shield(_back(s, svc.name, t0, timeout_s))
        if what in ("redis", "flush"):  # back = the view rebuilt and vouched for again
            fault.back_s = round(await _view_ready(s, t0, timeout_s), 2)
        else:
            fault.back_s = round(time.monotonic() - t0, 2)
        if what == "kafka":
            fault.resumed_s, stuck = await consumers_resumed(s, timeout_s)
            if fault.resumed_s is None:
                fault.error = "consumers did not resume after Kafka was back: " + "; ".join(
                    f"{pod}: {why}" for pod, why in stuck.items()
                )
        if probing is not None:
            fault.first_stream_s = await probing
            if fault.first_stream_s is None:
                fault.error = "the newest job's stream was not served whole after the flush"
            fault.log_events = await window_offsets(s)
    except (harness.BenchError, stack.StackError) as exc:
        fault.error = str(exc)[:500]
    finally:
        if probing is not None and not probing.done():
            probing.cancel()
    return fault


async def roll(s: Settings, what: str, at_s: float, timeout_s: float, drain_timeout_s: float) -> Fault:
    """One component's rollout step: SIGTERM, wait for it to drain and exit, start it again."""
    if what not in COMPONENTS:
        raise harness.BenchError(f"a rollout restarts {', '.join(COMPONENTS)}, not {what!r}")
    t0 = time.monotonic()
    svc = services.find(what)
    fault = Fault(what, "SIGTERM, restart", round(at_s, 1))
    pid = stack.read_pid(s, svc)
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        while stack.read_pid(s, svc) is not None and time.monotonic() - t0 < drain_timeout_s:
            await asyncio.sleep(0.05)
        if stack.read_pid(s, svc) is not None:
            fault.error = f"still running {drain_timeout_s:g}s after SIGTERM: SIGKILLed"
            os.killpg(pid, signal.SIGKILL)
            while stack.read_pid(s, svc) is not None:
                await asyncio.sleep(0.05)
    fault.drain_s = round(time.monotonic() - t0, 2)
    try:
        await asyncio.shield(_back(s, svc.name, t0, timeout_s))
        fault.back_s = round(time.monotonic() - t0, 2)
    except (harness.BenchError, stack.StackError) as exc:
        fault.error = str(exc)[:500]
    return fault


async def model_calls(s: Settings, job_ids: list[str]) -> dict[str, int]:
    """Judge each job's model calls as the stand-in counted them: one vision and one answer call
    (every bench image has a rule, so every completed job makes both), never one repeated."""
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.get(f"http://{s.model_host}:{s.model_port}/admin/stats", params={"by": "job"})
        resp.raise_for_status()
        per_job: dict[str, dict[str, int]] = resp.json()["jobs"]
    out = {"jobs": len(job_ids), "calls": 0, "jobs_with_a_repeated_call": 0, "jobs_not_one_each": 0}
    for job_id in job_ids:
        counts = per_job.get(job_id, {})
        out["calls"] += sum(counts.values())
        out["jobs_with_a_repeated_call"] += int(any(n > 1 for n in counts.values()))
        out["jobs_not_one_each"] += int(counts != {"classification": 1, "answer": 1})
    return out


async def terminal_rows(s: Settings, job_ids: list[str], timeout_s: float) -> dict[str, int]:
    """Rows in `scans` per accepted job, waiting up to `timeout_s` for the writer to catch up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = await asyncpg.connect(s.postgres_dsn, timeout=5)
            try:
                rows = await conn.fetch(
                    "SELECT job_id, count(*) AS n FROM scans WHERE job_id = ANY($1) GROUP BY job_id", job_ids
                )
            finally:
                await conn.close()
            found = {r["job_id"]: int(r["n"]) for r in rows}
        except (OSError, asyncpg.PostgresError):
            found = {}
        if len(found) == len(job_ids) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1.0)


async def late_join(s: Settings, jobs: list[tuple[str, str, str | None]], limit: int = 50) -> dict[str, int]:
    """Read every job's stream once more from the start; sum of check_seqs over them."""
    gw = s.gateway_url.removeprefix("http://").split(":")
    host, port = gw[0], int(gw[1])
    sem = asyncio.Semaphore(limit)
    totals: collections.Counter[str] = collections.Counter()

    async def one(job_id: str, user: str, failed_stage: str | None) -> None:
        async with sem:
            f = await wire.follow(host, port, job_id, user, timeout_s=60.0, max_reconnects=50)
        if f.terminal is None:
            totals["unfinished"] += 1
            totals["lost"] += len(EXPECTED_SEQS) - len(set(f.seqs))
            return
        for k, v in check_seqs(f.seqs, failed_stage).items():
            totals[k] += v
        totals["read"] += 1
        for status, _ in f.refusals:
            totals[f"HTTP {status}"] += 1

    await asyncio.gather(*(one(*j) for j in jobs))
    return dict(totals)


async def run_chaos(s: Settings, cfg: ChaosConfig, out: Callable[[str], None] = print) -> dict[str, Any]:
    needed = ["kafka", "redis", "postgres", "api", "workers", "model", "router", "gateway", "writer"]
    await harness.require(s, needed)
    for what in cfg.faults:
        if cfg.rollout and what not in COMPONENTS:
            raise harness.BenchError(f"a rollout restarts {', '.join(COMPONENTS)}, not {what!r}")
        if what not in FAULTS:
            raise harness.BenchError(f"unknown fault {what!r}; choose from {', '.join(FAULTS)}")
    harness.raise_fd_limit()
    load_cfg = LoadConfig(
        vus=cfg.vus,
        ramp_up_s=cfg.ramp_up_s,
        hold_s=cfg.hold_s,
        ramp_down_s=cfg.ramp_down_s,
        mode="sse",
        job_timeout_s=cfg.job_timeout_s,
        grace_s=cfg.grace_s,
        model_latency=cfg.model_latency,
        progress=cfg.progress,
    )
    seeded = None
    if cfg.seed_log:
        out(f"chaos: seeding scan.events with {cfg.seed_log} events of old finished jobs")
        seeded = await longlog.seed(s, cfg.seed_log, out)
        out(f"chaos: seeded {seeded['events']:.0f} events in {seeded['seconds']}s")
    load = ChaosLoad(s, load_cfg, out)
    faults: list[Fault] = []
    started = time.time()

    async def timeline() -> None:
        await asyncio.sleep(cfg.warmup_s)
        for i, what in enumerate(cfg.faults):
            at = time.monotonic() - load.start_m
            kind = "SIGTERM" if cfg.rollout else "FLUSHALL" if what == "flush" else "fault"
            out(f"chaos [{at:5.0f}s] {what}: {kind}")
            if cfg.rollout:
                fault = await roll(s, what, at, cfg.back_timeout_s, cfg.drain_timeout_s)
            else:
                fault = await inject(
                    s, what, at, cfg.back_timeout_s, stream_probe(s, load), down_s=cfg.kafka_down_s
                )
            out(
                f"chaos [{time.monotonic() - load.start_m:5.0f}s] {what}: "
                + (f"drained in {fault.drain_s}s, " if fault.drain_s is not None else "")
                + (f"first stream served after {fault.first_stream_s}s, " if fault.first_stream_s else "")
                + f"back after {fault.back_s}s"
                + (f", every consumer resumed {fault.resumed_s}s later" if fault.resumed_s else "")
                + (f" ERROR {fault.error}" if fault.error else "")
            )
            faults.append(fault)
            next_at = cfg.warmup_s + (i + 1) * cfg.spacing_s
            await asyncio.sleep(max(next_at - (time.monotonic() - load.start_m), 0.0))

    async with harness.model_latency(s, cfg.model_latency) as latency:
        out(
            f"chaos: {cfg.vus} VUs (sse) for {load_cfg.duration_s:g}s; faults {', '.join(cfg.faults)} "
            f"every {cfg.spacing_s:.0f}s from {cfg.warmup_s:g}s; model latency "
            f"{latency['min_s']:g}-{latency['max_s']:g}s"
        )
        running = asyncio.create_task(load.run())
        await asyncio.sleep(0)  # let the load set its start time
        try:
            await timeline()
            await running
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            for name in needed:  # whatever happened: leave the stack up
                if stack.read_pid(s, services.find(name)) is None:
                    await _back(s, name, time.monotonic(), cfg.back_timeout_s)
        r = load.results()
        accepted = [j for j in load.jobs if j.job_id is not None]
        out(
            f"chaos: load done; waiting up to {cfg.settle_s:g}s for {len(accepted)} accepted jobs in Postgres"
        )
        rows = await terminal_rows(s, [str(j.job_id) for j in accepted], cfg.settle_s)
        joiners = accepted if not cfg.late_joiners else accepted[: cfg.late_joiners]
        out(f"chaos: {len(joiners)} late joiners read every stream from the start")
        late = await late_join(
            s, [(str(j.job_id), f"bench-{load.run_id}-{j.vu}", j.failed_stage) for j in joiners]
        )
        calls = (
            await model_calls(s, [str(j.job_id) for j in accepted if j.status == "completed"])
            if cfg.rollout
            else None
        )
    sse = r["sse"]
    post_5xx = {k: v for k, v in r["post_errors"].items() if k.startswith("HTTP 5")}
    unfinished = [j for j in accepted if j.status not in ("completed", "failed")]
    results: dict[str, Any] = {
        "jobs_accepted": len(accepted),
        "jobs_completed": r["jobs_completed"],
        "jobs_failed": r["jobs_failed"],
        "jobs_with_one_terminal_row": sum(1 for n in rows.values() if n == 1),
        "jobs_without_terminal_row": len(accepted) - len(rows),
        "post_refusals": dict(r["post_errors"]),
        "post_5xx_not_503": sum(v for k, v in post_5xx.items() if k != "HTTP 503"),
        "post_503": post_5xx.get("HTTP 503", 0),
        "stream_refusals": dict(load.refusals),
        "stream_5xx_not_503": sum(
            v for k, v in load.refusals.items() if k.startswith("HTTP 5") and k != "HTTP 503 + Retry-After"
        ),
        "stream_503": load.refusals.get("HTTP 503 + Retry-After", 0),
        "live": {
            "streams_checked": sse["jobs_checked"],
            "streams_unfinished": len(unfinished),
            "lost": sse["lost"],
            "duplicated": sse["duplicated"],
            "unexpected": sse["unexpected"],
            "out_of_order_jobs": sse["out_of_order_jobs"],
            "reconnects": sse["reconnects"],
        },
        "late_joiners": late,
        "recovery_s": {f.what: f.back_s for f in faults},
        "e2e_s": r["e2e_s"],
    }
    flushes = [f for f in faults if f.what == "flush"]
    if flushes:
        results["flush"] = {
            "log_offsets_in_window": flushes[-1].log_events,
            "seeded_events": seeded["events"] if seeded else 0,
            "first_stream_s": flushes[-1].first_stream_s,
            "whole_view_s": flushes[-1].back_s,
        }
    if calls is not None:
        results["drain_s"] = {f.what: f.drain_s for f in faults}
        results["model_calls"] = calls
    lost_jobs = results["jobs_without_terminal_row"]
    gaps = sse["lost"] + late.get("lost", 0) + late.get("unexpected", 0)
    dups = sse["duplicated"] + late.get("duplicated", 0)
    five = (
        results["post_5xx_not_503"]
        + results["stream_5xx_not_503"]
        + sum(v for k, v in late.items() if k.startswith("HTTP 5") and k != "HTTP 503")
    )
    faults_failed = [f.what for f in faults if f.error]
    targets = [
        _target("accepted jobs lost (no terminal row in Postgres)", "0", lost_jobs, lost_jobs == 0),
        _target("events lost (live streams + late joiners)", "0", gaps, gaps == 0),
        _target("events duplicated", "0", dups, dups == 0),
        _target(
            "out-of-order streams",
            "0",
            sse["out_of_order_jobs"] + late.get("out_of_order", 0),
            sse["out_of_order_jobs"] + late.get("out_of_order", 0) == 0,
        ),
        _target("5xx other than 503 + Retry-After", "0", five, five == 0),
        _target(
            "streams that never reached their terminal event",
            "0",
            len(unfinished) + late.get("unfinished", 0),
            len(unfinished) + late.get("unfinished", 0) == 0,
        ),
        _target(
            "components drained on SIGTERM and back" if cfg.rollout else "faults recovered",
            f"{len(cfg.faults)}",
            len(faults) - len(faults_failed),
            not faults_failed and len(faults) == len(cfg.faults),
        ),
    ]
    for f in flushes:
        targets.append(
            _target(
                f"newest job's stream served whole after the flush ({f.log_events} offsets in the window)",
                f"<= {cfg.first_stream_goal_s:g}s",
                f.first_stream_s,
                f.first_stream_s is not None and f.first_stream_s <= cfg.first_stream_goal_s,
            )
        )
    if calls is not None:
        targets += [
            _target(
                "completed jobs with a model call repeated",
                "0",
                calls["jobs_with_a_repeated_call"],
                calls["jobs_with_a_repeated_call"] == 0,
            ),
            _target(
                "completed jobs without exactly one vision and one answer call",
                "0",
                calls["jobs_not_one_each"],
                calls["jobs_not_one_each"] == 0 and calls["jobs"] > 0,
            ),
        ]
    kind = "rollout" if cfg.rollout else "chaos"
    title = (
        f"Rollout: {cfg.vus} SSE VUs while each component gets SIGTERM in turn and is restarted"
        if cfg.rollout
        else f"Chaos: {cfg.vus} SSE VUs while every component is killed or restarted"
    )
    return {
        "kind": "chaos",
        "name": cfg.name or f"{kind}-{cfg.vus}vu",
        "title": title,
        "description": (
            "Faults on a timeline during the load (each restarted through the stack table): "
            + "; ".join(
                f"{f.at_s:.0f}s {f.what} ({f.action})"
                + (f" exited in {f.drain_s}s," if f.drain_s is not None else "")
                + (f" newest stream served in {f.first_stream_s}s," if f.first_stream_s is not None else "")
                + f" back in {f.back_s}s"
                for f in faults
            )
            + ". Shared 2-core box, other work running: recovery times are noisy."
        ),
        "started_at": started,
        "config": {**asdict(cfg), "faults": ",".join(cfg.faults), "model_latency": latency},
        "machine": machine(),
        "results": results,
        "timeline": [asdict(f) for f in faults],
        "targets": targets,
        "series": load.series,
    }


def _target(name: str, goal: str, measured: Any, ok: bool) -> dict[str, Any]:
    return {"target": name, "goal": goal, "measured": measured, "verdict": "PASS" if ok else "MISS"}
