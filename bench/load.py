"""The replaced system's load scenario against the running stack, measured the same way.

VUs ramp 0 -> N over `ramp_up_s`, hold N for `hold_s`, ramp down over `ramp_down_s` (like k6's
ramping-vus: a VU told to stop finishes its current iteration first). Each VU loops:
POST /api/v1/scan -> wait for the final result -> repeat. `polling` waits as the original did,
GET .../result every ~2.5 s; `sse` follows the job's event stream on the gateway instead and checks
every job's seq list for lost or repeated events. After the ramp-down the run waits at most `grace_s`
for iterations still running, then cancels them (they count as not completed): the run is bounded.

One asyncio process, one keep-alive connection per VU (bench/wire.py), so the generator's own CPU,
reported beside the results, stays a small share of the 2 cores it shares with the stack.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import redis.asyncio as aioredis

from catalog.rules import RECYCLABLE_MIDDLES
from contract import keys
from contract.events import DONE, FAILED_SEQ, PIPELINE, QUEUED, STAGES, SUCCESS_SEQS, seq_of
from contract.pipeline import SPEC
from contract.settings import Settings

from . import harness, wire
from .stats import CpuMeter, LoopLag, machine, percentile, quiet_gc, summary

Mode = Literal["polling", "sse"]

# Every event of a successful job, in order: queued, started/completed per stage, done.
EXPECTED_SEQS: list[int] = list(SUCCESS_SEQS)
WINDOW_S = 10.0  # moving window of the per-second series (throughput, p95 so far)


@dataclass
class LoadConfig:
    vus: int = 300
    ramp_up_s: float = 30.0
    hold_s: float = 120.0
    ramp_down_s: float = 30.0
    mode: Mode = "polling"
    poll_interval_s: float = 2.5  # the original's k6 script polled about every 2.5 s
    job_timeout_s: float = 180.0  # a VU gives up on a job after this long (counts as not completed)
    grace_s: float = 60.0  # after the ramp-down, how long running iterations may still finish
    model_latency: tuple[float, float] | None = (5.0, 10.0)  # the hosted model's 5-10 s per call
    name: str = ""
    progress: bool = True

    @property
    def duration_s(self) -> float:
        return self.ramp_up_s + self.hold_s + self.ramp_down_s

    def target_vus(self, t: float) -> float:
        """VUs wanted `t` seconds into the run (piecewise linear, as k6's stages)."""
        if t < self.ramp_up_s:
            return self.vus * t / self.ramp_up_s
        t -= self.ramp_up_s
        if t < self.hold_s:
            return float(self.vus)
        t -= self.hold_s
        if t < self.ramp_down_s:
            return self.vus * (1.0 - t / self.ramp_down_s)
        return 0.0


@dataclass(slots=True)
class Job:
    """One VU iteration: a POST and the wait for its final result."""

    vu: int
    t0: float  # wall clock just before the POST
    m0: float  # monotonic just before the POST
    n: int = 0  # the VU's iteration number
    kind: str = ""  # what the client does (the soak's shares: resume, abandon, ...); "" = follow
    fault: str = ""  # the simulated model's fault token in the image name (soak), "" = none
    job_id: str | None = None
    status: str = "running"  # completed | failed | timeout | error | interrupted | rejected
    post_s: float | None = None
    e2e_s: float | None = None  # POST start -> result in hand (polling delay included)
    terminal_s: float | None = None  # POST start -> the job's terminal event (server clock)
    done_m: float | None = None  # monotonic when the VU saw the terminal result
    polls: int = 0
    reconnects: int = 0
    seqs: list[int] | None = None
    reward: bool | None = None
    timings: dict[str, float] = field(default_factory=dict)
    failed_stage: str | None = None
    error: str | None = None


def check_seqs(seqs: list[int], failed_stage: str | None) -> dict[str, int]:
    """Lost, duplicated, unexpected and out-of-order events of one finished job's stream."""
    if seqs and seqs[-1] == FAILED_SEQ:
        if failed_stage in STAGES:
            cut = STAGES.index(failed_stage) * 10
            expected = [x for x in EXPECTED_SEQS if x <= cut] + [FAILED_SEQ]
        else:
            expected = sorted(set(seqs))
    else:
        expected = EXPECTED_SEQS
    seen = set(seqs)
    return {
        "lost": len(set(expected) - seen),
        "duplicated": len(seqs) - len(seen),
        "unexpected": len(seen - set(expected)),
        "out_of_order": int(seqs != sorted(seqs)),
    }


def image_url(vu: int, n: int) -> str:
    """A recyclable item per iteration (the simulated model classifies by file name)."""
    middle = RECYCLABLE_MIDDLES[(vu + n) % len(RECYCLABLE_MIDDLES)]
    return f"https://images.example.com/bench/{middle}-{vu}-{n}.jpg"


class LoadRun:
    def __init__(self, s: Settings, cfg: LoadConfig, out: Callable[[str], None] | None = None) -> None:
        self.s = s
        self.cfg = cfg
        self.run_id = uuid.uuid4().hex[:8]
        api = urlparse(s.api_url)
        gw = urlparse(s.gateway_url)
        self.api = (api.hostname or "127.0.0.1", api.port or 80)
        self.gw = (gw.hostname or "127.0.0.1", gw.port or 80)
        self.jobs: list[Job] = []
        self.post_lat: list[float] = []
        self.poll_lat: list[float] = []
        self.delivery: list[float] = []
        self.events = 0
        self.in_flight = 0
        self.post_errors: collections.Counter[str] = collections.Counter()
        self.poll_errors = 0
        self.refusals: collections.Counter[str] = collections.Counter()  # gateway answers but 200/204
        self.max_reconnects = 20  # per job stream, in a row
        self.active: dict[int, asyncio.Event] = {}  # running VUs not yet told to stop
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.series: list[dict[str, Any]] = []
        self._recent_done: collections.deque[tuple[float, float]] = collections.deque()
        self._recent_post: collections.deque[tuple[float, float]] = collections.deque()
        self._events_at_tick = 0
        self.submitted = 0
        self.completed = 0
        self.start_m = 0.0
        self.end_m = 0.0
        self.cpu: dict[str, float] = {}
        self.lag = LoopLag()
        self.out = out or (lambda line: print(line, file=sys.stderr, flush=True))

    # --- one VU ----------------------------------------------------------------------------

    async def vu(self, i: int, stop: asyncio.Event) -> None:
        conn = wire.Connection(*self.api, timeout_s=30.0)
        user = f"bench-{self.run_id}-{i}"
        n = 0
        try:
            while not stop.is_set():
                await self.iteration(conn, user, i, n)
                n += 1
        finally:
            conn.close()

    async def iteration(self, conn: wire.Connection, user: str, i: int, n: int) -> None:
        job = Job(vu=i, n=n, t0=time.time(), m0=time.monotonic())
        self.jobs.append(job)
        self.in_flight += 1
        try:
            body = json.dumps({"image_url": self.image_for(job)}).encode()
            headers = {"X-User-ID": user, "Content-Type": "application/json"}
            try:
                resp = await conn.request("POST", "/api/v1/scan", headers, body)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self._rejected(job, type(exc).__name__)
                await asyncio.sleep(1.0)  # as a client would back off; no hot loop on a down API
                return
            job.post_s = time.monotonic() - job.m0
            if resp.status != 202:
                self._rejected(job, f"HTTP {resp.status}")
                await asyncio.sleep(1.0)
                return
            self.post_lat.append(job.post_s)
            self._recent_post.append((time.monotonic(), job.post_s))
            job.job_id = resp.json()["job_id"]
            self.submitted += 1
            if self.cfg.mode == "polling":
                await self._poll(conn, job, user)
            else:
                await self._follow(job, user, conn)
        except asyncio.CancelledError:
            job.status = "interrupted"
            raise
        finally:
            self.in_flight -= 1
            if job.status == "running":
                job.status = "error"

    def image_for(self, job: Job) -> str:
        """The image this iteration scans (the soak adds fault tokens)."""
        return image_url(job.vu, job.n)

    def _rejected(self, job: Job, why: str) -> None:
        job.status = "rejected"
        job.error = why
        self.post_errors[why] += 1

    async def _poll(self, conn: wire.Connection, job: Job, user: str) -> None:
        path = f"/api/v1/scan/{job.job_id}/result"
        deadline = job.m0 + self.cfg.job_timeout_s
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            if time.monotonic() > deadline:
                job.status = "timeout"
                return
            t = time.monotonic()
            try:
                resp = await conn.request("GET", path, {"X-User-ID": user})
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                self.poll_errors += 1
                continue
            self.poll_lat.append(time.monotonic() - t)
            job.polls += 1
            if resp.status == 200:
                self._finish(job, resp.json())
                return
            if resp.status == 503 and "retry-after" in resp.headers:
                self.poll_errors += 1  # a declared outage (or the view rebuilding): poll again
                continue
            if resp.status != 202:
                job.status = "error"
                job.error = f"result HTTP {resp.status}"
                return

    async def _follow(self, job: Job, user: str, conn: wire.Connection) -> None:
        self._followed(job, await self._stream(job, user))

    async def _stream(self, job: Job, user: str, **kw: Any) -> wire.Follow:
        """The job's SSE stream within its timeout (`kw`: wire.follow's client behaviours)."""
        assert job.job_id is not None
        remaining = job.m0 + self.cfg.job_timeout_s - time.monotonic()
        kw.setdefault("max_reconnects", self.max_reconnects)
        return await wire.follow(
            *self.gw, job.job_id, user, timeout_s=remaining, on_event=self._on_event, **kw
        )

    def _followed(self, job: Job, f: wire.Follow) -> None:
        for status, retry_after in f.refusals:
            self.refusals[f"HTTP {status}" + (" + Retry-After" if retry_after else "")] += 1
        job.seqs = f.seqs
        job.reconnects = f.reconnects
        if f.terminal is None:
            job.status = "timeout" if f.error and f.error.startswith("no terminal") else "error"
            job.error = f.error
            return
        self._finish(job, f.terminal.get("result") or {}, terminal_ts=float(f.terminal["ts"]))

    def _on_event(self, ev: dict[str, Any], received: float) -> None:
        self.events += 1
        self.delivery.append(received - float(ev["ts"]))

    def _finish(self, job: Job, result: dict[str, Any], terminal_ts: float | None = None) -> None:
        now = time.monotonic()
        job.done_m = now
        job.e2e_s = now - job.m0
        job.status = "completed" if result.get("status") == "completed" else "failed"
        finished = result.get("finished_at") or terminal_ts
        if finished:
            job.terminal_s = float(finished) - job.t0
        job.reward = bool((result.get("reward") or {}).get("granted"))
        job.timings = result.get("timings") or {}
        job.failed_stage = result.get("failed_stage")
        job.error = result.get("error")
        if job.status == "completed":
            self.completed += 1
            self._recent_done.append((now, job.e2e_s))

    # --- the scenario ----------------------------------------------------------------------

    def _spawn(self, i: int) -> None:
        stop = asyncio.Event()
        self.active[i] = stop
        task = asyncio.create_task(self.vu(i, stop), name=f"vu-{i}")
        self.tasks[i] = task
        task.add_done_callback(lambda _t: self.tasks.pop(i, None))

    async def run(self) -> None:
        self.start_m = time.monotonic()
        meter = CpuMeter()
        quiet_gc()
        self.lag.start()
        sampler = asyncio.create_task(self._sample(meter))
        next_id = 0
        try:
            while True:
                t = time.monotonic() - self.start_m
                if t >= self.cfg.duration_s:
                    break
                target = round(self.cfg.target_vus(t))
                while len(self.active) < target:
                    self._spawn(next_id)
                    next_id += 1
                while len(self.active) > target:
                    _, stop = self.active.popitem()  # newest first; it finishes its iteration
                    stop.set()
                await asyncio.sleep(0.1)
            for stop in self.active.values():
                stop.set()
            self.active.clear()
            pending = list(self.tasks.values())
            if pending:
                await asyncio.wait(pending, timeout=self.cfg.grace_s)
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            self.end_m = time.monotonic()
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            self.cpu = meter.total()
            await self.lag.stop()
            if self.cfg.progress and sys.stderr.isatty():
                self.out("")

    async def _sample(self, meter: CpuMeter) -> None:
        """One row of the time series per second, and the live progress line."""
        tty = sys.stderr.isatty()
        last_print = 0.0
        lag_at = 0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            t = now - self.start_m
            for dq in (self._recent_done, self._recent_post):
                while dq and dq[0][0] < now - WINDOW_S:
                    dq.popleft()
            gen_cpu, box_cpu = meter.tick()
            lag_at, lag_max = self.lag.since(lag_at)
            completed = self.completed
            e2e = [x for _, x in self._recent_done]
            post = [x for _, x in self._recent_post]
            window = min(WINDOW_S, max(t, 1e-6))
            row = {
                "t": round(t, 1),
                "vus": len(self.active),
                "vus_running": len(self.tasks),
                "in_flight": self.in_flight,
                "submitted": self.submitted,
                "completed": completed,
                "throughput_jpm": round(len(e2e) * 60.0 / window, 1),
                "e2e_p95_s": _r(percentile(e2e, 95), 2),
                "post_p95_ms": _r(_ms(percentile(post, 95)), 1),
                "events_per_s": self.events - self._events_at_tick,
                "gen_cpu_pct": gen_cpu,
                "gen_loop_lag_ms": lag_max,
                "machine_cpu_pct": box_cpu,
            }
            self._events_at_tick = self.events
            self.series.append(row)
            if self.cfg.progress and (tty or now - last_print >= 10.0):
                last_print = now
                line = (
                    f"[{t:5.0f}s] VUs {row['vus']:>4}/{self.cfg.vus}  submitted {row['submitted']:>6}  "
                    f"completed {completed:>6}  in flight {self.in_flight:>5}  "
                    f"E2E p95 {_fmt(row['e2e_p95_s'], 's')}  POST p95 {_fmt(row['post_p95_ms'], 'ms')}  "
                    f"gen CPU {gen_cpu:.0f}%  box CPU {box_cpu:.0f}%"
                )
                if tty:
                    sys.stderr.write("\r\x1b[2K" + line)
                    sys.stderr.flush()
                else:
                    self.out(line)

    # --- results ---------------------------------------------------------------------------

    async def stage_latencies(self) -> dict[str, Any]:
        """Per-stage wait (queue) and service time from each completed job's events in Redis
        history, and the consistency of every finished job's history (seq list)."""
        done = [j for j in self.jobs if j.status in ("completed", "failed") and j.job_id]
        waits: dict[str, list[float]] = {st: [] for st in PIPELINE}
        services: dict[str, list[float]] = {st: [] for st in PIPELINE}
        finish: list[float] = []
        mismatched = 0
        client = aioredis.from_url(self.s.redis_url)
        try:
            for k in range(0, len(done), 500):
                part = done[k : k + 500]
                pipe = client.pipeline(transaction=False)
                for j in part:
                    pipe.zrange(keys.history(str(j.job_id)), 0, -1)
                for j, raw in zip(part, await pipe.execute(), strict=True):
                    evs = [json.loads(x) for x in raw]
                    seqs = [int(e["seq"]) for e in evs]
                    c = check_seqs(seqs, j.failed_stage)
                    if c["lost"] or c["unexpected"]:
                        mismatched += 1
                    if j.status != "completed":
                        continue
                    ts = {int(e["seq"]): float(e["ts"]) for e in evs}
                    prev = ts.get(seq_of(QUEUED, "completed"))
                    for st in PIPELINE:
                        a, b = ts.get(seq_of(st, "started")), ts.get(seq_of(st, "completed"))
                        if prev is not None and a is not None:
                            waits[st].append(a - prev)
                        if a is not None and b is not None:
                            services[st].append(b - a)
                        prev = b
                    end = ts.get(seq_of(DONE, "completed"))
                    if prev is not None and end is not None:
                        finish.append(end - prev)
        finally:
            await client.aclose()
        return {
            "from_events": {
                st: {"wait_s": summary(waits[st], 3), "service_s": summary(services[st], 3)}
                for st in PIPELINE
            },
            "done_after_reward_s": summary(finish, 3),
            "from_timings": {
                st: summary(
                    [j.timings[st] for j in self.jobs if j.status == "completed" and st in j.timings], 3
                )
                for st in PIPELINE
            },
            "history_mismatched_jobs": mismatched,
            "history_checked_jobs": len(done),
        }

    def results(self) -> dict[str, Any]:
        cfg = self.cfg
        jobs = self.jobs
        attempted = len(jobs)
        accepted = [j for j in jobs if j.job_id is not None]
        completed = [j for j in accepted if j.status == "completed"]
        failed = [j for j in accepted if j.status == "failed"]
        by_status = collections.Counter(j.status for j in jobs)
        end_times = [j.done_m for j in completed if j.done_m is not None]
        run_s = (max(end_times) - self.start_m) if end_times else (self.end_m - self.start_m)
        # Steady state: the hold, minus one E2E p95 at its start (VUs started late in the ramp-up
        # are still on their first iteration until then).
        e2e_all = [j.e2e_s for j in completed if j.e2e_s is not None]
        warm = percentile(e2e_all, 95) or 0.0
        steady_from = self.start_m + cfg.ramp_up_s + warm
        steady_to = self.start_m + cfg.ramp_up_s + cfg.hold_s
        steady_s = steady_to - steady_from
        in_steady = [t for t in end_times if steady_from <= t < steady_to]
        model_time = [sum(j.timings.get(st.name, 0.0) for st in SPEC if st.model) for j in completed]
        out: dict[str, Any] = {
            "scans_attempted": attempted,
            "scans_accepted": len(accepted),
            "scan_success_rate": _rate(len(accepted), attempted),
            "post_errors": dict(self.post_errors),
            "jobs_submitted": len(accepted),
            "jobs_completed": len(completed),
            "jobs_failed": len(failed),
            "jobs_by_status": dict(by_status),
            "completion_rate": _rate(len(completed), len(accepted)),
            "final_result_rate": _rate(len(completed) + len(failed), len(accepted)),
            "reward_rate": _rate(sum(1 for j in completed if j.reward), len(completed)),
            "scan_api_ms": _ms_summary(self.post_lat),
            "result_api_ms": _ms_summary(self.poll_lat),
            "poll_errors": self.poll_errors,
            "completion_time_s": summary([j.terminal_s for j in completed if j.terminal_s is not None], 3),
            "e2e_s": summary([j.e2e_s for j in completed if j.e2e_s is not None], 3),
            "model_time_s": summary(model_time, 3),
            "run_s": round(run_s, 1),
            "throughput_jpm": round(len(completed) * 60.0 / run_s, 1) if run_s > 0 else None,
            "throughput_steady_jpm": round(len(in_steady) * 60.0 / steady_s, 1) if steady_s >= 30 else None,
            "steady_window_s": [round(steady_from - self.start_m, 1), round(steady_to - self.start_m, 1)],
            "polls_per_job": summary([float(j.polls) for j in completed], 2)
            if cfg.mode == "polling"
            else None,
            "generator_cpu": self.cpu,
            "generator_loop_lag_ms": self.lag.summary_ms(),
        }
        if cfg.mode == "sse":
            checks = [
                check_seqs(j.seqs, j.failed_stage)
                for j in accepted
                if j.status in ("completed", "failed") and j.seqs is not None  # None: not followed
            ]
            dup_unfinished = sum(
                len(j.seqs) - len(set(j.seqs))
                for j in accepted
                if j.seqs and j.status not in ("completed", "failed")
            )
            wall = max(self.end_m - self.start_m, 1e-6)
            out["sse"] = {
                "events_received": self.events,
                "events_per_s": round(self.events / wall, 1),
                "events_per_s_peak": max((r["events_per_s"] for r in self.series), default=0),
                "delivery_ms": _ms_summary(self.delivery),
                "lost": sum(c["lost"] for c in checks),
                "duplicated": sum(c["duplicated"] for c in checks) + dup_unfinished,
                "unexpected": sum(c["unexpected"] for c in checks),
                "out_of_order_jobs": sum(c["out_of_order"] for c in checks),
                "jobs_checked": len(checks),
                "reconnects": sum(j.reconnects for j in accepted),
            }
        errors = collections.Counter(j.error for j in jobs if j.error and j.status != "completed")
        out["errors"] = dict(errors.most_common(10))
        return out


CPU_PER_JOB_MS = 30.0  # all stack processes together, per completed job (issue 13)


def targets(cfg: LoadConfig, r: dict[str, Any], cpu: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The project's targets, computed from the measured data: PASS / MISS (n/a when the run
    cannot judge it, e.g. throughput with a zero-latency model)."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, measured: Any, ok: bool | None) -> None:
        out.append(
            {
                "target": name,
                "goal": goal,
                "measured": measured,
                "verdict": "n/a" if ok is None else ("PASS" if ok else "MISS"),
            }
        )

    comp = r["completion_rate"]
    add("completion", ">= 99.9%", _pct(comp), None if comp is None else comp >= 0.999)
    mt = r["model_time_s"]
    model_bound = mt["mean"] is not None and mt["mean"] >= 1.0
    thr = r["throughput_steady_jpm"]
    if model_bound and thr is not None:
        need = 0.95 * cfg.vus * 60.0 / mt["mean"]
        add(
            "throughput (steady)",
            f">= 95% of VUs/model time = {need:.0f} jobs/min",
            f"{thr:.0f} jobs/min",
            thr >= need,
        )
    else:  # zero-latency model, or a hold too short for a steady-state window of 30 s
        add("throughput (steady)", ">= 95% of VUs / model time per job", thr, None)
    e2e = r["e2e_s"]["p95"]
    if model_bound and e2e is not None and mt["p95"] is not None:
        limit = 1.10 * mt["p95"]
        add("E2E p95", f"<= 1.10 x model-time p95 = {limit:.2f} s", f"{e2e:.2f} s", e2e <= limit)
    else:
        add("E2E p95", "<= 1.10 x model-time p95", e2e, None)
    post = r["scan_api_ms"]["p95"]
    add(
        "Scan API p95",
        "<= 20 ms",
        None if post is None else f"{post:.1f} ms",
        None if post is None else post <= 20.0,
    )
    if cfg.mode == "sse":
        sse = r["sse"]
        bad = sse["lost"] + sse["duplicated"] + sse["unexpected"]
        add("SSE lost/duplicated events", "0", bad, bad == 0 and sse["jobs_checked"] > 0)
    total = (cpu or {}).get("total_ms")
    add(
        "CPU per completed job (all stack processes)",
        f"<= {CPU_PER_JOB_MS:g} ms",
        None if total is None else f"{total:.1f} ms",
        None if total is None else total <= CPU_PER_JOB_MS,
    )
    return out


async def run_load(
    s: Settings, cfg: LoadConfig, out: Callable[[str], None] | None = None, stack: Settings | None = None
) -> dict[str, Any]:
    """Run the scenario against the stack (model latency set for the run and restored after).
    With `stack`, the VUs talk to `s`'s API and gateway (e.g. a benchmark's own) while the stack
    of `stack` is the one checked and measured."""
    stack = stack or s
    needed = ["api", "workers", "model", "router"] + (["gateway"] if cfg.mode == "sse" else [])
    await harness.require(stack, needed)
    nofile = harness.raise_fd_limit()
    if 2 * cfg.vus + 100 > nofile:  # a keep-alive API connection per VU, plus its SSE stream
        raise harness.BenchError(f"{cfg.vus} VUs need more open files than this process may have ({nofile})")
    pids = harness.service_pids(stack)
    env = harness.service_env(pids)
    run = LoadRun(s, cfg, out)
    say = run.out
    concurrency = stage_concurrency(env)
    if cfg.model_latency and cfg.model_latency[1] > 0 and concurrency < cfg.vus:
        say(
            f"warning: the workers run with ECO2_STAGE_CONCURRENCY={concurrency} < {cfg.vus} VUs: jobs may "
            "queue in front of the model stages (restart them with a higher value, see docs/benchmarks.md)"
        )
    async with harness.model_latency(s, cfg.model_latency) as latency:
        say(
            f"load {cfg.mode}: {cfg.vus} VUs, ramp-up {cfg.ramp_up_s:g}s, hold {cfg.hold_s:g}s, "
            f"ramp-down {cfg.ramp_down_s:g}s (+ up to {cfg.grace_s:g}s grace); "
            f"model latency {latency['min_s']:g}-{latency['max_s']:g}s"
        )
        cpu = harness.ServiceCpu(pids)
        started = time.time()
        await run.run()
        services = cpu.result()
    r = run.results()
    r["stages"] = await run.stage_latencies()
    return {
        "kind": "load",
        "name": cfg.name or f"load-{cfg.mode}-{cfg.vus}vu",
        "started_at": started,
        "config": {**asdict(cfg), "model_latency": latency},
        "machine": machine(),
        "services_env": env,
        "stage_concurrency": concurrency,
        "results": r,
        "services_cpu": services,
        "cpu_per_job": harness.cpu_per_job(services, r["jobs_completed"]),
        "targets": targets(cfg, r, harness.cpu_per_job(services, r["jobs_completed"])),
        "series": run.series,
    }


def stage_concurrency(env: dict[str, dict[str, str]]) -> int:
    """Jobs in flight per stage in the running workers (their env, else the settings default)."""
    value = env.get("workers", {}).get("ECO2_STAGE_CONCURRENCY")
    return int(value) if value else int(Settings.model_fields["stage_concurrency"].default)


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 5) if d else None


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.2f}%"


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def _ms_summary(values: list[float]) -> dict[str, Any]:
    return summary([v * 1000.0 for v in values], 2)


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _fmt(x: float | None, unit: str) -> str:
    return "  -  " if x is None else f"{x:.1f}{unit}"
