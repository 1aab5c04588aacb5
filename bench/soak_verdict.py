"""What the soak concludes from its samples and jobs (`judge`, pure: unit-tested on synthetic
data), and its markdown report."""

from __future__ import annotations

import time
from typing import Any

from . import md
from .load import Job, check_seqs
from .soak_config import SoakConfig
from .stats import percentile

APP_PROCESSES = ("api", "workers", "router", "writer", "gateway", "model")
# Redis keys one job may leave: state, history, and memos (8 started/completed events, done or
# failed, 4 stage outputs). Idempotency keys only with X-Idempotency-Key, which the soak never sends.
KEYS_PER_JOB_MAX = {"scan:state": 1, "scan:history": 1, "scan:memo": 13, "scan:idem": 1}

# Growth tolerances, per hour of the fitted slope over the steady part of the run: a series is
# "flat" when it grows by at most max(relative x its median, absolute) per hour.
TOLERANCE: dict[str, tuple[float, float, str]] = {
    "rss_mib": (0.10, 32.0, "MiB"),
    "fds": (0.05, 10.0, "fds"),
    "tasks": (0.05, 50.0, "tasks"),
}
# After the run has drained, tasks and fds of the app processes are back at their idle level
# before the run, within max(relative, absolute).
IDLE_SLACK = (0.05, 5.0)
# Series whose growth is expected, and judged elsewhere (the generator's, any, is never judged: it
# keeps every job for the report).
NOT_JUDGED = {"rss_mib:redis": "Redis holds the jobs' keys until their TTLs: see the Redis targets"}
GROWTH_MIN_SPAN_S = 120.0  # a shorter fit is not extrapolated to an hour
WINDOW_MAX_S = 600.0  # the first/last window compared: 10 minutes, or a third of a shorter steady part


def expected_outcome(job: Job) -> str:
    return "failed" if job.fault == "permanent" else "completed"


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Theil-Sen slope of (seconds, value) points, in value per hour: the median of the slopes
    between every pair of points. A leak (steady growth) shows in full; a single step, such as a
    connection pool growing once to a new size or the JVM heap filling, moves it only when the
    step sits in the middle of the span, where least squares would read any step as a trend."""
    if len(points) < 3:
        return None
    slopes = [
        (b[1] - a[1]) / (b[0] - a[0]) for i, a in enumerate(points) for b in points[i + 1 :] if b[0] != a[0]
    ]
    mid = percentile(slopes, 50)
    return None if mid is None else mid * 3600.0


def windows(steady_from: float, steady_to: float) -> dict[str, Any]:
    """The first and last window of the steady part: 10 minutes each, or thirds when shorter."""
    span = max(steady_to - steady_from, 0.0)
    w = min(WINDOW_MAX_S, span / 3)
    rule = "first/last 10 min" if w == WINDOW_MAX_S else "first/last third of the steady part"
    return {
        "steady": [round(steady_from, 1), round(steady_to, 1)],
        "first": [round(steady_from, 1), round(steady_from + w, 1)],
        "last": [round(steady_to - w, 1), round(steady_to, 1)],
        "window_s": round(w, 1),
        "rule": rule,
    }


def _median(xs: list[float]) -> float:
    return percentile(xs, 50) or 0.0


def growth(rows: list[dict[str, Any]], col: str, t0: float, t1: float) -> dict[str, Any] | None:
    """Fitted growth per hour of one series over [t0, t1] and its verdict against TOLERANCE."""
    kind = col.split(":", 1)[0]
    pts = [(r["t"], float(r[col])) for r in rows if t0 <= r["t"] <= t1 and r.get(col) is not None]
    slope = slope_per_hour(pts)
    if slope is None:
        return None
    rel, absolute, unit = TOLERANCE[kind]
    med = _median([v for _, v in pts])
    limit = max(rel * med, absolute)
    return {
        "median": round(med, 1),
        "first": pts[0][1],
        "last": pts[-1][1],
        "slope_per_h": round(slope, 2),
        "limit_per_h": round(limit, 1),
        "unit": unit,
        "flat": slope <= limit,
    }


def growth_verdicts(
    rows: list[dict[str, Any]], t0: float, t1: float, judged: bool = True
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Growth of every process series over [t0, t1] and one flatness target per kind of series
    (`judged` False: reported, verdict n/a)."""
    series: dict[str, dict[str, Any]] = {}
    for col in sorted({c for r in rows for c in r if c.split(":", 1)[0] in TOLERANCE}):
        g = growth(rows, col, t0, t1)
        if g is not None:
            series[col] = g
    mine_all = {c: g for c, g in series.items() if c not in NOT_JUDGED and not c.endswith(":generator")}
    targets = []
    for kind, (rel, absolute, unit) in TOLERANCE.items():
        mine = {c: g for c, g in mine_all.items() if c.startswith(kind + ":")}
        bad = [
            f"{c.split(':', 1)[1]} {g['slope_per_h']:+g} {unit}/h" for c, g in mine.items() if not g["flat"]
        ]
        worst = max(mine.items(), key=lambda kv: kv[1]["slope_per_h"] / kv[1]["limit_per_h"], default=None)
        if not judged:
            measured: str | None = f"fit span {t1 - t0:.0f} s < {GROWTH_MIN_SPAN_S:g} s: not judged"
        elif bad:
            measured = "; ".join(bad)
        elif worst:
            measured = f"all flat; steepest {worst[0].split(':', 1)[1]} {worst[1]['slope_per_h']:+g} {unit}/h"
        else:
            measured = None
        targets.append(
            {
                "target": f"{kind} flat per process",
                "goal": f"fitted growth <= max({rel:.0%} of median, {absolute:g} {unit}) per hour",
                "measured": measured,
                "verdict": "n/a" if not mine or not judged else ("MISS" if bad else "PASS"),
            }
        )
    return series, targets


