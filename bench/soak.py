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
group; Kafka log bytes per topic; Postgres table sizes; SSE streams open on the gateway. At the end
it judges (`judge`): completion, lost/duplicated SSE events, throughput and E2E p95 of the last
window against the first, a fitted growth per hour of RSS/fds/tasks against stated tolerances,
tasks and fds back at their idle level, Redis keys within what the TTL allows, lag back to zero.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from contract.events import PIPELINE
from contract.runtime_metrics import ASYNCIO_TASKS
from contract.settings import Settings
from contract.topics import ROUTER_GROUP, TOPICS, WRITER_GROUP, stage_group
from eco2.stack import data_dir

from . import harness, wire
from .load import Job, LoadConfig, LoadRun, check_seqs, image_url
from .stats import machine, percentile, rss_kib, tree_cpu_s

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
GROWTH_MIN_SPAN_S = 120.0  # a shorter fit is not extrapolated to an hour
WINDOW_MAX_S = 600.0  # the first/last window compared: 10 minutes, or a third of a shorter steady part


@dataclass
class SoakConfig:
    duration_s: float = 3600.0
    vus: int = 300
    ramp_up_s: float = 60.0
    ramp_down_s: float = 30.0
    sample_every_s: float = 10.0
    model_latency: tuple[float, float] | None = (5.0, 10.0)
    resume_share: float = 0.10
    abandon_share: float = 0.05
    permanent_share: float = 0.02
    transient_share: float = 0.02
    gaps_share: float = 0.03
    poll_interval_s: float = 2.5
    job_timeout_s: float = 180.0
    grace_s: float = 60.0
    drain_timeout_s: float = 120.0
    key_scan_every: int = 6  # Redis keys by prefix every N samples (a full SCAN costs Redis CPU)
    name: str = ""
    progress: bool = True

    def load_config(self) -> LoadConfig:
        return LoadConfig(
            vus=self.vus,
            ramp_up_s=self.ramp_up_s,
            hold_s=max(self.duration_s - self.ramp_up_s - self.ramp_down_s, 0.0),
            ramp_down_s=self.ramp_down_s,
            mode="sse",
            poll_interval_s=self.poll_interval_s,
            job_timeout_s=self.job_timeout_s,
            grace_s=self.grace_s,
            model_latency=self.model_latency,
            name=self.name,
            progress=self.progress,
        )


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
        x, y = rnd.random(), rnd.random()
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


def expected_outcome(job: Job) -> str:
    return "failed" if job.fault == "permanent" else "completed"


