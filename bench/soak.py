"""`eco2 bench soak`: the SSE load scenario held for a long time, watching for anything that grows.

What breaks streaming services is slow: a task or buffer leaked per connection, keys that outlive
their TTL, a consumer whose lag creeps, descriptors that never close. The soak runs the load
test's SSE scenario (bench/load.py) for `duration` with every client behaviour and fault path
mixed in, deterministically per iteration:
- a share of clients drop their stream mid-job and resume with Last-Event-ID (a phone's network),
- a share walk away from their stream for good and fetch the result from the API instead,
- a share of jobs carry the simulated model's fault tokens: `permanent` (the job fails),
  `transient2` (two 503s per model call, then success after retries), `gaps` (no reward).

Every `sample_every_s` it records, per stack process, RSS, open fds, CPU and (from the process's
`eco2_asyncio_tasks` gauge) its asyncio tasks; Redis memory and keys by prefix; consumer lag per
group; Kafka log bytes per topic; Postgres table sizes; SSE streams open on the gateway
(bench/soak_sampler.py). At the end it judges (bench/soak_verdict.py): completion, lost/duplicated
SSE events, throughput and E2E p95 of the last window against the first, a fitted growth per hour
of RSS/fds/tasks against stated tolerances, tasks back at their idle level, Redis keys within what
the TTL allows, lag back to zero.
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contract.events import PIPELINE
from contract.settings import Settings
from contract.topics import ROUTER_GROUP, TOPICS, WRITER_GROUP, stage_group
from eco2.service import data_dir, log_dir

from . import harness, wire
from .load import Job, LoadRun, image_url
from .soak_config import SoakConfig
from .soak_sampler import LogWatch, Sampler
from .soak_verdict import judge
from .stats import machine

GOLDEN = (5**0.5 - 1) / 2  # the fault draw's step (`SoakRun.plan`)


def parse_duration(text: str) -> float:
    """'90' or '90s' -> 90; '10m' -> 600; '1h' -> 3600."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"bad duration {text!r}: want e.g. 20s, 10m, 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# --- the load: the SSE scenario with every client behaviour and fault -----------------------------


@dataclass(frozen=True)
class Plan:
    kind: str  # "" follow to the end | "resume" drop after `cut` events and resume | "abandon"
    fault: str  # "" | permanent | transient2 | gaps
    cut: int  # events read before the drop / before walking away


class SoakRun(LoadRun):
    def __init__(self, s: Settings, cfg: SoakConfig, out: Callable[[str], None] | None = None) -> None:
        super().__init__(s, cfg.load_config(), out)
        self.soak = cfg

    def plan(self, job: Job) -> Plan:
        """What this iteration does, the same every time it is asked (seeded by run, VU, n)."""
        rnd = random.Random(f"{self.run_id}:{job.vu}:{job.n}")
        c = self.soak
        x = rnd.random()
        # The fault draw walks a golden-ratio sequence from a random start per VU, not independent
        # draws: a 10% share shows up within 13 iterations of every VU, and a short run (the
        # smoke's 4 VUs x ~10 jobs) misses one far less often than independent draws did (a 10%
        # share left out of 40 jobs 1.5% of the time).
        y = (random.Random(f"{self.run_id}:{job.vu}").random() + job.n * GOLDEN) % 1.0
        kind = "resume" if x < c.resume_share else "abandon" if x < c.resume_share + c.abandon_share else ""
        fault = ""
        for name, share in (
            ("permanent", c.permanent_share),
            ("transient2", c.transient_share),
            ("gaps", c.gaps_share),
        ):
            if y < share:
                fault = name
                break
            y -= share
        cut = rnd.randint(1, 8) if kind == "resume" else rnd.randint(0, 4)
        return Plan(kind, fault, cut)

    def image_for(self, job: Job) -> str:
        p = self.plan(job)
        job.kind, job.fault = p.kind, p.fault
        # The run id keeps URLs unique across runs: the model counts transient faults per URL.
        url = image_url(job.vu, job.n).replace(".jpg", f"-{self.run_id}.jpg")
        return url.replace("/bench/", f"/bench/{p.fault}-") if p.fault else url

    async def _follow(self, job: Job, user: str, conn: wire.Connection) -> None:
        p = self.plan(job)
        if p.kind == "resume":
            self._followed(job, await self._stream(job, user, drop_after=p.cut))
        elif p.kind == "abandon":
            f = await self._stream(job, user, stop_after=p.cut)
            if f.terminal is not None:  # the job ended before the client walked away
                self._followed(job, f)
                return
            await self._poll(conn, job, user)  # as the app would, on its next start
        else:
            self._followed(job, await self._stream(job, user))


# --- the run -------------------------------------------------------------------------------------