def kafka_level(
    rows: list[dict[str, Any]], duration_s: float, retention_s: dict[str, float] | None
) -> dict[str, Any]:
    """Where each topic's log levels off: bytes added per second during the run x its retention
    (deletion keeps about that much; segments roll, so a little more)."""
    per: dict[str, dict[str, float]] = {}
    for topic, keep in (retention_s or {}).items():
        vals = [r[f"kafka_mib:{topic}"] for r in rows if r.get(f"kafka_mib:{topic}") is not None]
        if len(vals) < 2:
            continue
        rate = max(vals[-1] - vals[0], 0.0) / max(duration_s, 1e-6)  # MiB/s
        per[topic] = {
            "mib_per_min": round(rate * 60, 3),
            "retention_days": round(keep / 86400, 2),
            "level_gib": round(rate * keep / 1024, 2),
        }
    return {"per_topic": per, "total_bytes": round(sum(v["level_gib"] for v in per.values()) * 2**30)}


def _pct_change(first: float | None, last: float | None) -> float | None:
    if first is None or last is None or first == 0:
        return None
    return (last - first) / first


def _window_stats(jobs: list[Job], start_m: float, w: list[float]) -> dict[str, Any]:
    done = [
        j
        for j in jobs
        if j.done_m is not None and j.status == "completed" and w[0] <= j.done_m - start_m < w[1]
    ]
    minutes = max(w[1] - w[0], 1e-6) / 60.0
    e2e = [j.e2e_s for j in done if j.e2e_s is not None]
    return {
        "completed": len(done),
        "throughput_jpm": round(len(done) / minutes, 1),
        "e2e_p95_s": None if not e2e else round(percentile(e2e, 95) or 0.0, 3),
    }


def _idle(rows: list[dict[str, Any]], col: str) -> float | None:
    vals = [r[col] for r in rows if r.get(col) is not None]
    return _median(vals) if vals else None


