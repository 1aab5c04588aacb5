"""Helpers for the router/gateway tests: own router and gateway processes on an own Redis.

Isolation from the stack and from other engineers' tests: the test router runs in its own consumer
group (committed at the log's end before it starts, so it only routes new events) and writes to a
private redis-server of the test session; the test gateways read that server. Kafka is the stack's.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError
from aiokafka.structs import OffsetAndMetadata

import view
from bench.harness import Proc as HelperProc
from contract import keys, trace
from contract.events import PIPELINE, ScanEvent, ScanJob, ScanResult, make_event, now
from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS, partition_for
from eco2.infra import redis_argv
from eco2.services import local_quotas
from view import StateStore

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_private_redis: list[subprocess.Popen[bytes]] = []
_private_port: list[int] = []


def private_redis_port() -> int:
    """A Redis server of the test session's own (started on first use, stopped at exit).

    Pub/sub channels are server-wide, not per database: on the stack's Redis the stack router's
    publishes of the same events would reach the test gateways and mask what the test router does.
    """
    if _private_port and _private_redis[0].poll() is None:
        return _private_port[0]
    port = free_port()
    d = tempfile.mkdtemp(prefix="eco2-test-redis-")
    proc = start_redis(port, Path(d))
    _private_redis[:] = [proc]
    _private_port[:] = [port]
    atexit.register(_stop_private_redis, proc, d)
    return port


def start_redis(port: int, data: Path) -> subprocess.Popen[bytes]:
    """A redis-server configured as the stack's, on `port`; returns once it accepts connections."""
    proc = subprocess.Popen(
        redis_argv("127.0.0.1", port, data),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"could not start a private redis-server on {port}")
        time.sleep(0.05)


def _stop_private_redis(proc: subprocess.Popen[bytes], d: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)
    shutil.rmtree(d, ignore_errors=True)


def isolated_redis_url(s: Settings, db: int = 0, port: int | None = None) -> str:
    """The test Redis (the private server unless `port`, e.g. a proxy in front of it)."""
    return f"redis://127.0.0.1:{port or private_redis_port()}/{db}"


# --- events ----------------------------------------------------------------------------------


def job(user_id: str, job_id: str | None = None) -> ScanJob:
    return ScanJob(
        job_id=job_id or f"t-{uuid.uuid4().hex[:16]}",
        user_id=user_id,
        image_url="https://example.com/bottle.jpg",
        model="gpt-4o-mini",
        created_at=now(),
    )


def full_events(j: ScanJob, fail_at: str | None = None) -> list[ScanEvent]:
    """Every event of a job in pipeline order: queued, started/completed per stage, then done
    (or a failure at `fail_at` after its started event)."""
    out = [make_event(j, "queued", "completed")]
    for stage in PIPELINE:
        out.append(make_event(j, stage, "started"))
        if stage == fail_at:
            result = ScanResult(
                job_id=j.job_id,
                user_id=j.user_id,
                status="failed",
                image_url=j.image_url,
                error="boom",
                failed_stage=stage,
                created_at=j.created_at,
                finished_at=now(),
            )
            out.append(make_event(j, stage, "failed", result=result, error="boom"))
            return out
        out.append(make_event(j, stage, "completed"))
    result = ScanResult(
        job_id=j.job_id,
        user_id=j.user_id,
        status="completed",
        image_url=j.image_url,
        classification={"major_category": "recyclable", "middle_category": "clear_pet_bottle"},
        answer={
            "user_answer": f"Rinse it ({j.job_id}).",
            "disposal_steps": ["rinse", "crush"],
            "warnings": [],
        },
        reward={"granted": True, "character_code": "pet", "character_name": "Petty", "reason": "ok"},
        created_at=j.created_at,
        finished_at=now(),
    )
    out.append(make_event(j, "done", "completed", result=result))
    return out


class EventProducer:
    """Produces events to scan.events the way the pipeline does (explicit shard, traceparent)."""

    def __init__(self, s: Settings) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, acks="all", linger_ms=0)

    async def __aenter__(self) -> EventProducer:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def send(self, ev: ScanEvent) -> None:
        await self.producer.send_and_wait(
            EVENTS,
            ev.model_dump_json().encode(),
            key=ev.job_id.encode(),
            partition=partition_for(ev.job_id, BY_NAME[EVENTS].partitions),
            headers=trace.headers(trace.new_traceparent()),
        )

    async def send_all(self, events: list[ScanEvent], gap_s: float = 0.0) -> None:
        for ev in events:
            await self.send(ev)
            if gap_s:
                await asyncio.sleep(gap_s)


