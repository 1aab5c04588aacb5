"""Fixtures of the router/gateway tests; a test module loads them with
`pytest_plugins = ["tests.gateway_fixtures"]` (one router and one gateway per session)."""

from __future__ import annotations

import shutil
import signal
import uuid
from collections.abc import AsyncIterator

import pytest

from contract.settings import Settings

from .gateway_support import (
    EventProducer,
    Proc,
    commit_at_end,
    gateway_proc,
    router_proc,
    wait_ready,
    wait_routed,
)


@pytest.fixture(scope="session")
async def gw_producer(settings: Settings) -> AsyncIterator[EventProducer]:
    async with EventProducer(settings) as p:
        yield p


@pytest.fixture(scope="session")
async def gw_router(
    settings: Settings, stack_status: dict[str, object], gw_producer: EventProducer
) -> AsyncIterator[Proc]:
    group = f"eco2-router-test-{uuid.uuid4().hex[:8]}"
    await commit_at_end(settings, group)
    proc = router_proc(settings, group)
    proc.start()
    try:
        await wait_routed(settings, gw_producer, proc)
        yield proc
    finally:
        proc.kill(signal.SIGTERM)
        shutil.rmtree(settings.local_dir / "faust" / group, ignore_errors=True)


@pytest.fixture(scope="session")
async def gw_gateway(settings: Settings, stack_status: dict[str, object]) -> AsyncIterator[str]:
    proc = gateway_proc(settings)
    proc.start()
    try:
        yield await wait_ready(proc)
    finally:
        proc.kill(signal.SIGTERM)
