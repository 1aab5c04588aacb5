"""Issue 16: a gateway process holds nothing per connection once the connection is gone.

sse-starlette 3.1.1 leaked one watcher task per SSE connection (sse-starlette #152): servers
became unresponsive after days. Here a gateway of the test's own (private Redis) serves rounds of
streams of every kind a soak produces: followed to the end, dropped and resumed with
Last-Event-ID, abandoned mid-stream, opened on a finished job (history only), answered 204. After
each round its `eco2_asyncio_tasks`, open streams and open fds must be back where they were: a
per-connection leak grows with every round. Runs in about 10 s.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

import view
from bench import wire
from contract.settings import Settings
from runtime.metrics import ASYNCIO_TASKS
from view import StateStore

from .gateway_support import full_events, gateway_proc, isolated_redis_url, job, wait_ready

pytestmark = pytest.mark.integration

FULL = [1, 10, 11, 20, 21, 30, 31, 40, 41, 51]
ROUNDS = 3
PER_KIND = 8


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[tuple[str, int]]:
    r = aioredis.from_url(isolated_redis_url(settings))
    try:  # no router feeds this Redis: the view is ready as it stands (else every stream is a 503)
        await view.mark_ready(r)
    finally:
        await r.aclose()
    proc = gateway_proc(settings)
    proc.start()
    try:
        yield await wait_ready(proc), proc.pid
    finally:
        proc.kill(signal.SIGTERM)


async def gauges(url: str, pid: int) -> tuple[int, int, int]:
    """(asyncio tasks, open streams, open fds) of the gateway process."""
    async with httpx.AsyncClient(timeout=5, follow_redirects=True) as http:
        text = (await http.get(f"{url}/metrics")).text

    def value(name: str) -> int:
        m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
        assert m, f"{name} missing from the gateway's metrics"
        return int(float(m.group(1)))

    return value(ASYNCIO_TASKS), value("eco2_gateway_streams"), len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def one_round(url: str, store: StateStore, uid: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    gw = (host, int(port))
    live = [job(uid) for _ in range(3 * PER_KIND)]
    done = [job(uid) for _ in range(PER_KIND)]
    await store.apply([ev for j in done for ev in full_events(j)])
    for j in live:  # the first three events now, the rest while clients are connected
        await store.apply(full_events(j)[:3])

    async def follow(j_id: str, drop_after: int | None = None, stop_after: int | None = None) -> wire.Follow:
        return await wire.follow(*gw, j_id, uid, timeout_s=30, drop_after=drop_after, stop_after=stop_after)

    clients = [asyncio.create_task(follow(j.job_id)) for j in live[:PER_KIND]]
    clients += [asyncio.create_task(follow(j.job_id, drop_after=2)) for j in live[PER_KIND : 2 * PER_KIND]]
    clients += [
        asyncio.create_task(follow(j.job_id, stop_after=k % 3)) for k, j in enumerate(live[2 * PER_KIND :])
    ]
    clients += [asyncio.create_task(follow(j.job_id)) for j in done]
    await asyncio.sleep(0.5)
    for j in live:
        await store.apply(full_events(j)[3:])
    results = await asyncio.gather(*clients)
    for f in results[: 2 * PER_KIND] + results[3 * PER_KIND :]:
        assert f.seqs == FULL, f
    assert all(f.error == "abandoned" for f in results[2 * PER_KIND : 3 * PER_KIND])
    async with httpx.AsyncClient() as http:  # finished and delivered: 204, no stream at all
        r = await http.get(
            f"{url}/api/v1/scan/{done[0].job_id}/events", headers={"X-User-ID": uid, "Last-Event-ID": "51"}
        )
        assert r.status_code == 204


async def settled(url: str, pid: int, want: tuple[int, int, int]) -> tuple[int, int, int]:
    """The gauges once closed connections have been torn down (a few seconds at most)."""
    got = await gauges(url, pid)
    for _ in range(50):
        if got[0] <= want[0] and got[1] == 0 and got[2] <= want[2]:
            break
        await asyncio.sleep(0.2)
        got = await gauges(url, pid)
    return got


async def test_no_task_stream_or_fd_is_left_per_connection(
    settings: Settings, stack_status: dict[str, object], gateway: tuple[str, int], uid: str
) -> None:
    url, pid = gateway
    r = aioredis.from_url(isolated_redis_url(settings))
    store = StateStore(r, 600)
    try:
        await one_round(url, store, uid)  # warms what is created once (pools, a shutdown watcher)
        base = await settled(url, pid, (10**6, 0, 10**6))
        await asyncio.sleep(1.0)
        base = await gauges(url, pid)
        for _ in range(ROUNDS):
            await one_round(url, store, uid)
        # 4 x PER_KIND x ROUNDS = 96 more connections: a leak of one task or fd each shows here.
        tasks, streams, fds = await settled(url, pid, base)
        assert streams == 0
        assert tasks <= base[0], f"asyncio tasks {base[0]} -> {tasks} after {4 * PER_KIND * ROUNDS} streams"
        assert fds <= base[2] + 2, f"open fds {base[2]} -> {fds}"
    finally:
        await r.aclose()