async def submit(s: Settings, producer: EventProducer, j: ScanJob) -> list[ScanEvent]:
    """What the scan API does: the queued event to Kafka and straight into Redis (test db).
    Returns the job's remaining events."""
    events = full_events(j)
    await producer.send(events[0])
    r = aioredis.from_url(isolated_redis_url(s))
    try:
        await StateStore(r, s.state_ttl_s).apply(events[:1])
    finally:
        await r.aclose()
    return events[1:]


# --- processes -------------------------------------------------------------------------------


@dataclass
class Proc(HelperProc):
    """A process a test started; tests also kill it with a chosen signal (the whole group)."""

    extra: dict[str, str] = field(default_factory=dict)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def log_path(s: Settings, name: str) -> Path:
    d = s.local_dir / "logs" / "tests"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}.log"


async def commit_at_end(s: Settings, group: str, topic: str = EVENTS) -> None:
    """Point a consumer group at the end of `topic` so it handles only new records. A member
    of the group that just left may hold it for a session timeout (10 s): retried meanwhile."""
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(BY_NAME[topic].partitions)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + 30
        while True:
            try:
                await consumer.commit({tp: OffsetAndMetadata(end[tp], "") for tp in tps})
                return
            except CommitFailedError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
    finally:
        await consumer.stop()


def router_proc(s: Settings, group: str, redis_url: str | None = None) -> Proc:
    return Proc(
        name="router",
        argv=[sys.executable, "-m", "streams", "router"],
        env={
            "ECO2_ROUTER_GROUP": group,
            "ECO2_REDIS_URL": redis_url or isolated_redis_url(s),
            "ECO2_METRICS_PORT": str(free_port()),
            "ECO2_RETRY_BACKOFF_S": "0.2",
            # A new test Redis has no view marker: the router rebuilds it first, from the last
            # minutes of the log only (the stack's log may hold days of benchmark events).
            "ECO2_REBUILD_WINDOW_S": "300",
        },
        log=log_path(s, group),
    )


async def wait_routed(
    s: Settings,
    producer: EventProducer,
    proc: Proc,
    timeout_s: float = 90,
    db: int = 0,
    redis_url: str | None = None,
) -> None:
    """Ready = a probe event produced now shows up in the router's db (partitions assigned) and
    the router has rebuilt the view (a new Redis has none)."""
    r = aioredis.from_url(redis_url or isolated_redis_url(s, db))
    try:
        deadline = time.monotonic() + timeout_s
        while await view.current(r) != "ready":
            if not proc.alive() or time.monotonic() > deadline:
                raise AssertionError(f"router did not make the view ready:\n{proc.tail()}")
            await asyncio.sleep(0.2)
        probe = job("probe")
        ev = make_event(probe, "queued", "completed")
        deadline = time.monotonic() + timeout_s
        await producer.send(ev)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"router exited:\n{proc.tail()}")
            if await r.exists(keys.history(probe.job_id)):
                await r.delete(keys.state(probe.job_id), keys.history(probe.job_id))
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"router did not route a probe within {timeout_s}s:\n{proc.tail()}")
    finally:
        await r.aclose()


def gateway_proc(s: Settings, **env: str) -> Proc:
    port = free_port()
    name = f"gateway-{port}"
    return Proc(
        name=name,
        argv=[sys.executable, "-m", "gateway"],
        env={
            "ECO2_GATEWAY_PORT": str(port),
            "ECO2_REDIS_URL": isolated_redis_url(s),
            "ECO2_GAP_WAIT_S": "1.0",
            **local_quotas(s),  # as `eco2 stack up` runs its gateways: one test user opens many streams
            **env,
        },
        log=log_path(s, name),
        extra={"url": f"http://127.0.0.1:{port}"},
    )


async def wait_ready(proc: Proc, timeout_s: float = 30) -> str:
    url = proc.extra["url"]
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                if (await client.get(url + "/ready")).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{proc.name} not ready:\n{proc.tail()}")


async def delete_jobs(s: Settings, job_ids: list[str]) -> None:
    r = aioredis.from_url(isolated_redis_url(s))
    try:
        for j in job_ids:
            await r.delete(keys.state(j), keys.history(j))
    finally:
        await r.aclose()


def seqs(events: list[ScanEvent]) -> list[int]:
    return [e.seq for e in events]

class RedisServer:
    """A redis-server of one test (configured as the stack's: AOF), restartable on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="eco2-test-heal-"))
        self.popen: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.popen = start_redis(self.port, self.dir)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(timeout=20)

    def remove(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