def redis_budget(maxmemory: int) -> dict[str, Any]:
    """What Redis may hold: its maxmemory, else half of this machine's memory (it shares the box)."""
    if maxmemory:
        return {"bytes": maxmemory, "rule": "Redis maxmemory"}
    total = machine()["memory_gib"] * 2**30
    return {"bytes": int(total / 2), "rule": "half the machine's memory (no maxmemory set)"}


def disk_budget(path: Path) -> dict[str, Any]:
    """What Kafka's logs may fill here: half of the disk that holds them, free or already theirs."""
    usage = shutil.disk_usage(path)
    return {"bytes": int(usage.free / 2), "rule": f"half the free disk at {path}"}


def consumer_groups(env: dict[str, dict[str, str]]) -> list[str]:
    """The stack's consumer groups: the stage workers' (from the stages they run), router, writer."""
    stages = env.get("workers", {}).get("ECO2_STAGES") or ",".join(PIPELINE)
    wanted = [st for st in PIPELINE if st in stages.split(",")]
    return [stage_group(wanted), ROUTER_GROUP, WRITER_GROUP]


async def _idle_samples(sampler: Sampler, n: int, gap_s: float, t: float) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        if i:
            await asyncio.sleep(gap_s)
        out.append(await sampler.sample(t, {"phase": "idle"}))
    return out


async def _drain(sampler: Sampler, timeout_s: float) -> dict[str, Any]:
    """Wait until every group has consumed everything (the stack finishes what is in flight)."""
    t0 = time.monotonic()
    lag: dict[str, int] = {}
    while True:
        try:
            lag = await sampler.lag(exact=True)
        except Exception:
            lag = {}
        if lag and all(n == 0 for n in lag.values()):
            return {"lag": lag, "zero": True, "waited_s": round(time.monotonic() - t0, 1)}
        if time.monotonic() - t0 > timeout_s:
            return {"lag": lag, "zero": False, "waited_s": round(time.monotonic() - t0, 1)}
        await asyncio.sleep(2.0)


