"""What the soak samples every few seconds: per stack process RSS, open fds, CPU and asyncio tasks
(the `eco2_asyncio_tasks` gauge each component exports); Redis memory and keys by prefix; consumer
lag per group; Kafka log bytes per topic; Postgres table sizes; SSE streams open on the gateway."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from contract import keys
from contract.settings import Settings
from contract.topics import TOPICS
from eco2.service import data_dir
from runtime.metrics import ASYNCIO_TASKS

from .stats import percentile, rss_kib, tree_cpu_s

# Keys by design without a TTL: the view marker and its checkpoint (one each; they say whether,
# and below which offsets, the view is whole).
VIEW_KEYS = {keys.VIEW.encode(), keys.VIEW_CHECKPOINT.encode()}


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
        "gateway": f"{s.gateway_url}/metrics",
        "model": f"http://{s.model_host}:{s.model_port}/metrics",
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
        self._keys: dict[str, int] = {}
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
                # A child that exited (Redis's BGSAVE fork) takes its CPU out of the tree: never < 0.
                row[f"cpu_pct:{name}"] = round(100.0 * max(used, 0.0) / max(now - t0, 1e-6), 1)
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

    async def key_scan(self, run_jobs: set[str] | None = None) -> dict[str, Any]:
        """Keys by prefix (first two `:` parts) and, on up to 200 keys per prefix, keys without a
        TTL. With `run_jobs`: the keys of those jobs by prefix, and on up to 200 of them per
        prefix their TTL (max, p90) and bytes (MEMORY USAGE), for what one job costs Redis."""
        counts: collections.Counter[str] = collections.Counter()
        mine: collections.Counter[str] = collections.Counter()
        any_probe: dict[str, list[bytes]] = collections.defaultdict(list)
        run_probe: dict[str, list[bytes]] = collections.defaultdict(list)
        async for key in self._redis.scan_iter(count=5000):
            if key in VIEW_KEYS:
                continue
            parts = key.decode(errors="replace").split(":")
            prefix = ":".join(parts[:2])
            counts[prefix] += 1
            if len(any_probe[prefix]) < 200:
                any_probe[prefix].append(key)
            if run_jobs is not None and len(parts) > 2 and parts[2] in run_jobs:
                mine[prefix] += 1
                if len(run_probe[prefix]) < 200:
                    run_probe[prefix].append(key)
        pipe = self._redis.pipeline(transaction=False)
        flat = [k for ks in any_probe.values() for k in ks]
        for k in flat:
            pipe.ttl(k)
        ttls = [int(x) for x in await pipe.execute()] if flat else []
        out: dict[str, Any] = {
            "by_prefix": dict(counts),
            "no_ttl": sum(1 for x in ttls if x == -1),
            "checked": len(ttls),
        }
        if run_jobs is not None:
            pipe = self._redis.pipeline(transaction=False)
            for ks in run_probe.values():
                for k in ks:
                    pipe.ttl(k)
                    pipe.memory_usage(k)
            raw = await pipe.execute() if run_probe else []
            per: dict[str, Any] = {}
            i = 0
            for prefix, ks in run_probe.items():
                pairs = [(int(raw[i + 2 * n]), raw[i + 2 * n + 1]) for n in range(len(ks))]
                i += 2 * len(ks)
                live = [(ttl, size) for ttl, size in pairs if ttl >= 0 and size is not None]
                per[prefix] = {
                    "keys": mine[prefix],
                    "ttl_max_s": max((x for x, _ in live), default=None),
                    "ttl_p90_s": percentile([float(x) for x, _ in live], 90),
                    "bytes_avg": round(sum(b for _, b in live) / len(live)) if live else None,
                }
            out["run"] = per
            out["maxmemory"] = int((await self._redis.config_get("maxmemory")).get("maxmemory") or 0)
        return out

    async def redis_clients(self) -> dict[str, int]:
        """Redis connections by client name without its pid (eco2-stages, eco2-api, ...): each
        component's pool, so a growing fd count on Redis can be told from a pool filling up."""
        out: collections.Counter[str] = collections.Counter()
        for c in await self._redis.client_list():
            out[re.sub(r"-\d+$", "", c.get("name") or "") or "(unnamed)"] += 1
        return dict(out)

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
            self._keys = {f"redis_keys:{p}": n for p, n in scan["by_prefix"].items()}
            self._keys["redis_keys_no_ttl"] = scan["no_ttl"]
            row["redis_keys_scanned"] = True
        return {**row, **self._keys}  # between scans: the last scan's counts

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


# What the services' logs say during a soak: Faust's event-loop drift warning ("Timer ... woke up
# too late, with a drift of ...") shows a loop that ages badly; errors and tracebacks anything else.
LOG_PATTERNS = {"timer_drift": "woke up too late", "errors": " ERROR ", "tracebacks": "Traceback"}


class LogWatch:
    """Counts LOG_PATTERNS in what each service's log gained since the watch started."""

    def __init__(self, logs: Path, names: Iterable[str]) -> None:
        self.paths = {n: logs / f"{n}.log" for n in names}
        self.offsets = {n: _size(p) for n, p in self.paths.items()}

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, path in self.paths.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[name])
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            found = {k: text.count(pattern) for k, pattern in LOG_PATTERNS.items()}
            if any(found.values()):
                out[name] = found
        return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
