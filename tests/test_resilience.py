"""Issue 11: Redis is a disposable view of the Kafka log; dependency blips give no 5xx.

Every test here breaks a dependency of its own (a private redis-server, a private Kafka broker),
never the stack's, so the other tests are not disturbed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.exceptions import BusyLoadingError

import view
from contract import keys
from contract.events import ScanEvent, ScanJob
from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS, FIRST_TOPIC, partition_for
from eco2 import install
from eco2.services import local_quotas
from gateway.client import follow
from view import StateStore
from view.rebuild import rebuild

from .conftest import eco2
from .gateway_support import (
    EventProducer,
    Proc,
    RedisServer,
    commit_at_end,
    free_port,
    full_events,
    gateway_proc,
    job,
    log_path,
    router_proc,
    seqs,
    wait_ready,
    wait_routed,
)

pytestmark = pytest.mark.integration

FULL = [1, 10, 11, 20, 21, 30, 31, 40, 41, 51]




@pytest.fixture
async def producer(settings: Settings, stack_status: dict[str, object]) -> AsyncIterator[EventProducer]:
    async with EventProducer(settings) as p:
        yield p


async def read_until(url: str, user: str, stop_after_seq: int) -> list[int]:
    """A client reading a job's stream from the start and disconnecting after one seq."""
    got: list[int] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=30)) as client:
        async with client.stream("GET", url, headers={"X-User-ID": user}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("id: "):
                    got.append(int(line[4:]))
                    if got[-1] == stop_after_seq:
                        break
    return got


async def history_len(r: aioredis.Redis, job_id: str) -> int:
    return int(await r.zcard(keys.history(job_id)))


async def test_redis_wiped_mid_job_heals_with_no_client_visible_gap(
    settings: Settings, producer: EventProducer, own_redis: RedisServer, uid: str
) -> None:
    """FLUSHALL while jobs are half done, the router kept from rebuilding for a moment while new
    events land in the empty Redis: a late joiner and a client resuming with Last-Event-ID are
    held (not served the partial history) and, once the router has rebuilt the view from
    scan.events, both read exactly the whole sequence."""
    group = f"eco2-router-test-{uuid.uuid4().hex[:8]}"
    await commit_at_end(settings, group)
    router = router_proc(settings, group, own_redis.url)
    router.env["ECO2_VIEW_CHECK_S"] = "0.5"
    gateway = gateway_proc(settings, ECO2_REDIS_URL=own_redis.url, ECO2_VIEW_WAIT_S="30")
    r = aioredis.from_url(own_redis.url)
    jobs = [job(uid) for _ in range(3)]
    events = {j.job_id: full_events(j) for j in jobs}
    router.start()
    gateway.start()
    try:
        await wait_routed(settings, producer, router, redis_url=own_redis.url)
        gw = await wait_ready(gateway)
        for j in jobs:  # the first half of each job: queued, vision, rule (seq 1..21)
            await producer.send_all(events[j.job_id][:5])
        deadline = time.monotonic() + 30
        while not all([await history_len(r, j.job_id) == 5 for j in jobs]):
            assert time.monotonic() < deadline, router.tail()
            await asyncio.sleep(0.1)
        first = await read_until(f"{gw}/api/v1/scan/{jobs[0].job_id}/events", uid, stop_after_seq=11)
        assert first == [1, 10, 11]

        # Redis loses everything; the router is paused so that it cannot notice yet, while the
        # second half of every job lands in the empty Redis (as a live router would apply it).
        assert router.popen is not None
        router.popen.send_signal(signal.SIGSTOP)
        await r.flushall()
        store = StateStore(r, settings.state_ttl_s)
        for j in jobs:
            await producer.send_all(events[j.job_id][5:])
            await store.apply(events[j.job_id][5:])
        resumed = asyncio.create_task(follow(gw, jobs[0].job_id, uid, last_event_id=11))
        late = asyncio.create_task(follow(gw, jobs[1].job_id, uid))
        await asyncio.sleep(2.0)
        # Without the gateway's hold these would be done by now, with [30, 31, 40, 41, 51].
        assert not resumed.done() and not late.done()
        router.popen.send_signal(signal.SIGCONT)
        got_resumed, got_late = await asyncio.wait_for(asyncio.gather(resumed, late), 90)
        assert first + seqs(got_resumed) == FULL, router.tail()
        assert seqs(got_late) == FULL, router.tail()
        # The streams may have been served before the whole window was back (newest first: these
        # jobs are the newest); the view is whole a little later.
        deadline = time.monotonic() + 60
        while await view.current(r) != "ready":
            assert time.monotonic() < deadline, router.tail()
            await asyncio.sleep(0.2)
        after = await follow(gw, jobs[2].job_id, uid)  # and after the rebuild
        assert seqs(after) == FULL
        log = router.log.read_text()
        assert "view rebuild started" in log and "view rebuild done" in log, router.tail()
    finally:
        if router.popen is not None and router.popen.poll() is None:
            router.popen.send_signal(signal.SIGCONT)
        router.kill(signal.SIGTERM)
        gateway.kill(signal.SIGTERM)
        await r.aclose()
        shutil.rmtree(settings.local_dir / "faust" / group, ignore_errors=True)


def api_proc(settings: Settings, redis_url: str, kafka: str | None = None) -> Proc:
    port = free_port()
    name = f"api-{port}"
    return Proc(
        name=name,
        argv=[sys.executable, "-m", "producers"],
        env={
            "ECO2_API_PORT": str(port),
            "ECO2_REDIS_URL": redis_url,
            "ECO2_KAFKA_BOOTSTRAP": kafka or settings.kafka_bootstrap,
            "ECO2_API_SUBMIT_TIMEOUT_S": "5",
            **local_quotas(settings),  # as `eco2 stack up` runs its API: one test user posts many scans
        },
        log=log_path(settings, name),
        extra={"url": f"http://127.0.0.1:{port}"},
    )


@contextlib.asynccontextmanager
async def running_api(settings: Settings, server: RedisServer) -> AsyncIterator[tuple[str, aioredis.Redis]]:
    """A scan API process of the test's own on `server` (its view marked whole, no router needed);
    yields its URL and a client of that Redis."""
    r = aioredis.from_url(server.url)
    await view.mark_ready(r)
    api = api_proc(settings, server.url)
    api.start()
    try:
        yield await wait_ready(api), r
    finally:
        api.kill(signal.SIGTERM)
        await r.aclose()
    assert "Traceback" not in api.log.read_text(), api.tail()


async def post_scan(http: httpx.AsyncClient, user: str, n: int) -> httpx.Response:
    body = {"image_url": f"https://images.example.com/resilience/clear_pet-{n}.jpg"}
    return await http.post("/api/v1/scan", json=body, headers={"X-User-ID": user})


async def test_redis_restart_gives_no_5xx(
    settings: Settings, stack_status: dict[str, object], own_redis: RedisServer, uid: str
) -> None:
    """The API's pooled Redis connections all die with a Redis restart; the next requests must
    reconnect (redis-py's retry), not answer 500. A result asked for while the view is not whole
    is a 503 with Retry-After, never a 500 or a wrong state."""
    async with running_api(settings, own_redis) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            # Warm the pool: many connections, all of which the restart will leave stale.
            first = await asyncio.gather(*(post_scan(http, uid, i) for i in range(20)))
            assert {x.status_code for x in first} == {202}
            job_id = first[0].json()["job_id"]
            posts: list[httpx.Response] = []
            results: list[httpx.Response] = []
            restarted = asyncio.Event()

            async def client(k: int) -> None:  # requests before, during and after the restart
                n = 0
                while not restarted.is_set() or n < 5:
                    posts.append(await post_scan(http, uid, 1000 * k + n))
                    results.append(
                        await http.get(f"/api/v1/scan/{job_id}/result", headers={"X-User-ID": uid})
                    )
                    n += 1

            clients = [asyncio.create_task(client(k)) for k in range(5)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(own_redis.stop, signal.SIGTERM)
            await asyncio.sleep(0.3)  # down for a moment, as a restarting pod would be
            await asyncio.to_thread(own_redis.start)
            restarted.set()
            await asyncio.gather(*clients)
            assert len(posts) > 20
            assert all(x.status_code == 202 for x in posts), [x.text for x in posts if x.status_code != 202]
            for res in results:
                # A restarted Redis is not vouched for until a router rebuilt it: 503 + Retry-After.
                assert res.status_code in (200, 202, 503), res.text
                if res.status_code == 503:
                    assert res.headers["Retry-After"] and res.json()["error"] == "rebuilding", res.text


async def test_post_while_kafka_is_down_is_a_bounded_503_and_accepted_jobs_are_kept(
    settings: Settings, stack_status: dict[str, object], own_redis: RedisServer, tmp_path: Path, uid: str
) -> None:
    """On a Kafka broker of its own: POSTs while it is down answer 503 + Retry-After within the
    stated bound (ECO2_API_SUBMIT_TIMEOUT_S=5, plus slack), and every POST answered 202, before
    and after the outage, is in scan.vision and scan.events."""
    local = tmp_path / "local"
    local.mkdir()
    home = install.kafka_home(settings)
    (local / home.name).symlink_to(home)
    kenv = {
        "ECO2_LOCAL_DIR": str(local),
        "ECO2_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "ECO2_KAFKA_CONTROLLER_PORT": str(free_port()),
    }
    bootstrap = kenv["ECO2_KAFKA_BOOTSTRAP"]
    r = aioredis.from_url(own_redis.url)
    await view.mark_ready(r)
    api = api_proc(settings, own_redis.url, kafka=bootstrap)
    accepted: list[str] = []
    try:
        await asyncio.to_thread(eco2, "stack", "up", "--only", "kafka", env=kenv)
        api.start()
        url = await wait_ready(api, timeout_s=60)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for i in range(5):
                resp = await post_scan(http, uid, i)
                assert resp.status_code == 202, resp.text
                accepted.append(resp.json()["job_id"])
            await asyncio.to_thread(eco2, "stack", "down", "--only", "kafka", env=kenv)
            for i in range(3):
                t0 = time.monotonic()
                resp = await post_scan(http, uid, 10 + i)
                took = time.monotonic() - t0
                assert resp.status_code == 503, resp.text
                assert resp.headers["Retry-After"] and resp.json()["error"] == "unavailable"
                assert took < 5 + 5, f"a POST while Kafka is down took {took:.1f}s"
            await asyncio.to_thread(eco2, "stack", "up", "--only", "kafka", env=kenv)
            deadline = time.monotonic() + 90
            ok = 0
            n = 20
            while ok < 5:  # the API recovers by itself: POSTs are accepted again
                resp = await post_scan(http, uid, n)
                n += 1
                assert resp.status_code in (202, 503), resp.text
                if resp.status_code == 202:
                    accepted.append(resp.json()["job_id"])
                    ok += 1
                else:
                    assert time.monotonic() < deadline, api.tail()
                    await asyncio.sleep(1.0)
        found = await _job_ids(bootstrap, [FIRST_TOPIC, EVENTS])
        for topic in (FIRST_TOPIC, EVENTS):
            missing = [j for j in accepted if j not in found[topic]]
            assert not missing, f"{topic}: accepted jobs missing: {missing}\n{api.tail()}"
    finally:
        api.kill(signal.SIGTERM)
        await r.aclose()
        await asyncio.to_thread(eco2, "stack", "down", "--only", "kafka", env=kenv, check=False)


async def _job_ids(bootstrap: str, topics: list[str]) -> dict[str, set[str]]:
    """Job ids (keys) of every committed record of these topics."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    out: dict[str, set[str]] = {t: set() for t in topics}
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(BY_NAME[t].partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + 60
        left = set(tps)
        while left and time.monotonic() < deadline:
            got = await consumer.getmany(timeout_ms=1000)
            for tp, msgs in got.items():
                for m in msgs:
                    out[tp.topic].add(json.loads(m.value)["job_id"])
            left = {tp for tp in left if await consumer.position(tp) < end[tp]}
    finally:
        await consumer.stop()
    return out


async def test_result_while_the_view_is_lost_comes_from_postgres_or_is_a_503(
    settings: Settings, zero_latency_model: str, own_redis: RedisServer, uid: str
) -> None:
    """An API on a Redis of its own that no router feeds: its cache holds only the `queued` state
    it wrote itself, a stale state. Once that Redis is known to have lost the view, the result
    endpoint no longer trusts it: a finished job is answered from Postgres (the stack's writer
    stored it), an unknown one with 503 + Retry-After, not 404."""
    async with running_api(settings, own_redis) as (url, r):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            job_id = (await post_scan(http, uid, 1)).json()["job_id"]
            path = f"/api/v1/scan/{job_id}/result"
            assert (await http.get(path, headers={"X-User-ID": uid})).status_code == 202  # stale, trusted
            await r.delete(keys.VIEW)  # the view is lost (as after a FLUSHALL)
            deadline = time.monotonic() + 60
            while True:
                resp = await http.get(path, headers={"X-User-ID": uid})
                if resp.status_code == 200:
                    break
                # not yet in Postgres: a declared wait, never the stale 202
                assert resp.status_code == 503 and resp.headers["Retry-After"], resp.text
                assert time.monotonic() < deadline, "the stack's writer never stored the job"
                await asyncio.sleep(0.5)
            assert resp.json()["job_id"] == job_id and resp.json()["status"] == "completed"
            other = await http.get(path, headers={"X-User-ID": "someone-else"})
            assert other.status_code == 404
            unknown = await http.get(f"/api/v1/scan/{uuid.uuid4().hex}/result", headers={"X-User-ID": uid})
            assert unknown.status_code == 503 and unknown.json()["error"] == "rebuilding"


async def test_view_claim_one_rebuilder_and_restart_detection(own_redis: RedisServer) -> None:
    """The marker's rules, on a real Redis: a missing view is claimed by one router only (the
    lease), a marker of another server run (a restart) counts as lost, and a rebuild finishing
    after the view was lost again does not mark it ready."""
    r = aioredis.from_url(own_redis.url)
    try:
        a, b = view.Claim(r, "router-a", 5), view.Claim(r, "router-b", 5)
        assert await view.current(r) == "lost"
        assert await a.take() and not await b.take()  # one rebuilder at a time
        assert await view.current(r) == "rebuilding"
        assert await a.renew() and await a.finish()
        assert await view.current(r) == "ready" and not await b.take()
        await r.hset(keys.VIEW, "run_id", "another-server-run")  # as after a restart (AOF)
        assert await view.current(r) == "lost"
        assert await b.take()
        await r.flushall()  # lost again while b rebuilds
        assert not await b.renew() and not await b.finish()
        assert await view.current(r) == "lost"
        await r.hset(keys.VIEW, mapping={"status": "rebuilding", "run_id": await view.run_id(r)})
        assert await a.take()  # rebuilding, but its rebuilder's lease is gone: taken over
    finally:
        await r.aclose()


async def test_rebuild_replays_the_window_not_the_whole_log(
    settings: Settings, producer: EventProducer, own_redis: RedisServer, uid: str
) -> None:
    """The automatic rebuild starts at offsets-for-times(since): an event older than the window
    stays out, one inside it is replayed, and nothing is published while replaying."""
    old, new = job(uid), job(uid)
    await producer.send(full_events(old)[0])
    await asyncio.sleep(1.5)
    since_ms = int(time.time() * 1000)
    await producer.send(full_events(new)[0])
    r = aioredis.from_url(own_redis.url)
    ps = r.pubsub()
    try:
        await ps.psubscribe("scan:live:*")
        store = StateStore(r, settings.state_ttl_s, publish=False)
        stats = await rebuild(settings, echo=lambda _: None, since_ms=since_ms, store=store)
        assert new.job_id in stats.jobs and old.job_id not in stats.jobs
        assert await history_len(r, new.job_id) == 1 and await history_len(r, old.job_id) == 0
        msgs = []
        until = time.monotonic() + 1.0
        while time.monotonic() < until:  # (None also stands for the subscribe confirmation)
            if (m := await ps.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
                msgs.append(m)
        assert msgs == []
    finally:
        await ps.aclose()
        await r.aclose()


async def test_view_checkpoint_survives_a_restart_and_nothing_else(own_redis: RedisServer) -> None:
    """The checkpoint (offsets below which the view is whole) is written only while the view is
    ready on this server run; a claim after a restart (the marker came back from the AOF) hands
    it to the new rebuild; after a flush, or with a checkpoint of another epoch, there is none."""
    r = aioredis.from_url(own_redis.url)
    try:
        rid = await view.run_id(r)
        a = view.Claim(r, "router-a", 5)
        assert not await view.checkpoint(r, rid, {0: 5})  # no view yet: nothing to vouch for
        assert await a.take() and await a.finish()
        assert not await view.checkpoint(r, "another-server-run", {0: 5})
        assert await view.checkpoint(r, rid, {0: 5, 1: 7, 3: 2})

        await r.hset(keys.VIEW, "run_id", "another-server-run")  # as after a restart (AOF)
        b = view.Claim(r, "router-b", 5)
        assert await b.take()
        resumed = await b.resume_offsets()
        assert resumed is not None and resumed[0] == {0: 5, 1: 7, 3: 2}
        assert not await view.checkpoint(r, rid, {0: 9})  # rebuilding: not ready
        await r.delete(keys.VIEW_REBUILDER)  # b died mid-rebuild: c takes over, from the same point
        c = view.Claim(r, "router-c", 5)
        assert await c.take()
        assert (await c.resume_offsets() or ({},))[0] == {0: 5, 1: 7, 3: 2}
        assert await b.resume_offsets() is None  # b's epoch is over
        assert await c.finish() and await view.checkpoint(r, rid, {0: 9, 1: 9})

        await r.flushall()  # everything lost: the whole window
        d = view.Claim(r, "router-d", 5)
        assert await d.take() and await d.resume_offsets() is None and await d.finish()
        await r.hset(keys.VIEW_CHECKPOINT, mapping={"epoch": "an-older-epoch", "p0": 1})
        await r.hset(keys.VIEW, "run_id", "another-server-run")
        e = view.Claim(r, "router-e", 5)
        assert await e.take() and await e.resume_offsets() is None  # not the marker's epoch
        assert not await r.exists(keys.VIEW_CHECKPOINT)
    finally:
        await r.aclose()


async def end_offsets(settings: Settings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_kwargs())
    await consumer.start()
    try:
        tps = [TopicPartition(EVENTS, p) for p in range(BY_NAME[EVENTS].partitions)]
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


async def test_redis_restart_rebuilds_from_the_checkpoint_not_the_window(
    settings: Settings, producer: EventProducer, own_redis: RedisServer, uid: str
) -> None:
    """A clean restart (the AOF reloads everything, under a new run_id): the router replays from
    its checkpoint, not the day-long window: the job routed before the checkpoint is not read
    again, the one produced during the rebuild is whole."""
    group = f"eco2-router-test-{uuid.uuid4().hex[:8]}"
    await commit_at_end(settings, group)
    router = router_proc(settings, group, own_redis.url)
    router.env.update(ECO2_VIEW_CHECK_S="0.5", ECO2_VIEW_CHECKPOINT_S="0.5")
    r = aioredis.from_url(own_redis.url)
    before, during = job(uid), job(uid)
    router.start()
    try:
        await wait_routed(settings, producer, router, redis_url=own_redis.url)
        await producer.send_all(full_events(before))
        deadline = time.monotonic() + 30
        while await history_len(r, before.job_id) < len(FULL):
            assert time.monotonic() < deadline, router.tail()
            await asyncio.sleep(0.1)
        end = await end_offsets(settings)
        deadline = time.monotonic() + 30
        while True:  # a checkpoint at the log's end: it covers `before` (commits follow applies)
            cp = {k.decode(): v.decode() for k, v in (await r.hgetall(keys.VIEW_CHECKPOINT)).items()}  # type: ignore[misc,union-attr]
            if all(int(cp.get(f"p{p}", -1)) >= off for p, off in end.items()):
                break
            assert time.monotonic() < deadline, (cp, end, router.tail())
            await asyncio.sleep(0.2)

        await r.aclose()
        own_redis.stop()  # SIGTERM: a clean shutdown writes the AOF out
        own_redis.start()
        r = aioredis.from_url(own_redis.url)
        await producer.send_all(full_events(during))

        async def healed() -> bool:
            with contextlib.suppress(BusyLoadingError):  # still loading the AOF
                return await view.current(r) == "ready" and await history_len(r, during.job_id) == len(FULL)
            return False

        deadline = time.monotonic() + 60
        while not await healed():
            assert time.monotonic() < deadline, router.tail()
            await asyncio.sleep(0.2)
        assert await history_len(r, before.job_id) == len(FULL)  # back from the AOF
        log = router.log.read_text()
        assert "from the checkpoint" in log, router.tail()
        done = [line for line in log.splitlines() if "view rebuild done" in line][-1]
        replayed = int(done.split("): ")[1].split(" events replayed")[0])
        # Only what came after the checkpoint (at most `during`); the window (the 5 minutes of
        # router_proc) holds `before` and the probe events too.
        assert replayed <= len(FULL), done
    finally:
        router.kill(signal.SIGTERM)
        await r.aclose()
        shutil.rmtree(settings.local_dir / "faust" / group, ignore_errors=True)


async def _produce_many(producer: EventProducer, events: list[ScanEvent]) -> None:
    """`producer.send` for many events at once (pipelined, then all awaited): a long log quickly."""
    futures = [
        await producer.producer.send(
            EVENTS,
            ev.model_dump_json().encode(),
            key=ev.job_id.encode(),
            partition=partition_for(ev.job_id, BY_NAME[EVENTS].partitions),
        )
        for ev in events
    ]
    await asyncio.gather(*futures)


async def test_a_flushed_view_serves_recent_jobs_first_and_never_a_partial_history(
    settings: Settings, producer: EventProducer, own_redis: RedisServer, uid: str
) -> None:
    """Issue 22: after a FLUSHALL the router replays the log newest first (small chunks here, so
    that the replay of a few thousand events takes many rounds). The newest job's stream is
    served whole while the view is still rebuilding; an old job whose queued event is not back
    gets a 503 (never its partial history); once the rebuild ends it is served whole, and the
    finished jobs kept only their finished TTL."""
    group = f"eco2-router-test-{uuid.uuid4().hex[:8]}"
    await commit_at_end(settings, group)
    router = router_proc(settings, group, own_redis.url)
    # A window of 2 minutes: the router's first rebuild (a new Redis) need not replay the log of
    # earlier runs of this test.
    router.env.update(ECO2_VIEW_CHECK_S="0.5", ECO2_REBUILD_CHUNK="10", ECO2_REBUILD_WINDOW_S="120")
    gateway = gateway_proc(settings, ECO2_REDIS_URL=own_redis.url, ECO2_VIEW_WAIT_S="2")
    r = aioredis.from_url(own_redis.url)
    old = [job(uid) for _ in range(4)]
    filler = [job(f"{uid}-f") for _ in range(400)]
    recent = job(uid)
    router.start()
    gateway.start()
    try:
        await wait_routed(settings, producer, router, redis_url=own_redis.url)
        gw = await wait_ready(gateway)
        # The log, oldest first: the old jobs, 4000 events of others, the recent job.
        await _produce_many(producer, [ev for j in old for ev in full_events(j)])
        await _produce_many(producer, [ev for j in filler for ev in full_events(j)])
        await _produce_many(producer, full_events(recent))
        deadline = time.monotonic() + 60
        while await history_len(r, recent.job_id) < len(FULL):
            assert time.monotonic() < deadline, router.tail()
            await asyncio.sleep(0.2)
        assert all([await history_len(r, j.job_id) == len(FULL) for j in old])

        await r.flushall()
        t0 = time.monotonic()
        got = await asyncio.wait_for(follow(gw, recent.job_id, uid), 60)
        served_s = time.monotonic() - t0
        assert router.popen is not None
        router.popen.send_signal(signal.SIGSTOP)  # freeze the replay where it is
        assert seqs(got) == FULL, router.tail()  # whole and gap-free, from the first event
        assert (await r.hget(keys.VIEW, "status")) == b"rebuilding", "the rebuild ended first"
        assert (await r.hget(keys.VIEW, "order")) == view.marker.NEWEST_FIRST.encode()
        held = [j for j in old if not await r.zcount(keys.history(j.job_id), 1, 1)]
        assert held, "every old job was back already"
        async with httpx.AsyncClient(timeout=30) as http:
            answers = await asyncio.gather(
                *(http.get(f"{gw}/api/v1/scan/{j.job_id}/events", headers={"X-User-ID": uid}) for j in held)
            )
        for resp in answers:  # held for ECO2_VIEW_WAIT_S, then refused: never the partial history
            assert resp.status_code == 503 and resp.headers["Retry-After"], resp.text

        router.popen.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 60
        while await view.current(r) != "ready":
            assert time.monotonic() < deadline, router.tail()
            await asyncio.sleep(0.2)
        for j in old:
            assert seqs(await follow(gw, j.job_id, uid)) == FULL
        ttls = [await r.ttl(keys.state(j.job_id)) for j in (*old, recent, *filler[:20])]
        assert all(0 < t <= settings.result_ttl_s for t in ttls), ttls
        log = router.log.read_text()
        assert "newest chunk of every partition is back" in log, router.tail()
        print(f"recent job served {served_s:.2f}s after the flush; {len(held)}/{len(old)} old jobs held")
    finally:
        if router.popen is not None and router.popen.poll() is None:
            router.popen.send_signal(signal.SIGCONT)
        router.kill(signal.SIGTERM)
        gateway.kill(signal.SIGTERM)
        await r.aclose()
        shutil.rmtree(settings.local_dir / "faust" / group, ignore_errors=True)


async def test_result_during_a_newest_first_rebuild_vouches_per_job(
    settings: Settings, own_redis: RedisServer, uid: str
) -> None:
    """Issue 22, the result endpoint: while the view is rebuilt newest first, a running job whose
    queued event is back is answered from Redis (202, processing); one with only later events
    back is a 503 `rebuilding` (it is in no Postgres row either), never its partial state; and a
    rebuild that does not replay newest first (from a checkpoint) vouches for no job."""
    whole, partial = job(uid), job(uid)
    async with running_api(settings, own_redis) as (url, r):
        claim = view.Claim(r, "test", 30)
        await r.delete(keys.VIEW)  # lost, as after a FLUSHALL
        assert await claim.take()
        store = StateStore(r, settings.state_ttl_s, settings.result_ttl_s, publish=False)
        await store.apply(full_events(whole)[:4])  # queued, vision started/completed, rule started
        await store.apply(full_events(partial)[2:4])  # its queued event not back yet
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def status(j: ScanJob) -> tuple[int, str]:
                resp = await http.get(f"/api/v1/scan/{j.job_id}/result", headers={"X-User-ID": uid})
                return resp.status_code, resp.json().get("error", resp.json().get("status", ""))

            # Claimed, not (yet) declared newest first: nothing is vouched for.
            assert await status(whole) == (503, "rebuilding")
            assert await claim.replay_newest_first()
            assert await status(whole) == (202, "processing")
            assert await status(partial) == (503, "rebuilding")
            assert await claim.finish()
            assert await status(partial) == (202, "processing")  # the view vouches for all now