def judge(
    *,
    jobs: list[Job],
    start_m: float,
    cfg: SoakConfig,
    rows: list[dict[str, Any]],
    idle_before: list[dict[str, Any]],
    idle_after: list[dict[str, Any]],
    key_scans: dict[str, dict[str, Any]],
    lag_after: dict[str, Any],
    ttl_limits: dict[str, int],
    memory_budget: dict[str, Any],
    retention_s: dict[str, float] | None = None,
    disk_budget: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every verdict of the soak from what was measured (pure: unit-tested on synthetic data)."""
    targets: list[dict[str, Any]] = []

    def add(name: str, goal: str, measured: Any, ok: bool | None) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        targets.append({"target": name, "goal": goal, "measured": measured, "verdict": verdict})

    accepted = [j for j in jobs if j.job_id is not None]
    as_expected = [j for j in accepted if j.status == expected_outcome(j)]
    rate = len(as_expected) / len(accepted) if accepted else None
    add(
        "completion",
        ">= 99.9% of jobs reach their expected end (permanent faults: failed; others: completed)",
        None if rate is None else f"{100 * rate:.2f}% ({len(as_expected):,} / {len(accepted):,})",
        None if rate is None else rate >= 0.999,
    )
    followed = [
        j for j in accepted if j.status in ("completed", "failed") and j.seqs is not None
    ]  # abandoned streams are not checked: their client left on purpose
    checks = [check_seqs(j.seqs or [], j.failed_stage) for j in followed]
    lost = sum(c["lost"] + c["unexpected"] for c in checks)
    dup = sum(c["duplicated"] for c in checks)
    resumed = sum(1 for j in followed if j.kind == "resume")
    add(
        "SSE lost/duplicated events",
        "0 (incl. streams resumed with Last-Event-ID)",
        f"{lost} lost / {dup} duplicated over {len(followed):,} streams ({resumed:,} resumed)",
        (lost + dup == 0) if followed else None,
    )

    # Steady part: after the ramp-up plus one E2E p95 (VUs' first iterations), until the ramp-down.
    e2e_all = [j.e2e_s for j in accepted if j.status == "completed" and j.e2e_s is not None]
    warm = percentile(e2e_all, 95) or 0.0
    steady_to = cfg.duration_s - cfg.ramp_down_s
    win = windows(cfg.ramp_up_s + warm, steady_to)
    first = _window_stats(jobs, start_m, win["first"])
    last = _window_stats(jobs, start_m, win["last"])
    ok_window = win["window_s"] >= 30 and first["completed"] >= 10
    for what, key, unit, extra in (
        ("throughput", "throughput_jpm", " jobs/min", f", {win['window_s']:g} s each"),
        ("E2E p95", "e2e_p95_s", " s", ""),
    ):
        d = _pct_change(first[key], last[key])
        add(
            f"{what}, last vs first window",
            f"within 5% ({win['rule']}{extra})",
            f"{first[key]} -> {last[key]}{unit}" + ("" if d is None else f" ({100 * d:+.1f}%)"),
            None if d is None or not ok_window else abs(d) <= 0.05,
        )

    # Growth of every process series, fitted from the end of the first window to the end of the
    # steady part: during the first window pools, allocators and the JVM heap still grow to their
    # working size. Too short a span to extrapolate to an hour is not judged.
    t0, t1 = win["first"][1], win["steady"][1]
    fit_ok = t1 - t0 >= GROWTH_MIN_SPAN_S
    series, growth_targets = growth_verdicts(rows, t0, t1, fit_ok)
    targets += growth_targets

    # Tasks of the app processes back at their idle level once the run has drained (fds are
    # shown too, not judged: connection pools to Redis, Kafka and the model legitimately stay
    # open at the size the load needed; their growth under load is judged above).
    back: dict[str, dict[str, Any]] = {}
    for kind in ("tasks", "fds"):
        for proc in APP_PROCESSES:
            col = f"{kind}:{proc}"
            before, after = _idle(idle_before, col), _idle(idle_after, col)
            if before is None or after is None:
                continue
            limit = before + max(IDLE_SLACK[0] * before, IDLE_SLACK[1])
            back[col] = {"before": before, "after": after, "limit": round(limit, 1), "ok": after <= limit}
    judged_idle = {c: v for c, v in back.items() if c.startswith("tasks:")}
    bad_idle = [f"{c} {v['before']:g} -> {v['after']:g}" for c, v in judged_idle.items() if not v["ok"]]
    add(
        "asyncio tasks back at idle after the run",
        f"<= idle before + max({IDLE_SLACK[0]:.0%}, {IDLE_SLACK[1]:g}) per app process",
        "; ".join(bad_idle) or (f"all {len(judged_idle)} processes back" if judged_idle else None),
        None if not judged_idle else not bad_idle,
    )

    # Redis: every key expires, none outlives its TTL, each job leaves a bounded number of keys,
    # and what the TTLs let accumulate at this rate fits the memory Redis may use.
    keys_verdict: dict[str, Any] = {}
    end = key_scans.get("end") or {}
    run = end.get("run")
    if run is not None and accepted:
        per_job = {p: round(v["keys"] / len(accepted), 2) for p, v in run.items()}
        over = [p for p, k in per_job.items() if k > KEYS_PER_JOB_MAX.get(p, 0)]
        too_long = [
            p
            for p, v in run.items()
            if (v["ttl_max_s"] or 0) > ttl_limits.get(p, 0) or v["ttl_max_s"] is None
        ]
        # At a steady rate each prefix levels off at (keys per second) x (their lifetime, the p90
        # of the TTLs seen at the end) x (bytes per key).
        level = {
            p: v["keys"] / max(cfg.duration_s, 1e-6) * (v["ttl_p90_s"] or 0) * (v["bytes_avg"] or 0)
            for p, v in run.items()
        }
        total = sum(level.values())
        keys_verdict = {
            "per_job": per_job,
            "per_job_max": KEYS_PER_JOB_MAX,
            "run": run,
            "ttl_limits": ttl_limits,
            "no_ttl_keys": end["no_ttl"],
            "level_bytes": {p: round(b) for p, b in level.items()},
            "level_total_bytes": round(total),
            "budget": memory_budget,
        }
        add(
            "Redis keys bounded by their TTLs",
            "no key without a TTL; TTL <= "
            + ", ".join(f"{p} {s / 3600:g} h" for p, s in ttl_limits.items())
            + "; keys per job <= "
            + ", ".join(f"{p} {n}" for p, n in KEYS_PER_JOB_MAX.items()),
            f"{end['no_ttl']} without TTL (of {end['checked']} checked); longest TTL "
            + ", ".join(f"{p} {(v['ttl_max_s'] or 0) / 3600:.2f} h" for p, v in sorted(run.items()))
            + "; per job "
            + ", ".join(f"{p} {k:g}" for p, k in sorted(per_job.items())),
            not over and not too_long and end["no_ttl"] == 0,
        )
        add(
            "Redis memory where the TTLs level it",
            f"<= {memory_budget['bytes'] / 2**30:.1f} GiB ({memory_budget['rule']})",
            f"{total / 2**30:.2f} GiB at {len(accepted) / max(cfg.duration_s, 1e-6) * 60:.0f} jobs/min ("
            + ", ".join(
                f"{p} {v['bytes_avg'] or 0:,} B x {(v['ttl_p90_s'] or 0) / 3600:.1f} h"
                for p, v in sorted(run.items())
            )
            + ")",
            total <= memory_budget["bytes"],
        )
    add(
        "consumer lag back to zero after the run",
        f"every group at 0 within {cfg.drain_timeout_s:g} s",
        ", ".join(f"{g} {n}" for g, n in (lag_after.get("lag") or {}).items())
        + (f" after {lag_after.get('waited_s')} s" if lag_after.get("lag") is not None else ""),
        None if lag_after.get("lag") is None else lag_after.get("zero", False),
    )
    storage = kafka_level(rows, cfg.duration_s, retention_s)
    if storage["per_topic"] and disk_budget is not None:
        add(
            "Kafka logs where retention levels them",
            f"<= {disk_budget['bytes'] / 2**30:,.0f} GiB ({disk_budget['rule']})",
            f"{storage['total_bytes'] / 2**30:,.1f} GiB at this rate ("
            + ", ".join(
                f"{tp} {v['mib_per_min']:.2f} MiB/min x {v['retention_days']:g} d"
                for tp, v in storage["per_topic"].items()
                if v["mib_per_min"] > 0
            )
            + ")",
            storage["total_bytes"] <= disk_budget["bytes"],
        )
    return {
        "targets": targets,
        "storage": storage,
        "windows": {**win, "warm_up_s": round(warm, 1), "first_stats": first, "last_stats": last},
        "growth": series,
        "idle": back,
        "growth_fit": [round(t0, 1), round(t1, 1)],
        "growth_judged": fit_ok,
        "redis_keys": keys_verdict,
    }


# --- markdown ------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> list[str]:

    c, r = report["config"], report["results"]
    lat = c["model_latency"]
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(report["started_at"]))
    w = r["windows"]
    lines = [
        f"# Soak `{report['name']}` ({when})",
        "",
        f"- Scenario: {c['vus']} VUs for {c['duration_s']:g} s (ramp up {c['ramp_up_s']:g} s, down "
        f"{c['ramp_down_s']:g} s), each VU loops POST scan -> follow its SSE stream -> repeat; "
        f"{c['resume_share']:.0%} of streams dropped mid-job and resumed with Last-Event-ID, "
        f"{c['abandon_share']:.0%} abandoned (result fetched from the API instead); model faults "
        f"permanent {c['permanent_share']:.0%}, transient2 {c['transient_share']:.0%}, "
        f"gaps {c['gaps_share']:.0%}.",
        f"- Simulated model latency: {lat['min_s']:g}-{lat['max_s']:g} s per call.",
        f"- Sampled every {c['sample_every_s']:g} s; Redis keys by prefix every "
        f"{c['key_scan_every'] * c['sample_every_s']:g} s.",
        f"- Windows compared: {w['rule']} ({w['window_s']:g} s each); steady part {w['steady'][0]:g}-"
        f"{w['steady'][1]:g} s (after ramp-up + one E2E p95 of warm-up, {w['warm_up_s']:g} s).",
        f"- Machine: {md.machine(report['machine'])}.",
        "",
    ]
    lines += md.targets(report)
    rows = [
        [
            "jobs submitted / completed / failed",
            f"{r['jobs_submitted']:,} / {r['jobs_completed']:,} / {r['jobs_failed']:,}",
        ],
        ["jobs by outcome", ", ".join(f"{k} {v:,}" for k, v in sorted(r["jobs_by_status"].items()))],
        ["by client behaviour", ", ".join(f"{k} {v:,}" for k, v in sorted(r["by_client_kind"].items()))],
        ["by model fault: outcome", ", ".join(f"{k} {v:,}" for k, v in sorted(r["outcomes"].items()))],
        ["throughput, whole run", f"{md.value(r['throughput_jpm'], '', 0)} jobs/min"],
        [
            "first window",
            f"{w['first_stats']['throughput_jpm']} jobs/min, E2E p95 {w['first_stats']['e2e_p95_s']} s",
        ],
        [
            "last window",
            f"{w['last_stats']['throughput_jpm']} jobs/min, E2E p95 {w['last_stats']['e2e_p95_s']} s",
        ],
        [
            "consumer lag after the run",
            ", ".join(f"{g} {n}" for g, n in (r["lag_after"].get("lag") or {}).items())
            + f" (after {r['lag_after'].get('waited_s')} s)",
        ],
    ]
    if r.get("sse"):
        sse = r["sse"]
        rows.append(["SSE events / reconnects", f"{sse['events_received']:,} / {sse['reconnects']:,}"])
    lines += ["## Results", "", *md.table(["metric", "value"], rows), ""]
    grows = [
        [
            col.split(":", 1)[1],
            col.split(":", 1)[0],
            md.value(g["median"]),
            f"{g['first']:g} -> {g['last']:g}",
            f"{g['slope_per_h']:+g}",
            f"{g['limit_per_h']:g}",
            "(not judged)"
            if col in NOT_JUDGED or col.endswith(":generator")
            else ("flat" if g["flat"] else "**GROWING**")
            if r["growth_judged"]
            else "(span too short)",
        ]
        for col, g in sorted(r["growth"].items(), key=lambda kv: (kv[0].split(":", 1)[1], kv[0]))
    ]
    lines += [
        "## Growth per process (Theil-Sen slope: median of all pairwise slopes)",
        "",
        f"Fitted over {r['growth_fit'][0]:g}-{r['growth_fit'][1]:g} s: the steady part after its first "
        "window (pools, allocators and the JVM heap grow to their working size first). The generator "
        "keeps every job for this report, so its own growth is expected and not judged; "
        + "; ".join(f"`{c}`: {why}" for c, why in NOT_JUDGED.items())
        + ".",
        "",
        *md.table(
            ["process", "series", "median", "first -> last", "slope per hour", "tolerance per hour", ""],
            grows,
        ),
        "",
    ]
    idle = [
        [
            c,
            md.value(v["before"]),
            md.value(v["after"]),
            md.value(v["limit"]),
            ("ok" if v["ok"] else "**NOT BACK**") if c.startswith("tasks:") else "(pools; not judged)",
        ]
        for c, v in r["idle"].items()
    ]
    if idle:
        lines += [
            "## Idle before vs after the run",
            "",
            *md.table(["series", "before", "after", "limit", ""], idle),
            "",
        ]
    k = r.get("redis_keys") or {}
    if k:
        rows = [
            [
                p,
                md.value(v["keys"]),
                md.value(k["per_job"].get(p)),
                md.value(k["per_job_max"].get(p)),
                md.value(v["bytes_avg"], " B"),
                f"{(v['ttl_max_s'] or 0) / 3600:.2f} h (limit {k['ttl_limits'].get(p, 0) / 3600:g} h)",
                f"{k['level_bytes'].get(p, 0) / 2**20:,.0f} MiB",
            ]
            for p, v in sorted(k["run"].items())
        ]
        lines += [
            "## Redis keys of this run's jobs",
            "",
            *md.table(
                ["prefix", "keys", "per job", "max per job", "bytes per key", "longest TTL", "level"],
                rows,
            ),
            "",
            f"Keys without a TTL (any key, sampled): {k['no_ttl_keys']}. Level = keys per second x "
            "lifetime (p90 of their TTLs at the end) x bytes per key: what Redis holds once the TTLs "
            f"balance this rate, {k['level_total_bytes'] / 2**30:.2f} GiB in all (budget "
            f"{k['budget']['bytes'] / 2**30:.1f} GiB: {k['budget']['rule']}).",
            "",
        ]
    clients = r.get("redis_clients") or {}
    if clients:
        names = sorted(set(clients.get("before", {})) | set(clients.get("after", {})))
        lines += [
            "Redis connections by client (each component's pool; the soak's own sampler is unnamed): "
            + ", ".join(
                f"{n} {clients.get('before', {}).get(n, 0)} -> {clients.get('after', {}).get(n, 0)}"
                for n in names
            )
            + " (idle before -> after the run).",
            "",
        ]
    end_row: dict[str, Any] = next((x for x in reversed(report["series"]) if x.get("phase") != "idle"), {})
    first_row: dict[str, Any] = next((x for x in report["series"] if x.get("phase") != "idle"), {})
    level = (r.get("storage") or {}).get("per_topic", {})
    jobs = max(r["jobs_submitted"], 1)
    store = []
    for col in sorted(end_row):
        kind, _, name = col.partition(":")
        if kind not in ("kafka_mib", "pg_mib") or name.startswith("__cluster"):
            continue
        a, b = first_row.get(col) or 0.0, end_row.get(col) or 0.0
        lv = level.get(name)
        store.append(
            [
                name,
                md.value(a),
                md.value(b),
                md.value((b - a) * 1024 / jobs, " KiB", 2),
                f"{md.value(lv['level_gib'], ' GiB', 2)} ({lv['retention_days']:g} d)"
                if lv
                else "no retention",
            ]
        )
    if store:
        lines += [
            "## Storage",
            "",
            "Kafka topics level off at (bytes per second) x retention; Postgres tables keep every result "
            "(no retention: they grow with jobs by design).",
            "",
            *md.table(
                ["topic / table", "MiB at start", "MiB at end", "per job", "level at retention"], store
            ),
            "",
        ]
    logs = r.get("log_counts") or {}
    lines += [
        "## Service logs during the run",
        "",
        "Faust's event-loop drift warnings (`Timer ... woke up too late`), ERROR lines and tracebacks "
        "each service logged during the run: "
        + (
            "; ".join(
                f"{n}: " + ", ".join(f"{k} {v}" for k, v in c.items() if v) for n, c in sorted(logs.items())
            )
            if logs
            else "none"
        )
        + ".",
        "",
    ]
    lines += ["Time series of every sample: the `series` of the JSON report; plotted in the PNG."]
    return lines