async def run_soak(s: Settings, cfg: SoakConfig, out: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The soak against the running stack (model latency set for the run and restored after)."""
    await harness.require(s, ["api", "workers", "model", "router", "gateway", "writer"])
    nofile = harness.raise_fd_limit()
    if 2 * cfg.vus + 200 > nofile:
        raise harness.BenchError(f"{cfg.vus} VUs need more open files than this process may have ({nofile})")
    pids = harness.service_pids(s)
    env = harness.service_env(pids)
    run = SoakRun(s, cfg, out)
    say = run.out
    sampler = Sampler(s, pids, consumer_groups(env), cfg.key_scan_every)
    await sampler.start()
    try:
        async with harness.model_latency(s, cfg.model_latency) as latency:
            say(
                f"soak: {cfg.vus} VUs for {cfg.duration_s:g}s (ramp {cfg.ramp_up_s:g}s up, "
                f"{cfg.ramp_down_s:g}s down), SSE; resume {cfg.resume_share:.0%}, abandon "
                f"{cfg.abandon_share:.0%}, faults permanent {cfg.permanent_share:.0%} / transient2 "
                f"{cfg.transient_share:.0%} / gaps {cfg.gaps_share:.0%}; model "
                f"{latency['min_s']:g}-{latency['max_s']:g}s; a sample every {cfg.sample_every_s:g}s"
            )
            idle_before = await _idle_samples(sampler, 3, 1.0, 0.0)
            scans = {"start": await sampler.key_scan()}
            clients = {"before": await sampler.redis_clients()}
            sampler.rows.clear()
            cpu = harness.ServiceCpu(pids)
            logs = LogWatch(log_dir(s), pids)
            started = time.time()
            load = asyncio.create_task(run.run())
            while not run.start_m:
                await asyncio.sleep(0.01)
            while not load.done():
                t = time.monotonic() - run.start_m
                last = run.series[-1] if run.series else {}
                extra = {k: last.get(k) for k in ("vus", "in_flight", "throughput_jpm", "e2e_p95_s")}
                row = await sampler.sample(t, extra)
                if cfg.progress:
                    say(_progress(row))
                next_t = run.start_m + (len(sampler.rows)) * cfg.sample_every_s
                await asyncio.wait({load}, timeout=max(next_t - time.monotonic(), 0.0))
            await load
            services = cpu.result()
            say("soak: load finished; waiting for every consumer group to drain")
            lag_after = await _drain(sampler, cfg.drain_timeout_s)
            await asyncio.sleep(min(5.0, cfg.sample_every_s))  # let closed streams' tasks end
            idle_after = await _idle_samples(sampler, 3, 1.0, time.monotonic() - run.start_m)
            scans["end"] = await sampler.key_scan({j.job_id for j in run.jobs if j.job_id})
            log_counts = logs.counts()
            clients["after"] = await sampler.redis_clients()
    finally:
        await sampler.close()
    r = run.results()
    verdict = judge(
        jobs=run.jobs,
        start_m=run.start_m,
        cfg=cfg,
        rows=[x for x in sampler.rows if x.get("phase") != "idle"],
        idle_before=idle_before,
        idle_after=idle_after,
        key_scans=scans,
        lag_after=lag_after,
        ttl_limits={
            "scan:state": s.state_ttl_s,
            "scan:history": s.state_ttl_s,
            "scan:memo": s.memo_ttl_s,
            "scan:idem": s.idempotency_ttl_s,
        },
        memory_budget=redis_budget(scans["end"].get("maxmemory", 0)),
        retention_s={
            tp.name: int(tp.config["retention.ms"]) / 1000 for tp in TOPICS if "retention.ms" in tp.config
        },
        disk_budget=disk_budget(data_dir(s)),
    )
    by_kind = collections.Counter(j.kind or "follow" for j in run.jobs if j.job_id)
    by_fault = collections.Counter(j.fault or "none" for j in run.jobs if j.job_id)
    outcome = collections.Counter(f"{j.fault or 'none'}:{j.status}" for j in run.jobs if j.job_id is not None)
    return {
        "kind": "soak",
        "name": cfg.name or f"soak-{cfg.vus}vu-{_dur(cfg.duration_s)}",
        "started_at": started,
        "config": {**asdict(cfg), "model_latency": latency},
        "machine": machine(),
        "services_env": env,
        "results": {
            **{k: r[k] for k in ("jobs_submitted", "jobs_completed", "jobs_failed", "jobs_by_status")},
            "scan_success_rate": r["scan_success_rate"],
            "throughput_jpm": r["throughput_jpm"],
            "e2e_s": r["e2e_s"],
            "sse": r.get("sse"),
            "by_client_kind": dict(by_kind),
            "by_fault": dict(by_fault),
            "outcomes": dict(outcome),
            "errors": r.get("errors"),
            "generator_cpu": r["generator_cpu"],
            "windows": verdict["windows"],
            "growth": verdict["growth"],
            "growth_fit": verdict["growth_fit"],
            "growth_judged": verdict["growth_judged"],
            "idle": verdict["idle"],
            "idle_before": idle_before,
            "idle_after": idle_after,
            "redis_keys": verdict["redis_keys"],
            "storage": verdict["storage"],
            "key_scans": scans,
            "lag_after": lag_after,
            "log_counts": log_counts,
            "redis_clients": clients,
        },
        "services_cpu": services,
        "targets": verdict["targets"],
        "series": sampler.rows,
        "panels": panels(sampler.rows),
    }


def _dur(seconds: float) -> str:
    return f"{seconds / 60:g}min" if seconds >= 60 else f"{seconds:g}s"


def _progress(row: dict[str, Any]) -> str:
    rss = sum(v for k, v in row.items() if k.startswith("rss_mib:") and v and not k.endswith("generator"))
    tasks = {k.split(":", 1)[1]: v for k, v in row.items() if k.startswith("tasks:")}
    lag = sum(v for k, v in row.items() if k.startswith("lag:") and v)
    return (
        f"[{row['t']:6.0f}s] VUs {row.get('vus')}  in flight {row.get('in_flight')}  "
        f"{row.get('throughput_jpm')} jobs/min  E2E p95 {row.get('e2e_p95_s')}s  app RSS {rss:.0f} MiB  "
        f"tasks {tasks}  streams {row.get('gateway_streams')}  redis keys {row.get('redis_keys')}  lag {lag}"
    )


def panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The PNG's panels: one per family of series, one line per process/topic/group/table."""
    cols = sorted({c for r in rows for c in r})

    def family(prefix: str) -> list[tuple[str, str]]:
        return [(c, c.split(":", 1)[1]) for c in cols if c.startswith(prefix + ":")]

    out: list[tuple[str, list[tuple[str, str]]]] = [
        ("load", [("vus", "VUs"), ("in_flight", "jobs in flight"), ("throughput_jpm", "jobs/min (10 s)")]),
        ("E2E p95 (s)", [("e2e_p95_s", "E2E p95 (10 s window)")]),
        ("RSS (MiB)", family("rss_mib")),
        ("open fds", family("fds")),
        # The stage workers hold thousands of agent actors: their own panel keeps the others legible.
        ("asyncio tasks", [c for c in family("tasks") if c[1] != "workers"]),
        ("asyncio tasks (stage workers)", [c for c in family("tasks") if c[1] == "workers"]),
        ("CPU (% of a core)", family("cpu_pct")),
        (
            "Redis",
            [("redis_keys", "keys"), *family("redis_keys"), ("right:redis_used_mib", "used memory (MiB)")],
        ),
        ("consumer lag", family("lag")),
        ("Kafka log (MiB)", [c for c in family("kafka_mib") if not c[1].startswith("__")]),
        ("Postgres (MiB)", family("pg_mib")),
        ("SSE streams open", [("gateway_streams", "gateway")]),
    ]
    return [p for p in out if p[1]]
