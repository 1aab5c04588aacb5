"""A private copy of the whole stack in production's shape: three Kafka nodes, several workers,
routers and gateways, started by `eco2 stack up` with its own ECO2_LOCAL_DIR and free ports.

The chaos tests (tests/test_cluster.py) and `eco2 bench scaleout` kill and add its processes; the
shared single-node stack the other tests use is never touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.events import SUCCESS_SEQS, ScanEvent
from contract.settings import REPO_ROOT, Settings
from contract.topics import BY_NAME, EVENTS, FIRST_TOPIC
from eco2 import install

# Offsets of each port inside the private block (a block of PORT_BLOCK free loopback ports).
PORT_BLOCK = 80
_PORTS = {
    "ECO2_KAFKA_BOOTSTRAP": 0,  # nodes at +0, +2, +4; controllers at +1, +3, +5
    "ECO2_KAFKA_CONTROLLER_PORT": 1,
    "ECO2_REDIS_URL": 10,
    "ECO2_POSTGRES_DSN": 11,
    "ECO2_API_PORT": 12,
    "ECO2_GATEWAY_PORT": 13,
    "ECO2_MODEL_PORT": 14,
    "ECO2_METRICS_PORT": 15,
    "ECO2_WORKERS_METRICS_PORT": 16,  # process i at +10(i-1)
    "ECO2_ROUTER_METRICS_PORT": 17,
    "ECO2_WRITER_METRICS_PORT": 18,
}


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_block(size: int = PORT_BLOCK) -> int:
    """The first port of `size` consecutive free loopback ports: outside the stacks' ranges and
    below Linux's ephemeral ports (32768+), which outgoing connections may take at any moment."""
    for _ in range(200):
        base = random.randrange(20000, 32768 - size, 100)
        if all(_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free loopback ports")


def private_env(base: int, local_dir: Path, **extra: str | float) -> dict[str, str]:
    env = {k: str(base + off) for k, off in _PORTS.items()}
    env["ECO2_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{base}"
    env["ECO2_REDIS_URL"] = f"redis://127.0.0.1:{base + _PORTS['ECO2_REDIS_URL']}/0"
    env["ECO2_POSTGRES_DSN"] = f"postgresql://eco2:eco2@127.0.0.1:{base + _PORTS['ECO2_POSTGRES_DSN']}/eco2"
    env["ECO2_LOCAL_DIR"] = str(local_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class PrivateStack:
    """One private stack. `env` holds its ECO2_* settings; `settings` the same for this process."""

    env: dict[str, str]
    local_dir: Path
    log: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, shared: Settings, **extra: str | float) -> PrivateStack:
        local = Path(tempfile.mkdtemp(prefix="eco2-cluster-"))
        os.chmod(local, 0o755)  # Postgres runs as its own user when we are root
        home = install.kafka_home(shared)
        if home.exists():
            (local / home.name).symlink_to(home)  # reuse the resolved jars
        return cls(private_env(free_block(), local, **extra), local)

    @property
    def settings(self) -> Settings:
        fields: dict[str, Any] = {k.removeprefix("ECO2_").lower(): v for k, v in self.env.items()}
        return Settings.model_validate(fields)

    def eco2(self, *args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "eco2.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env={**os.environ, **self.env, **(env or {})},
        )
        self.log.append(f"$ eco2 {' '.join(args)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"eco2 {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def up(self, only: str | None = None, **extra: str | float) -> str:
        more = {k: str(v) for k, v in extra.items()}
        self.env.update(more)
        return self.eco2("stack", "up", *(["--only", only] if only else []))

    def status(self) -> dict[str, Any]:
        return json.loads(self.eco2("stack", "status", "--json"))["services"]  # type: ignore[no-any-return]

    def pid(self, service: str) -> int:
        return int((self.local_dir / "run" / f"{service}.pid").read_text().split()[0])

    def kill9(self, service: str) -> int:
        """SIGKILL a service's whole process group (as a node or pod loss would)."""
        pid = self.pid(service)
        os.killpg(pid, signal.SIGKILL)
        return pid

    def down(self) -> None:
        try:
            self.eco2("stack", "down", "--reset", timeout=180)
        finally:
            shutil.rmtree(self.local_dir, ignore_errors=True)


# --- bounded load against a private stack ----------------------------------------------------

# The events of a completed job, in order (queued .. done).
COMPLETED_SEQS = list(SUCCESS_SEQS)


@dataclass
class LoadResult:
    accepted: dict[str, float] = field(default_factory=dict)  # job id -> submitted at (s into the run)
    errors: list[tuple[float, int]] = field(default_factory=list)  # (s into the run, HTTP status or 0)
    streams: dict[str, list[int]] = field(default_factory=dict)  # followed job -> seqs seen over SSE
    stream_errors: list[str] = field(default_factory=list)
    finished: dict[str, float] = field(default_factory=dict)  # followed job -> its end seen (s into the run)
    delivery_s: list[tuple[int, float]] = field(default_factory=list)  # (seq, event ts -> SSE client)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "accepted": len(self.accepted),
            "errors": len(self.errors),
            "error_window_s": (
                [round(min(t for t, _ in self.errors), 1), round(max(t for t, _ in self.errors), 1)]
                if self.errors
                else None
            ),
            "followed": len(self.streams),
            "stream_errors": len(self.stream_errors),
        }


async def scan_load(
    s: Settings,
    jobs: int,
    rate: float,
    *,
    follow_every: int = 3,
    tag: str = "",
    at: dict[float, Callable[[], Awaitable[Any]]] | None = None,
) -> LoadResult:
    """POST `jobs` scans at `rate`/s (no retries: a failed POST is an error, not a job), follow
    every `follow_every`-th accepted job over SSE to its end, and run `at[t]` `t` s into the run
    (a chaos action). Returns once every followed stream ended and every action ran."""
    import httpx

    from gateway.client import StreamError, follow, make_client
    from producers.client import ScanError, submit

    out = LoadResult()
    t0 = time.monotonic()
    follows: list[asyncio.Task[None]] = []

    def seen(ev: ScanEvent) -> None:
        out.delivery_s.append((ev.seq, time.time() - ev.ts))

    async def watch(job_id: str, user: str, http: httpx.AsyncClient) -> None:
        try:
            evs = await follow(s.gateway_url, job_id, user, client=http, max_retries=60, on_event=seen)
            out.finished[job_id] = time.monotonic() - t0
            out.streams[job_id] = [e.seq for e in evs]
        except (StreamError, httpx.HTTPError, OSError) as exc:
            out.stream_errors.append(f"{job_id}: {exc!r}")

    async def post(i: int, http: httpx.AsyncClient, sse: httpx.AsyncClient) -> None:
        user = f"cluster-{tag}-{i % 7}"
        url = f"https://images.example.com/scans/clear_pet-bottle-label_attached.jpg?t={tag}-{i}"
        try:
            job = await submit(http, url, user)
        except ScanError as exc:
            out.errors.append((time.monotonic() - t0, exc.status))
            return
        except httpx.HTTPError:
            out.errors.append((time.monotonic() - t0, 0))
            return
        out.accepted[job["job_id"]] = time.monotonic() - t0
        if len(out.accepted) % follow_every == 0:
            follows.append(asyncio.create_task(watch(job["job_id"], user, sse)))

    async def chaos() -> None:
        for when, action in sorted((at or {}).items()):
            await asyncio.sleep(max(0.0, when - (time.monotonic() - t0)))
            await action()

    async with httpx.AsyncClient(base_url=s.api_url, timeout=60) as http, make_client(max(200, jobs)) as sse:
        actions = asyncio.create_task(chaos())
        posts = []
        for i in range(jobs):
            await asyncio.sleep(max(0.0, i / rate - (time.monotonic() - t0)))
            posts.append(asyncio.create_task(post(i, http, sse)))
        await asyncio.gather(*posts)
        await actions
        await asyncio.gather(*follows)
    out.wall_s = time.monotonic() - t0
    return out


async def terminal_rows(s: Settings, job_ids: list[str], timeout_s: float = 180.0) -> dict[str, str]:
    """job id -> status of its row in `scans`, waiting (bounded) until every job has one."""
    import asyncpg

    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(s.postgres_dsn, timeout=10)
    try:
        while True:
            rows = await conn.fetch(
                "SELECT job_id, status FROM scans WHERE job_id = ANY($1::text[])", job_ids
            )
            got = {r["job_id"]: r["status"] for r in rows}
            if len(got) == len(job_ids) or time.monotonic() > deadline:
                return got
            await asyncio.sleep(1.0)
    finally:
        await conn.close()


async def events_by_job(s: Settings, job_ids: set[str]) -> dict[str, list[tuple[int, bytes]]]:
    """Every (seq, value) on scan.events of these jobs, duplicates included (whole topic, read
    committed): a job processed into two different results shows two different values of a seq."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=s.kafka_bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    out: dict[str, list[tuple[int, bytes]]] = {j: [] for j in job_ids}
    try:
        tps = [TopicPartition(EVENTS, p) for p in range(BY_NAME[EVENTS].partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for msgs in (await consumer.getmany(timeout_ms=1000)).values():
                for m in msgs:
                    key = m.key.decode() if m.key else ""
                    if key in out:
                        out[key].append((json.loads(m.value)["seq"], m.value))
        return out
    finally:
        await consumer.stop()


def conflicting_results(events: dict[str, list[tuple[int, bytes]]]) -> dict[str, list[int]]:
    """Jobs with a seq that was emitted with two different values (-> the seqs)."""
    out: dict[str, list[int]] = {}
    for job, evs in events.items():
        seen: dict[int, bytes] = {}
        bad = sorted({seq for seq, v in evs if seen.setdefault(seq, v) != v})
        if bad:
            out[job] = bad
    return out


def partitions(s: Settings) -> dict[str, list[dict[str, Any]]]:
    """kcat's view of every topic: topic -> [{partition, leader, replicas, isrs}]."""
    out = subprocess.run(
        ["kcat", "-b", s.kafka_bootstrap, "-L", "-J"], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return {t["topic"]: t["partitions"] for t in json.loads(out.stdout)["topics"]}


def busiest_leader(s: Settings, topics: tuple[str, ...] = (FIRST_TOPIC, EVENTS)) -> int:
    """The node id leading most partitions of the busy topics."""
    leaders = [p["leader"] for name, ps in partitions(s).items() if name in topics for p in ps]
    return max(set(leaders), key=leaders.count)


def under_replicated(s: Settings) -> list[str]:
    """Partitions of the contract's topics whose ISR is smaller than their replica set."""
    return [
        f"{name}[{p['partition']}]"
        for name, ps in partitions(s).items()
        if name in BY_NAME
        for p in ps
        if len(p.get("isrs", [])) < len(p.get("replicas", []))
    ]


async def group_timeline(
    s: Settings,
    group: str,
    stop: asyncio.Event,
    every_s: float = 0.25,
    out: list[tuple[float, str, int]] | None = None,
) -> list[tuple[float, str, int]]:
    """(monotonic time, state, members) of a consumer group, sampled into `out` until `stop`."""
    from aiokafka.admin import AIOKafkaAdminClient

    out = [] if out is None else out
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        while not stop.is_set():
            try:
                for resp in await admin.describe_consumer_groups([group]):
                    for g in resp.groups:
                        out.append((time.monotonic(), g[2], len(g[5])))
            except Exception as exc:  # a coordinator moving: record the gap, keep sampling
                out.append((time.monotonic(), f"error:{type(exc).__name__}", -1))
            await asyncio.sleep(every_s)
    finally:
        await admin.close()
    return out


def settled_after(timeline: list[tuple[float, str, int]], since: float, members: int | None) -> float | None:
    """Seconds from `since` until the group is Stable again after a change: with `members`, Stable
    with that many after having been otherwise (rebalancing, or another count); without, the end
    of the first rebalance after `since`. A dead member counts until its session times out, so a
    Stable sample before the change proves nothing."""
    changed = False
    for t, state, n in timeline:
        if t < since:
            continue
        if changed and state == "Stable" and (members is None or n == members):
            return t - since
        changed = changed or state != "Stable" or (members is not None and n != members)
    return None