# --- sampling ------------------------------------------------------------------------------------


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _metric(text: str, name: str) -> float | None:
    """The value of an unlabelled sample `name` in a Prometheus text exposition."""
    m = re.search(rf"^{re.escape(name)} ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def _segment_bytes(path: Path) -> int:
    """Bytes of a partition's log segments (`.log`; the index files are preallocated and sparse)."""
    total = 0
    for f in path.glob("*.log"):
        try:
            total += f.stat().st_size
        except OSError:
            pass
    return total


def kafka_log_bytes(logs: Path, topics: Iterable[str]) -> dict[str, int]:
    """Log segment bytes per topic (all its partitions) in the broker's log.dirs."""
    want = set(topics)
    out = dict.fromkeys(want, 0)
    try:
        entries = list(os.scandir(logs))
    except OSError:
        return out
    for e in entries:
        topic, _, part = e.name.rpartition("-")
        if e.is_dir() and topic in want and part.isdigit():
            out[topic] += _segment_bytes(Path(e.path))
    return out


def metrics_urls(s: Settings) -> dict[str, str]:
    """Where each Python component serves its Prometheus metrics on the local stack."""
    return {
        "api": f"{s.api_url}/metrics",
        "gateway": f"{s.gateway_url}/metrics/",
        "model": f"http://{s.model_host}:{s.model_port}/metrics/",
        "workers": f"http://127.0.0.1:{s.workers_metrics_port}/metrics",
        "router": f"http://127.0.0.1:{s.router_metrics_port}/metrics",
        "writer": f"http://127.0.0.1:{s.writer_metrics_port}/metrics",
    }


class Sampler:
    """One row of every watched series per call of `sample()`; clients kept open between calls."""

    def __init__(self, s: Settings, pids: dict[str, int], groups: list[str], key_scan_every: int) -> None:
        self.s = s
        self.pids = {**pids, "generator": os.getpid()}
        self.groups = groups
        self.key_scan_every = max(key_scan_every, 1)
        self.topics = [t.name for t in TOPICS]
        self.kafka_logs = data_dir(s) / "kafka" / "logs"
        self.rows: list[dict[str, Any]] = []
        self.key_scans: list[dict[str, Any]] = []
        self._n = 0
        self._cpu: tuple[float, dict[int, float]] | None = None
        self._http = httpx.AsyncClient(timeout=3.0, follow_redirects=True)
        self._redis = aioredis.from_url(s.redis_url, socket_timeout=10)
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._pg: asyncpg.Connection | None = None

    async def start(self) -> None:
        kw = self.s.kafka_client_kwargs()
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.s.kafka_bootstrap, **kw)
        await self._admin.start()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.s.kafka_bootstrap, **kw)
        await self._consumer.start()
        self._pg = await asyncpg.connect(self.s.postgres_dsn)

    async def close(self) -> None:
        await self._http.aclose()
        await self._redis.aclose()
        if self._admin is not None:
            await self._admin.close()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._pg is not None:
            await self._pg.close()

    def _procs(self) -> dict[str, Any]:
        now = time.monotonic()
        cpu = tree_cpu_s(self.pids.values())
        row: dict[str, Any] = {}
        for name, pid in self.pids.items():
            rss = rss_kib(pid)
            row[f"rss_mib:{name}"] = round(rss / 1024, 1) if rss is not None else None
            row[f"fds:{name}"] = _fds(pid)
            if self._cpu is not None:
                t0, before = self._cpu
                used = cpu.get(pid, 0.0) - before.get(pid, 0.0)
                row[f"cpu_pct:{name}"] = round(100.0 * used / max(now - t0, 1e-6), 1)
        self._cpu = (now, cpu)
        return row

    async def _scrape(self) -> dict[str, Any]:
        urls = metrics_urls(self.s)

        async def get(url: str) -> str:
            try:
                return (await self._http.get(url)).text
            except httpx.HTTPError:
                return ""

        texts = await asyncio.gather(*(get(u) for u in urls.values()))
        row: dict[str, Any] = {}
        for name, text in zip(urls, texts, strict=True):
            tasks = _metric(text, ASYNCIO_TASKS)
            row[f"tasks:{name}"] = int(tasks) if tasks is not None else None
            if name == "gateway":
                streams = _metric(text, "eco2_gateway_streams")
                row["gateway_streams"] = int(streams) if streams is not None else None
        return row

    async def key_scan(self) -> dict[str, Any]:
        """Keys by prefix (first two `:` parts), keys without a TTL, and the longest TTL seen
        (checked on up to 200 keys per prefix)."""
        counts: collections.Counter[str] = collections.Counter()
        probe: dict[str, list[bytes]] = collections.defaultdict(list)
        async for key in self._redis.scan_iter(count=5000):
            prefix = ":".join(key.decode(errors="replace").split(":")[:2])
            counts[prefix] += 1
            if len(probe[prefix]) < 200:
                probe[prefix].append(key)
        pipe = self._redis.pipeline(transaction=False)
        flat = [k for ks in probe.values() for k in ks]
        for k in flat:
            pipe.ttl(k)
        ttls = [int(x) for x in await pipe.execute()] if flat else []
        return {
            "by_prefix": dict(counts),
            "no_ttl": sum(1 for x in ttls if x == -1),
            "max_ttl_s": max(ttls, default=None),
            "checked": len(ttls),
        }

    async def lag(self, exact: bool = False) -> dict[str, int]:
        """Records each consumer group has not committed, over the partitions it committed.

        Cheap form (every sample): log end minus committed offset. On topics written in
        transactions (scan.vision) every record is followed by a commit marker that no consumer
        ever receives, so a drained group sits one offset behind the end there. `exact` counts
        the records a read_committed consumer still gets after the committed offsets instead."""
        assert self._admin is not None and self._consumer is not None
        out: dict[str, int] = {}
        committed_by_group: dict[str, dict[TopicPartition, int]] = {}
        tps: set[TopicPartition] = set()
        for g in self.groups:
            try:
                offs = await self._admin.list_consumer_group_offsets(g)
            except Exception:
                continue
            committed_by_group[g] = {tp: m.offset for tp, m in offs.items() if m.offset >= 0}
            tps.update(committed_by_group[g])
        end = await self._consumer.end_offsets(list(tps)) if tps else {}
        for g, committed in committed_by_group.items():
            behind = {tp: off for tp, off in committed.items() if end.get(tp, off) > off}
            if exact and behind:
                out[g] = await self._records_after(behind, end)
            else:
                out[g] = sum(end[tp] - off for tp, off in behind.items())
        return out

    async def _records_after(
        self, committed: dict[TopicPartition, int], end: dict[TopicPartition, int]
    ) -> int:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.s.kafka_bootstrap,
            isolation_level="read_committed",
            enable_auto_commit=False,
            **self.s.kafka_client_kwargs(),
        )
        await consumer.start()
        try:
            consumer.assign(list(committed))
            for tp, off in committed.items():
                consumer.seek(tp, off)
            n = 0
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                got = await consumer.getmany(timeout_ms=500, max_records=10_000)
                n += sum(len(v) for v in got.values())
                positions = [await consumer.position(tp) for tp in committed]
                if all(p >= end[tp] for p, tp in zip(positions, committed, strict=True)):
                    break
            return n
        finally:
            await consumer.stop()

    async def _kafka(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        try:
            for g, n in (await self.lag()).items():
                row[f"lag:{g}"] = n
        except Exception as exc:  # a sample must not end the soak
            row["kafka_error"] = f"{type(exc).__name__}: {exc}"
        sizes = await asyncio.to_thread(kafka_log_bytes, self.kafka_logs, self.topics)
        for topic, b in sizes.items():
            row[f"kafka_mib:{topic}"] = round(b / 2**20, 2)
        return row

    async def _postgres(self) -> dict[str, Any]:
        assert self._pg is not None
        rows = await self._pg.fetch(
            "SELECT relname, pg_total_relation_size(relid) AS bytes, n_live_tup "
            "FROM pg_stat_user_tables ORDER BY relname"
        )
        out: dict[str, Any] = {}
        for r in rows:
            out[f"pg_mib:{r['relname']}"] = round(r["bytes"] / 2**20, 2)
            out[f"pg_rows:{r['relname']}"] = r["n_live_tup"]
        return out

    async def _redis_row(self) -> dict[str, Any]:
        info = await self._redis.info("memory")
        row: dict[str, Any] = {
            "redis_used_mib": round(int(info["used_memory"]) / 2**20, 2),
            "redis_keys": int(await self._redis.dbsize()),
        }
        if self._n % self.key_scan_every == 0:
            scan = await self.key_scan()
            for prefix, n in scan["by_prefix"].items():
                row[f"redis_keys:{prefix}"] = n
            row["redis_keys_no_ttl"] = scan["no_ttl"]
            row["redis_max_ttl_s"] = scan["max_ttl_s"]
        return row

    async def sample(self, t: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(t, 1), **(extra or {})}
        parts = await asyncio.gather(
            asyncio.to_thread(self._procs),
            self._scrape(),
            self._redis_row(),
            self._kafka(),
            self._postgres(),
            return_exceptions=True,
        )
        for part in parts:
            if isinstance(part, BaseException):
                row.setdefault("errors", []).append(f"{type(part).__name__}: {part}")
            else:
                row.update(part)
        self._n += 1
        self.rows.append(row)
        return row


# --- judging -------------------------------------------------------------------------------------


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, in value per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx * 3600.0


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
    state_ttl_s: int,
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
    d_thr = _pct_change(first["throughput_jpm"], last["throughput_jpm"])
    add(
        "throughput, last vs first window",
        f"within 5% ({win['rule']}, {win['window_s']:g} s each)",
        f"{first['throughput_jpm']} -> {last['throughput_jpm']} jobs/min"
        + ("" if d_thr is None else f" ({100 * d_thr:+.1f}%)"),
        None if d_thr is None or not ok_window else abs(d_thr) <= 0.05,
    )
    d_e2e = _pct_change(first["e2e_p95_s"], last["e2e_p95_s"])
    add(
        "E2E p95, last vs first window",
        f"within 5% ({win['rule']})",
        f"{first['e2e_p95_s']} -> {last['e2e_p95_s']} s"
        + ("" if d_e2e is None else f" ({100 * d_e2e:+.1f}%)"),
        None if d_e2e is None or not ok_window else abs(d_e2e) <= 0.05,
    )

    # Growth of every process series, fitted from the end of the first window to the end of the
    # steady part: during the first window pools, allocators and the JVM heap still grow to their
    # working size. Too short a span to extrapolate to an hour is not judged.
    t0, t1 = win["first"][1], win["steady"][1]
    fit_ok = t1 - t0 >= GROWTH_MIN_SPAN_S
    series: dict[str, dict[str, Any]] = {}
    cols = sorted({c for r in rows for c in r if c.split(":", 1)[0] in TOLERANCE})
    for col in cols:
        g = growth(rows, col, t0, t1)
        if g is not None:
            series[col] = g
    judged = {c: g for c, g in series.items() if c.split(":", 1)[1] != "generator"}
    for kind, (rel, absolute, unit) in TOLERANCE.items():
        mine = {c: g for c, g in judged.items() if c.startswith(kind + ":")}
        bad = [
            f"{c.split(':', 1)[1]} {g['slope_per_h']:+g} {unit}/h" for c, g in mine.items() if not g["flat"]
        ]
        worst = max(mine.items(), key=lambda kv: kv[1]["slope_per_h"] / kv[1]["limit_per_h"], default=None)
        measured = (
            "; ".join(bad)
            if bad
            else (
                f"all flat; steepest {worst[0].split(':', 1)[1]} {worst[1]['slope_per_h']:+g} {unit}/h"
                if worst
                else None
            )
        )
        add(
            f"{kind} flat per process",
            f"fitted growth <= max({rel:.0%} of median, {absolute:g} {unit}) per hour",
            measured if fit_ok else f"fit span {t1 - t0:.0f} s < {GROWTH_MIN_SPAN_S:g} s: not judged",
            None if not mine or not fit_ok else not bad,
        )

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

    # Redis keys: every key expires, none outlives the TTL, and each job adds a bounded number.
    keys_verdict: dict[str, Any] = {}
    start, end = key_scans.get("start"), key_scans.get("end")
    if start and end:
        added = {
            p: end["by_prefix"].get(p, 0) - start["by_prefix"].get(p, 0)
            for p in set(start["by_prefix"]) | set(end["by_prefix"])
        }
        per_job = {p: round(n / len(accepted), 2) for p, n in added.items()} if accepted else {}
        over = [p for p, k in per_job.items() if k > KEYS_PER_JOB_MAX.get(p, 0)]
        minutes = max(cfg.duration_s / 60.0, 1e-6)
        ceiling = sum(max(n, 0) for n in added.values()) / minutes * (state_ttl_s / 60.0)
        keys_verdict = {
            "added": added,
            "per_job": per_job,
            "per_job_max": KEYS_PER_JOB_MAX,
            "no_ttl_keys": end["no_ttl"],
            "max_ttl_s": end["max_ttl_s"],
            "ttl_s": state_ttl_s,
            "ceiling_at_this_rate": round(ceiling),
        }
        ok = not over and end["no_ttl"] == 0 and (end["max_ttl_s"] or 0) <= state_ttl_s
        add(
            "Redis keys bounded by the TTL",
            "every key has a TTL <= state TTL; keys per job <= "
            + ", ".join(f"{p} {n}" for p, n in KEYS_PER_JOB_MAX.items()),
            f"{end['no_ttl']} keys without TTL (of {end['checked']} checked); per job "
            + ", ".join(f"{p} {k:g}" for p, k in sorted(per_job.items()))
            + f"; level at this rate after one TTL ({state_ttl_s / 3600:g} h): ~{ceiling:,.0f} keys",
            ok,
        )
    add(
        "consumer lag back to zero after the run",
        f"every group at 0 within {cfg.drain_timeout_s:g} s",
        ", ".join(f"{g} {n}" for g, n in (lag_after.get("lag") or {}).items())
        + (f" after {lag_after.get('waited_s')} s" if lag_after.get("lag") is not None else ""),
        None if lag_after.get("lag") is None else lag_after.get("zero", False),
    )
    return {
        "targets": targets,
        "windows": {**win, "warm_up_s": round(warm, 1), "first_stats": first, "last_stats": last},
        "growth": series,
        "idle": back,
        "growth_fit": [round(t0, 1), round(t1, 1)],
        "growth_judged": fit_ok,
        "redis_keys": keys_verdict,
    }


# --- the run -------------------------------------------------------------------------------------


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
            sampler.rows.clear()
            cpu = harness.ServiceCpu(pids)
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
            scans["end"] = await sampler.key_scan()
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
        state_ttl_s=s.state_ttl_s,
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
            "key_scans": scans,
            "lag_after": lag_after,
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
        ("asyncio tasks", family("tasks")),
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


# --- markdown ------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> list[str]:
    from .report import _machine, _table, _targets, _v

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
        f"- Machine: {_machine(report['machine'])}.",
        "",
    ]
    lines += _targets(report)
    rows = [
        [
            "jobs submitted / completed / failed",
            f"{r['jobs_submitted']:,} / {r['jobs_completed']:,} / {r['jobs_failed']:,}",
        ],
        ["jobs by outcome", ", ".join(f"{k} {v:,}" for k, v in sorted(r["jobs_by_status"].items()))],
        ["by client behaviour", ", ".join(f"{k} {v:,}" for k, v in sorted(r["by_client_kind"].items()))],
        ["by model fault: outcome", ", ".join(f"{k} {v:,}" for k, v in sorted(r["outcomes"].items()))],
        ["throughput, whole run", f"{_v(r['throughput_jpm'], '', 0)} jobs/min"],
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
    lines += ["## Results", "", *_table(["metric", "value"], rows), ""]
    grows = [
        [
            col.split(":", 1)[1],
            col.split(":", 1)[0],
            _v(g["median"]),
            f"{g['first']:g} -> {g['last']:g}",
            f"{g['slope_per_h']:+g}",
            f"{g['limit_per_h']:g}",
            ("flat" if g["flat"] else "**GROWING**") if r["growth_judged"] else "(span too short)",
        ]
        for col, g in sorted(r["growth"].items(), key=lambda kv: (kv[0].split(":", 1)[1], kv[0]))
    ]
    lines += [
        "## Growth per process (least-squares slope)",
        "",
        f"Fitted over {r['growth_fit'][0]:g}-{r['growth_fit'][1]:g} s: the steady part after its first "
        "window (pools, allocators and the JVM heap grow to their working size first). The generator "
        "keeps every job for this report, so its own growth is expected and not judged.",
        "",
        *_table(
            ["process", "series", "median", "first -> last", "slope per hour", "tolerance per hour", ""],
            grows,
        ),
        "",
    ]
    idle = [
        [
            c,
            _v(v["before"]),
            _v(v["after"]),
            _v(v["limit"]),
            ("ok" if v["ok"] else "**NOT BACK**") if c.startswith("tasks:") else "(pools; not judged)",
        ]
        for c, v in r["idle"].items()
    ]
    if idle:
        lines += [
            "## Idle before vs after the run",
            "",
            *_table(["series", "before", "after", "limit", ""], idle),
            "",
        ]
    k = r.get("redis_keys") or {}
    if k:
        lines += [
            "## Redis keys",
            "",
            *_table(
                ["prefix", "added during the run", "per job", "max per job"],
                [
                    [p, _v(n), _v(k["per_job"].get(p)), _v(k["per_job_max"].get(p))]
                    for p, n in sorted(k["added"].items())
                ],
            ),
            "",
            f"Keys without a TTL: {k['no_ttl_keys']}; longest TTL seen {k['max_ttl_s']} s "
            f"(state TTL {k['ttl_s']} s). At this submission rate the key count levels off after "
            f"one TTL at about {k['ceiling_at_this_rate']:,} keys.",
            "",
        ]
    end_row: dict[str, Any] = next((x for x in reversed(report["series"]) if x.get("phase") != "idle"), {})
    first_row: dict[str, Any] = next((x for x in report["series"] if x.get("phase") != "idle"), {})
    store = [
        [col.split(":", 1)[1], _v(first_row.get(col)), _v(end_row.get(col))]
        for col in sorted(end_row)
        if col.split(":", 1)[0] in ("kafka_mib", "pg_mib")
        and not col.split(":", 1)[1].startswith("__cluster")
    ]
    if store:
        lines += [
            "## Storage (grows with jobs until retention; reported, not judged)",
            "",
            *_table(["topic / table", "MiB at start", "MiB at end"], store),
            "",
        ]
    lines += ["Time series of every sample: the `series` of the JSON report; plotted in the PNG."]
    return lines
