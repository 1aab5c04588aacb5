"""`eco2 chaos --alerts`: the alert rules in a real Prometheus, against real faults of the stack.

A Prometheus (bench/prometheus.py) scrapes the stack's processes every second with the rule
groups of deploy/monitoring/rules.yaml. First a clean SSE load: no alert may fire, and every
query of the Grafana dashboard must return data. Then, under the same load, one fault at a time:
each named alert must go pending -> firing within its `for` plus two scrape intervals, and
resolve once the fault is repaired; alerts that fire besides are listed. Loopback only, bounded:
every fault is repaired whatever happens (kill -CONT, restart through the stack table).
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from contract.settings import Settings
from contract.topics import EVENTS, FIRST_TOPIC
from eco2 import services, stack

from . import harness
from . import prometheus as prom
from .chaos import ChaosLoad, _back, _view_ready
from .load import LoadConfig, LoadRun, image_url
from .stats import machine

Out = Callable[[str], None]


@dataclass(frozen=True)
class FaultSpec:
    name: str
    what: str  # the fault as the report names it
    expect: tuple[str, ...]  # alerts that must fire (empty: see `quiet_unless`)
    hold_until_firing: bool = True  # keep the fault until the expected alerts fire (or time out)


FAULTS: dict[str, FaultSpec] = {
    f.name: f
    for f in (
        FaultSpec(
            "poison",
            "3 non-JSON records on scan.vision and 3 on scan.events",
            ("Eco2DeadLetters", "Eco2WriterDeadLetters"),
            hold_until_firing=False,
        ),  # fmt: skip
        FaultSpec("stall", "stage workers frozen (SIGSTOP), then SIGCONT", ("Eco2ConsumerDown",)),
        FaultSpec("router", "router killed (SIGKILL) under load, then restarted", ("Eco2ConsumerDown",)),
        FaultSpec("writer", "writer killed (SIGKILL) under load, then restarted", ("Eco2ConsumerDown",)),
        FaultSpec("redis", "Redis killed (SIGKILL), then restarted (AOF)", ("Eco2RouterRedisErrors",)),
        FaultSpec("kafka", "Kafka stopped under load, new users POSTing 2/s, then started", ("Eco2Api5xx",)),
        # The view lost: the alert is for a rebuild longer than its `for`; a shorter one must
        # leave it quiet. Judged against the rebuild's own duration (eco2_view_rebuild_last_seconds).
        FaultSpec("flush", "Redis FLUSHALL (the view lost; the router rebuilds it)", (), False),
    )
}


@dataclass
class AlertsConfig:
    vus: int = 30
    clean_s: float = 90.0  # the clean load's hold
    model_latency: tuple[float, float] | None = (1.0, 2.0)
    interval_s: float = 1.0  # scrape and evaluation
    for_cap_s: float | None = 60.0  # the real `for` where it is 1 min or less
    # The view's rebuild after a FLUSHALL lasts seconds on a local log (a minute per ~day of
    # events): with the deployed 1 min the flush could only show the alert staying quiet.
    for_by_alert: dict[str, float] = field(default_factory=lambda: {"Eco2RedisViewRebuilding": 5.0})
    window_cap_s: float | None = 60.0
    faults: tuple[str, ...] = tuple(FAULTS)
    resolve_timeout_s: float = 240.0
    quiet_timeout_s: float = 180.0  # between faults: until no alert is active
    name: str = ""
    progress: bool = False


@dataclass
class AlertResult:
    alert: str
    for_s: float
    pending_s: float | None  # since the fault
    firing_s: float | None
    pending_to_firing_s: float | None
    resolved_after_repair_s: float | None
    labels: list[dict[str, str]] = field(default_factory=list)
    verdict: str = "MISS"


@dataclass
class FaultResult:
    fault: str
    what: str
    repaired_at_s: float | None = None  # since the fault
    alerts: list[AlertResult] = field(default_factory=list)
    also_fired: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    also_pending: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # never firing
    note: str = ""
    error: str | None = None


def judge(
    fors: dict[str, float], interval_s: float, name: str, seen: prom.Seen | None, repaired: float | None
) -> AlertResult:
    """An expected alert's verdict: pending -> firing within `for` + 2 scrape intervals of its
    pending, and gone after the repair."""
    f = fors[name]
    r = AlertResult(name, f, None, None, None, None)
    if seen is None:
        return r
    r.labels = seen.labels
    r.pending_s = _r(seen.pending_s)
    r.firing_s = _r(seen.firing_s)
    if seen.pending_s is not None and seen.firing_s is not None:
        r.pending_to_firing_s = _r(seen.firing_s - seen.pending_s)
    if seen.resolved_s is not None and repaired is not None:
        r.resolved_after_repair_s = _r(max(seen.resolved_s - repaired, 0.0))
    in_time = r.pending_to_firing_s is not None and r.pending_to_firing_s <= f + 2 * interval_s
    r.verdict = "PASS" if in_time and r.resolved_after_repair_s is not None else "MISS"
    return r


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


# --- the faults -----------------------------------------------------------------------------


async def _poison(s: Settings) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(FIRST_TOPIC, b"not json", key=f"alerts-poison-{i}".encode())
            await producer.send_and_wait(EVENTS, b"not json", key=f"alerts-poison-{i}".encode())
    finally:
        await producer.stop()


def _signal(s: Settings, name: str, sig: int) -> None:
    pid = stack.read_pid(s, services.find(name))
    if pid is None:
        raise harness.BenchError(f"{name} is not running")
    os.killpg(pid, sig)


async def _kill(s: Settings, name: str) -> None:
    svc = services.find(name)
    _signal(s, name, signal.SIGKILL)
    while stack.read_pid(s, svc) is not None:
        await asyncio.sleep(0.05)


async def inject(s: Settings, fault: str) -> Callable[[], Awaitable[str]]:
    """Start `fault`; returns its repair (which returns a note)."""
    if fault == "poison":
        await _poison(s)
        return _noop
    if fault == "stall":
        _signal(s, "workers", signal.SIGSTOP)

        async def cont() -> str:
            _signal(s, "workers", signal.SIGCONT)
            return ""

        return cont
    if fault in ("router", "writer", "redis"):
        await _kill(s, fault)

        async def restart() -> str:
            t0 = time.monotonic()
            back = await _back(s, fault, t0, 120.0)
            return f"{fault} back in {back:.1f}s"

        return restart
    if fault == "kafka":
        # New users keep arriving while the VUs already in the system wait on their streams
        # (closed-loop VUs alone may post nothing for minutes during the outage).
        statuses: collections.Counter[str] = collections.Counter()
        arrivals = asyncio.create_task(_arrivals(s, statuses))
        await asyncio.to_thread(stack.stop, s, services.find("kafka"))

        async def start() -> str:
            t0 = time.monotonic()
            try:
                back = await _back(s, "kafka", t0, 180.0)
            finally:
                arrivals.cancel()
                await asyncio.gather(arrivals, return_exceptions=True)
            answers = ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items()))
            return f"kafka back in {back:.1f}s; arrivals' POSTs: {answers}" + await _consumers_resume(s)

        return start
    if fault == "flush":
        t0 = time.monotonic()
        r = aioredis.from_url(s.redis_url)
        try:
            await r.flushall()
        finally:
            await r.aclose()
        ready = await _view_ready(s, t0, 120.0)
        note = f"view ready again {ready:.2f}s after FLUSHALL"

        async def rebuilt() -> str:
            return note

        return rebuilt
    raise harness.BenchError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")


async def _arrivals(s: Settings, statuses: collections.Counter[str], every_s: float = 0.5) -> None:
    """A new user's POST every `every_s` (each its own request, whatever the previous one does)."""
    tasks: set[asyncio.Task[None]] = set()
    async with httpx.AsyncClient(base_url=s.api_url, timeout=30) as client:

        async def one(n: int) -> None:
            body = {"image_url": image_url(10_000 + n, n)}
            try:
                r = await client.post("/api/v1/scan", json=body, headers={"X-User-ID": f"alerts-arrival-{n}"})
                statuses[f"HTTP {r.status_code}"] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

        n = 0
        try:
            while True:
                task = asyncio.create_task(one(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                n += 1
                await asyncio.sleep(every_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _consumers_resume(s: Settings, watch_s: float = 45.0, idle_s: float = 15.0) -> str:
    """After Kafka is back: every consumer must keep fetching or committing. A rebalance resets
    the stall clock, so one early look proves nothing: after `watch_s`, a consumer with work
    pending and no fetch or commit for `idle_s` is stalled (its /health fails only after
    ECO2_HEALTH_STALL_S, then Eco2ConsumerUnhealthy fires and the kubelet restarts it). It is
    named in the note and restarted here, as the kubelet would."""
    await asyncio.sleep(watch_s)
    stalled: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for t in (t for t in prom.targets(s) if t.job == "eco2-consumers"):
            try:
                body = (await client.get(f"http://{t.address}/health")).json()
            except (httpx.HTTPError, ValueError) as exc:
                stalled[t.pod] = type(exc).__name__
                continue
            if body.get("pending", 0) and body.get("since_progress_s", 0) > idle_s:
                stalled[t.pod] = (
                    f"{body['pending']} pending, no fetch or commit for {body['since_progress_s']:.0f}s"
                )
    if not stalled:
        return f"; every consumer still progressing {watch_s:.0f}s after Kafka was back"
    for pod in stalled:
        await _kill(s, pod)
        await _back(s, pod, time.monotonic(), 120.0)
    listed = "; ".join(f"{p}: {v}" for p, v in stalled.items())
    return f"; STALLED {watch_s:.0f}s after Kafka was back, restarted: {listed}"


async def _noop() -> str:
    return ""


# --- the run --------------------------------------------------------------------------------


async def _all_up(p: prom.Prometheus, timeout_s: float) -> dict[str, bool]:
    """Every target's health once all are up, or as it stands at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        up = await p.targets_up()
        if (up and all(up.values())) or time.monotonic() > deadline:
            return up
        await asyncio.sleep(0.5)


async def _quiet(watch: prom.Watch, timeout_s: float) -> list[str]:
    """Wait until no alert is active; returns those still active at the timeout."""
    deadline = time.monotonic() + timeout_s
    while watch.active and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return sorted(watch.active)


async def clean_phase(
    s: Settings, p: prom.Prometheus, watch: prom.Watch, cfg: AlertsConfig, out: Out
) -> dict[str, Any]:
    """The clean load: alerts seen (must be none) and the dashboard's queries at its end."""
    load_cfg = LoadConfig(
        vus=cfg.vus, ramp_up_s=10.0, hold_s=cfg.clean_s, ramp_down_s=5.0, mode="sse",
        job_timeout_s=120.0, grace_s=60.0, model_latency=cfg.model_latency, progress=cfg.progress,
    )  # fmt: skip
    load = LoadRun(s, load_cfg, out)
    watch.mark()
    running = asyncio.create_task(load.run())
    await asyncio.sleep(load_cfg.ramp_up_s + cfg.clean_s - 5.0)
    panels: dict[str, int] = {}
    for title, expr in prom.dashboard_queries().items():
        # Data = a series with a number (0 is a line on the panel; NaN, e.g. a quantile of
        # nothing, is not).
        rows = await p.query(expr)
        panels[title] = sum(1 for row in rows if not math.isnan(float(row["value"][1])))
    await running
    r = load.results()
    seen = {name: asdict(v) for name, v in watch.seen.items()}
    return {
        "jobs_completed": r["jobs_completed"],
        "jobs_failed": r["jobs_failed"],
        "post_errors": dict(r["post_errors"]),
        "alerts_seen": seen,
        "panels_series": panels,
        "panels_empty": sorted(t for t, n in panels.items() if n == 0),
    }


async def fault_phase(
    s: Settings, p: prom.Prometheus, watch: prom.Watch, fors: dict[str, float], cfg: AlertsConfig, out: Out
) -> list[FaultResult]:
    results = []
    for name in cfg.faults:
        spec = FAULTS[name]
        still = await _quiet(watch, cfg.quiet_timeout_s)
        res = FaultResult(name, spec.what)
        if still:
            res.note = f"still active before the fault: {', '.join(still)}. "
        out(f"alerts: fault {name}: {spec.what}")
        watch.mark()
        repair: Callable[[], Awaitable[str]] = _noop
        try:
            repair = await inject(s, name)
            if spec.hold_until_firing:
                timeout = max((fors[a] for a in spec.expect), default=0.0) + 90.0
                await asyncio.gather(*(watch.until(a, "firing", timeout) for a in spec.expect))
        except (harness.BenchError, stack.StackError, OSError) as exc:
            res.error = str(exc)[:300]
        finally:
            res.note += await asyncio.shield(repair())
        res.repaired_at_s = _r(watch.now())
        if not spec.hold_until_firing:
            await asyncio.gather(*(watch.until(a, "firing", fors[a] + 60.0) for a in spec.expect))
        await asyncio.gather(*(watch.until(a, "resolved", cfg.resolve_timeout_s) for a in spec.expect))
        res.alerts = [
            judge(fors, cfg.interval_s, a, watch.seen.get(a), res.repaired_at_s) for a in spec.expect
        ]
        if name == "flush":
            await asyncio.sleep(3 * cfg.interval_s)  # the rebuild's duration scraped
            res.note += await _judge_flush(p, watch, fors, cfg.interval_s, res)
        others = {
            a: v for a, v in watch.seen.items() if a not in (*spec.expect, *(x.alert for x in res.alerts))
        }
        res.also_fired = {a: v.labels for a, v in others.items() if v.firing_s is not None}
        res.also_pending = {a: v.labels for a, v in others.items() if v.firing_s is None}
        for a in res.alerts:
            out(
                f"alerts: {name}: {a.alert} {a.verdict}: pending {a.pending_s}s, firing {a.firing_s}s "
                f"(for {a.for_s:g}s), resolved {a.resolved_after_repair_s}s after the repair"
            )
        if res.also_fired:
            out(f"alerts: {name}: also fired {', '.join(res.also_fired)}")
        results.append(res)
    return results


async def _judge_flush(
    p: prom.Prometheus, watch: prom.Watch, fors: dict[str, float], interval_s: float, res: FaultResult
) -> str:
    """Eco2RedisViewRebuilding must fire iff the rebuild outlasted its `for` (and then resolve
    once the view is back)."""
    name = "Eco2RedisViewRebuilding"
    if name in watch.seen:
        await watch.until(name, "resolved", 30.0)
    rows = await p.query("max(eco2_view_rebuild_last_seconds)")
    took = round(float(rows[0]["value"][1]), 2) if rows else None
    seen = watch.seen.get(name)
    fired = seen is not None and seen.firing_s is not None
    should = took is not None and took > fors[name]
    r = judge(fors, interval_s, name, seen, res.repaired_at_s)
    if not should:
        r.verdict = "PASS" if took is not None and not fired else "MISS"
    res.alerts.append(r)
    state = "fired" if fired else "quiet"
    right = r.verdict == "PASS"
    return f"; last rebuild {took}s vs for {fors[name]:g}s: {state}" + (
        " as it should" if right else ", WRONG"
    )


async def run_alerts(s: Settings, cfg: AlertsConfig, out: Out = print) -> dict[str, Any]:
    needed = ["kafka", "redis", "postgres", "api", "workers", "model", "router", "gateway", "writer"]
    await harness.require(s, needed)
    for f in cfg.faults:
        if f not in FAULTS:
            raise harness.BenchError(f"unknown fault {f!r}; choose from {', '.join(FAULTS)}")
    harness.raise_fd_limit()
    caps = prom.Caps(cfg.for_cap_s, cfg.window_cap_s, cfg.for_by_alert)
    rules, changes = prom.render_rules(prom.rule_groups(), caps)
    fors = prom.alert_fors(rules)
    started = time.time()
    async with (
        harness.model_latency(s, cfg.model_latency) as latency,
        prom.running(s, rules, cfg.interval_s) as p,
    ):
        out(
            f"alerts: Prometheus at {p.url}, scrape/evaluation every {cfg.interval_s:g}s; {len(changes)} caps"
        )
        up = await _all_up(p, 30.0)
        health = await p.rule_health()
        watch = prom.Watch(p)
        watch.start()
        try:
            out(f"alerts: clean load, {cfg.vus} SSE VUs for {cfg.clean_s:g}s")
            clean = await clean_phase(s, p, watch, cfg, out)
            out(
                f"alerts: clean: alerts seen {list(clean['alerts_seen']) or 'none'}; "
                f"empty panels {clean['panels_empty'] or 'none'}"
            )
            load_cfg = LoadConfig(
                vus=cfg.vus, ramp_up_s=5.0, hold_s=3600.0, ramp_down_s=1.0, mode="sse",
                job_timeout_s=240.0, grace_s=5.0, model_latency=cfg.model_latency, progress=cfg.progress,
            )  # fmt: skip
            load = ChaosLoad(s, load_cfg, out)
            background = asyncio.create_task(load.run())
            try:
                await asyncio.sleep(10.0)
                faults = await fault_phase(s, p, watch, fors, cfg, out)
            finally:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
                for name in needed:  # whatever happened: leave the stack up
                    svc = services.find(name)
                    pid = stack.read_pid(s, svc)
                    if pid is None:
                        await _back(s, name, time.monotonic(), 180.0)
                    else:
                        os.killpg(pid, signal.SIGCONT)
        finally:
            await watch.stop()
    return report(cfg, started, latency, changes, up, health, clean, faults, sorted(watch.ever))


def report(
    cfg: AlertsConfig,
    started: float,
    latency: dict[str, float],
    changes: list[prom.Change],
    up: dict[str, bool],
    health: dict[str, str],
    clean: dict[str, Any],
    faults: list[FaultResult],
    ever: list[str],
) -> dict[str, Any]:
    fired_clean = sorted(a for a, v in clean["alerts_seen"].items() if v["firing_s"] is not None)
    checked = [a for f in faults for a in f.alerts]
    targets = [
        _target(
            "scrape targets up at the start", f"{len(up)}", sum(up.values()), bool(up) and all(up.values())
        ),
        _target(
            "rules evaluated without error",
            f"{len(health)}",
            sum(h == "ok" for h in health.values()),
            all(h == "ok" for h in health.values()),
        ),  # fmt: skip
        _target("alerts firing during the clean load", "0", len(fired_clean), not fired_clean),
        _target(
            "dashboard queries without data during the load",
            "0",
            len(clean["panels_empty"]),
            not clean["panels_empty"],
        ),  # fmt: skip
        *[
            _target(
                f"{f.fault}: {a.alert} pending -> firing within for + 2 scrapes, resolved after the repair",
                f"<= {a.for_s + 2 * cfg.interval_s:g}s",
                a.pending_to_firing_s,
                a.verdict == "PASS",
            )  # fmt: skip
            for f in faults
            for a in f.alerts
        ],
    ]
    return {
        "kind": "alerts",
        "name": cfg.name or "chaos-alerts",
        "title": "Alerts in a real Prometheus: quiet on a clean load, firing on real faults",
        "description": (
            f"Debian's Prometheus scraping the stack every {cfg.interval_s:g}s with the rule groups of "
            "deploy/monitoring/rules.yaml"
            + (", `for` capped at " + f"{cfg.for_cap_s:g}s" if cfg.for_cap_s is not None else "")
            + (f", range windows capped at {cfg.window_cap_s:g}s" if cfg.window_cap_s is not None else "")
            + f"; {cfg.vus} SSE VUs. Shared 2-core box: times are noisy."
        ),  # fmt: skip
        "started_at": started,
        "config": {**asdict(cfg), "faults": ",".join(cfg.faults), "model_latency": latency},
        "machine": machine(),
        "rendered_changes": [asdict(c) for c in changes],
        "results": {
            "targets_up": up,
            "rule_health": health,
            "clean": clean,
            "faults": [asdict(f) for f in faults],
            "alerts_exercised": sorted({a.alert for a in checked}),
            "alerts_seen_anywhere": ever,
        },
        "targets": targets,
    }


def _target(name: str, goal: str, measured: Any, ok: bool) -> dict[str, Any]:
    return {"target": name, "goal": goal, "measured": measured, "verdict": "PASS" if ok else "MISS"}


def markdown(report: dict[str, Any]) -> list[str]:
    r = report["results"]
    lines = [f"# {report['title']}", "", report["description"], ""]
    if report["rendered_changes"]:
        lines += ["Rendered with caps (the deployed values in the first column):", "",
                  "| alert | what | deployed | in this run |", "|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {c['alert']} | {c['what']} | {c['real']} | {c['rendered']} |"
            for c in report["rendered_changes"]
        ]
        lines.append("")
    c = r["clean"]
    lines += [
        "## Clean load",
        "",
        f"{c['jobs_completed']} jobs completed, {c['jobs_failed']} failed; alerts seen: "
        + (", ".join(f"{a} ({_state(v)})" for a, v in c["alerts_seen"].items()) or "none")
        + ".",
        "",
        "| dashboard query | series with a value |",
        "|---|---|",
        *[f"| {t} | {n} |" for t, n in c["panels_series"].items()],
        "",
        "## Faults",
        "",
        "| fault | alert | for (s) | pending (s after the fault) | firing (s) | pending -> firing (s) "
        "| resolved (s after the repair) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for f in r["faults"]:
        for a in f["alerts"]:
            lines.append(
                f"| {f['fault']} | {a['alert']} | {a['for_s']:g} | {_v(a['pending_s'])} "
                f"| {_v(a['firing_s'])} | "
                f"{_v(a['pending_to_firing_s'])} | {_v(a['resolved_after_repair_s'])} | {a['verdict']} |"
            )
    lines += [
        "",
        "| fault | what | repaired at (s) | also fired | also pending (never firing) | note |",
        "|---|---|---|---|---|---|",
    ]
    for f in r["faults"]:
        also = ", ".join(f"{a} {_labels(v)}" for a, v in f["also_fired"].items()) or "-"
        pending = ", ".join(f"{a} {_labels(v)}" for a, v in f.get("also_pending", {}).items()) or "-"
        lines.append(
            f"| {f['fault']} | {f['what']} | {_v(f['repaired_at_s'])} | {also} | {pending} | {f['note']}"
            + (f" ERROR {f['error']}" if f["error"] else "")
            + " |"
        )
    lines += ["", "## Targets", "", "| target | goal | measured | verdict |", "|---|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['goal']} | {t['measured']} | {t['verdict']} |" for t in report["targets"]
    ]
    return [*lines, ""]


def _labels(labels: list[dict[str, str]]) -> str:
    return "; ".join(",".join(f"{k}={v}" for k, v in sorted(x.items())) for x in labels)


def _state(seen: dict[str, Any]) -> str:
    return "firing" if seen["firing_s"] is not None else "pending"


def _v(x: Any) -> str:
    return "-" if x is None else f"{x:g}"
