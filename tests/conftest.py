"""Integration tests talk to the stack `eco2 stack up` started (make test does that first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contract.settings import Settings, get_settings

REPO = Path(__file__).resolve().parent.parent
ECO2 = [sys.executable, "-m", "eco2.cli"]


def eco2(
    *args: str, timeout: float = 180, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the operator CLI exactly as a user would (`env` adds ECO2_* overrides)."""
    proc = subprocess.run(
        [*ECO2, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        cmd = " ".join(args)
        raise AssertionError(f"eco2 {cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def stack_status() -> dict[str, dict[str, object]]:
    out = json.loads(eco2("stack", "status", "--json").stdout)["services"]
    down = [name for name, info in out.items() if not info["up"]]
    if down:
        pytest.fail(f"services down: {down}; run `eco2 stack up` (make test does)")
    return out


@pytest.fixture(scope="session")
def zero_latency_model(settings: Settings, stack_status):  # type: ignore[no-untyped-def]
    """The simulated model answers at once during tests (its default is the hosted 5-10 s)."""
    import httpx

    base = f"http://{settings.model_host}:{settings.model_port}"
    before = httpx.get(f"{base}/admin/latency").json()
    httpx.put(f"{base}/admin/latency", json={"min_s": 0, "max_s": 0}).raise_for_status()
    yield base
    httpx.put(f"{base}/admin/latency", json=before)


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
async def own_redis():  # type: ignore[no-untyped-def]
    """A Redis of the test's own (configured as the stack's), to stop, kill and restart at will."""
    from .gateway_support import RedisServer

    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


@asynccontextmanager
async def scratch_topic(settings: Settings, prefix: str, partitions: int) -> AsyncIterator[str]:
    """A topic of the test's own (a unique name), deleted after it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()
