"""Issue 22.1: the deployed alert rules, in a real Prometheus, fire on a real fault and resolve.

Debian's Prometheus scrapes a router of this test's own (its own consumer group and Redis, so the
stack's processes and the other tests are not disturbed) with the rule groups of
deploy/monitoring/rules.yaml, `for` capped at 3 s and range windows at 10 s (bench/prometheus.py
renders and reports the caps). Redis killed under traffic: the router's real retry counter makes
Eco2RouterRedisErrors go pending -> firing, and it resolves once Redis is back. The router
frozen (SIGSTOP): Eco2ConsumerDown, resolved by SIGCONT. The full set of faults, at the real
values where short, is `eco2 chaos --alerts` (bench/alerts.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bench import prometheus as prom
from contract.settings import Settings

from .gateway_support import (
    EventProducer,
    Proc,
    commit_at_end,
    free_port,
    full_events,
    job,
    router_proc,
    start_redis,
    wait_routed,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(prom.BINARY).exists(), reason="no prometheus (eco2 stack up installs it)"),
]

INTERVAL_S = 1.0
CAPS = prom.Caps(for_s=3, window_s=10)


@pytest.fixture
async def producer(settings: Settings, stack_status: dict[str, object]) -> AsyncIterator[EventProducer]:
    async with EventProducer(settings) as p:
        yield p


def _redis(port: int, data: Path) -> subprocess.Popen[bytes]:
    return start_redis(port, data)


async def _metrics_up(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


async def test_router_redis_errors_and_a_frozen_router_fire_and_resolve_in_prometheus(
    settings: Settings, producer: EventProducer, uid: str
) -> None:
    rules, changes = prom.render_rules(prom.rule_groups(), CAPS)
    fors = prom.alert_fors(rules)
    assert {c.alert for c in changes} >= {"Eco2RouterRedisErrors", "Eco2ConsumerDown"}, (
        "the caps are explicit"
    )
    redis_port, redis_dir = free_port(), Path(tempfile.mkdtemp(prefix="eco2-test-alerts-"))
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    group = f"eco2-router-test-alerts-{uuid.uuid4().hex[:8]}"
    await commit_at_end(settings, group)
    router = router_proc(settings, group, redis_url)
    metrics_port = int(router.env["ECO2_METRICS_PORT"])
    target = prom.Target("eco2-consumers", f"127.0.0.1:{metrics_port}", f"router-{uid}", "router")
    redis = _redis(redis_port, redis_dir)
    router.start()
    try:
        await wait_routed(settings, producer, router, redis_url=redis_url)
        await _metrics_up(f"http://127.0.0.1:{metrics_port}/metrics")
        async with prom.running(settings, rules, INTERVAL_S, scrape=[target]) as p:
            watch = prom.Watch(p)
            watch.start()
            try:
                deadline = time.monotonic() + 30
                while not (await p.targets_up()).get(target.pod):
                    assert time.monotonic() < deadline, "the router's scrape never succeeded"
                    await asyncio.sleep(0.5)
                assert await p.query("eco2_router_redis_errors_total") != []
                await asyncio.sleep(3 * INTERVAL_S)
                assert watch.ever == set(), f"alerts before any fault: {watch.ever}"

                # Fault 1: Redis killed while events arrive; the router retries (and counts it).
                watch.mark()
                redis.kill()
                redis.wait(timeout=10)
                j = job(uid)
                await producer.send_all(full_events(j)[:3])
                name = "Eco2RouterRedisErrors"
                assert await watch.until(name, "firing", 60), f"{name} never fired: {watch.seen}"
                seen = watch.seen[name]
                assert seen.pending_s is not None and seen.firing_s is not None
                assert seen.firing_s - seen.pending_s <= fors[name] + 2 * INTERVAL_S + 1.0
                assert seen.labels == [{"pod": target.pod}]
                assert "Eco2ConsumerDown" not in watch.seen, "the router was alive all along"
                redis = _redis(redis_port, redis_dir)  # back, same port and data (AOF)
                assert await watch.until(name, "resolved", 60), f"{name} never resolved: {watch.seen}"

                # Fault 2: the router frozen: its own series cannot tell, only the failed scrape.
                watch.mark()
                _signal(router, signal.SIGSTOP)
                name = "Eco2ConsumerDown"
                try:
                    assert await watch.until(name, "firing", 30), f"{name} never fired: {watch.seen}"
                finally:
                    _signal(router, signal.SIGCONT)
                seen = watch.seen[name]
                assert seen.pending_s is not None and seen.firing_s is not None
                assert seen.firing_s - seen.pending_s <= fors[name] + 2 * INTERVAL_S + 1.0
                assert await watch.until(name, "resolved", 30), f"{name} never resolved: {watch.seen}"
            finally:
                await watch.stop()
    finally:
        if router.alive():
            _signal(router, signal.SIGCONT)
        router.stop()
        if redis.poll() is None:
            redis.kill()
            redis.wait(timeout=10)
        shutil.rmtree(redis_dir, ignore_errors=True)


def _signal(proc: Proc, sig: int) -> None:
    assert proc.popen is not None
    os.killpg(proc.popen.pid, sig)
