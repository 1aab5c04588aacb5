"""The event router and `eco2 state rebuild` against real Kafka and Redis (own group, own db)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from contract import keys
from contract.events import ScanEvent
from contract.settings import Settings
from gateway.client import follow
from streams.router import EXIT_UNAPPLIED
from view import StateStore

from .gateway_support import (
    REPO,
    EventProducer,
    Proc,
    commit_at_end,
    delete_jobs,
    free_port,
    full_events,
    isolated_redis_url,
    job,
    private_redis_port,
    router_proc,
    seqs,
    submit,
    wait_routed,
)

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.gateway_fixtures"]

FULL = [1, 10, 11, 20, 21, 30, 31, 40, 41, 51]


async def wait_history(r: aioredis.Redis, job_id: str, n: int, timeout_s: float = 60) -> list[ScanEvent]:
    """The job's history once it holds `n` events (what it holds when `timeout_s` runs out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        raw: list[bytes] = await r.zrange(keys.history(job_id), 0, -1)  # type: ignore[assignment]
        if len(raw) >= n or time.monotonic() > deadline:
            assert len(raw) <= n, f"more events than expected in the history of {job_id}"
            return [ScanEvent.model_validate_json(x) for x in raw]
        await asyncio.sleep(0.1)


@pytest.fixture
async def rdb(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(isolated_redis_url(settings))
    yield r
    await r.aclose()


async def test_router_applies_state_history_and_metrics(
    settings: Settings, gw_producer: EventProducer, gw_router: Proc, rdb: aioredis.Redis, uid: str
) -> None:
    j = job(uid)
    events = full_events(j)
    await gw_producer.send_all(events)
    await gw_producer.send_all(events[:3])  # duplicates on the log change nothing
    hist = await wait_history(rdb, j.job_id, len(events))
    assert seqs(hist) == FULL
    assert [e.model_dump() for e in hist] == [e.model_dump() for e in events]
    store = StateStore(rdb, settings.state_ttl_s)
    await asyncio.sleep(1.0)  # the duplicates have been routed by now (same partition, in order)
    state = await store.state(j.job_id)
    assert state is not None
    assert (state["seq"], state["stage"], state["user_id"]) == (51, "done", uid)
    assert state["result"]["answer"]["user_answer"] == f"Rinse it ({j.job_id})."
    assert 0 < await rdb.ttl(keys.history(j.job_id)) <= settings.state_ttl_s
    port = gw_router.env["ECO2_METRICS_PORT"]
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    assert 'eco2_router_events_total{result="new"}' in metrics
    assert 'eco2_router_events_total{result="duplicate"}' in metrics
    assert "eco2_router_apply_seconds_count" in metrics
    assert "eco2_router_batch_size_count" in metrics
    await delete_jobs(settings, [j.job_id])


class RedisProxy:
    """A TCP proxy in front of Redis that the test can cut, to simulate a Redis outage for one
    router without disturbing anybody else's Redis."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.conns):
                w.close()
            await self.server.wait_closed()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.conns.update((writer, up_w))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self.conns.difference_update((writer, up_w))


async def test_redis_outage_is_retried_and_never_acked(
    settings: Settings, gw_producer: EventProducer, uid: str
) -> None:
    """While Redis is unreachable the router holds its batch: a router stopped in that state
    has committed nothing, so its successor routes the events. (Own db: the module's router
    writes every new event to db 0.)"""
    db = 1
    redis_port = private_redis_port()
    proxy = RedisProxy(redis_port)
    await proxy.start()
    via_proxy = isolated_redis_url(settings, db, port=proxy.port)
    direct = isolated_redis_url(settings, db)
    rdb = aioredis.from_url(direct)
    group = f"eco2-router-test-{uuid.uuid4().hex[:8]}"
    await commit_at_end(settings, group)
    procs = [router_proc(settings, group, via_proxy)]
    procs[0].start()
    j, j2 = job(uid), job(uid)
    try:
        await wait_routed(settings, gw_producer, procs[0], db=db)
        await proxy.stop()  # Redis outage for this router only
        await gw_producer.send_all(full_events(j))
        await asyncio.sleep(4.0)  # several commit intervals: nothing may be committed meanwhile
        assert await rdb.zcard(keys.history(j.job_id)) == 0
        assert procs[0].alive()
        assert "retrying" in procs[0].log.read_text()
        # Stopped gracefully in that state, it must not commit on its way out either.
        procs[0].kill(signal.SIGTERM)
        assert procs[0].popen is not None and procs[0].popen.returncode == EXIT_UNAPPLIED, procs[0].tail()
        procs.append(router_proc(settings, group, direct))  # same group, Redis reachable
        procs[1].start()
        hist = await wait_history(rdb, j.job_id, 10, timeout_s=90)
        assert seqs(hist) == FULL, procs[1].tail()

        # A router whose Redis comes back simply carries on (retry with backoff) and drops nothing.
        procs[1].kill(signal.SIGTERM)
        await proxy.start()
        procs.append(router_proc(settings, group, via_proxy))
        procs[2].start()
        await wait_routed(settings, gw_producer, procs[2], db=db)
        await proxy.stop()
        await gw_producer.send_all(full_events(j2))
        await asyncio.sleep(2.0)
        await proxy.start()
        hist2 = await wait_history(rdb, j2.job_id, 10, timeout_s=60)
        assert seqs(hist2) == FULL, procs[2].tail()
    finally:
        for p in procs:
            p.kill(signal.SIGTERM)
        await proxy.stop()
        await rdb.delete(*(k for x in (j, j2) for k in (keys.state(x.job_id), keys.history(x.job_id))))
        await rdb.aclose()
        shutil.rmtree(settings.local_dir / "faust" / group, ignore_errors=True)


async def test_sigkill_router_mid_load_clients_get_everything(
    settings: Settings,
    gw_producer: EventProducer,
    gw_router: Proc,
    gw_gateway: str,
    rdb: aioredis.Redis,
    uid: str,
) -> None:
    jobs = [job(uid) for _ in range(16)]

    async def run_job(i: int) -> list[ScanEvent]:
        await asyncio.sleep(i * 0.2)
        rest = await submit(settings, gw_producer, jobs[i])  # as the API: Kafka + Redis
        client = asyncio.create_task(follow(gw_gateway, jobs[i].job_id, uid))
        await gw_producer.send_all(rest, gap_s=0.3)
        return await client

    load = asyncio.gather(*(run_job(i) for i in range(len(jobs))))
    await asyncio.sleep(2.0)
    gw_router.kill(signal.SIGKILL)
    await asyncio.sleep(1.0)
    gw_router.start()  # same group: resumes from its last commit
    results = await asyncio.wait_for(load, timeout=180)
    for j, got in zip(jobs, results, strict=True):
        assert seqs(got) == FULL, (j.job_id, seqs(got), gw_router.tail())
    # The restarted router really did the work: the test db holds every history.
    for j in jobs:
        assert seqs(await wait_history(rdb, j.job_id, 10, timeout_s=5)) == FULL
    await delete_jobs(settings, [j.job_id for j in jobs])


async def test_rebuild_restores_state_and_resumable_history(
    settings: Settings,
    gw_producer: EventProducer,
    gw_router: Proc,
    gw_gateway: str,
    rdb: aioredis.Redis,
    uid: str,
) -> None:
    done_job, failed_job = job(uid), job(uid)
    await gw_producer.send_all(full_events(done_job) + full_events(failed_job, fail_at="answer"))
    await wait_history(rdb, done_job.job_id, 10)
    await wait_history(rdb, failed_job.job_id, 7)
    store = StateStore(rdb, settings.state_ttl_s)
    before = {j.job_id: await store.state(j.job_id) for j in (done_job, failed_job)}

    await delete_jobs(settings, [done_job.job_id, failed_job.job_id])  # "flush" our jobs only
    assert await store.state(done_job.job_id) is None

    env = {"ECO2_REDIS_URL": isolated_redis_url(settings)}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "eco2.cli", "state", "rebuild"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done:" in proc.stdout and "events" in proc.stdout, proc.stdout

    for j in (done_job, failed_job):
        after = await store.state(j.job_id)
        assert after is not None
        assert {k: after[k] for k in ("seq", "stage", "status", "user_id", "result")} == {
            k: before[j.job_id][k] for k in ("seq", "stage", "status", "user_id", "result")  # type: ignore[index]
        }
    # Histories are back and resumable from any point.
    rest = await follow(gw_gateway, done_job.job_id, uid, last_event_id=21)
    assert seqs(rest) == [30, 31, 40, 41, 51]
    failed = await follow(gw_gateway, failed_job.job_id, uid)
    assert seqs(failed) == [1, 10, 11, 20, 21, 30, 99]
    assert failed[-1].status == "failed" and json.loads(failed[-1].model_dump_json())["error"] == "boom"
    await delete_jobs(settings, [done_job.job_id, failed_job.job_id])
