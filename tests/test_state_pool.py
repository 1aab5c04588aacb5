"""Redis clients of the API and stage workers queue for a connection instead of failing."""

from __future__ import annotations

import asyncio

import pytest

from contract.settings import Settings
from view import pooled_client

pytestmark = pytest.mark.integration


async def test_more_concurrent_requests_than_connections_all_succeed(settings: Settings, stack_status, uid):
    client = pooled_client(settings.redis_url, 2, f"test-{uid}")
    try:
        # BLPOP holds its connection for a moment, so 40 concurrent calls need to queue for the 2.
        results = await asyncio.gather(
            *(client.blpop([f"test:none:{uid}:{i}"], timeout=0.05) for i in range(40))
        )
        assert results == [None] * 40
        clients = await client.client_list()
        assert sum(1 for c in clients if c.get("name") == f"test-{uid}") <= 2
    finally:
        await client.aclose()


async def test_closing_the_client_closes_its_pool(settings: Settings, stack_status, uid):
    """A component's shutdown (`aclose()`) hangs up every pooled connection: a client built on a
    pool it was handed would leave them open (redis-py closes only a pool the client owns)."""
    name = f"test-close-{uid}"
    client = pooled_client(settings.redis_url, 4, name)
    await asyncio.gather(*(client.blpop([f"test:none:{uid}:{i}"], timeout=0.05) for i in range(4)))
    watcher = pooled_client(settings.redis_url, 1, f"test-watch-{uid}")
    try:
        assert any(c.get("name") == name for c in await watcher.client_list())
        await client.aclose()
        for _ in range(50):
            if not any(c.get("name") == name for c in await watcher.client_list()):
                break
            await asyncio.sleep(0.1)
        assert not any(c.get("name") == name for c in await watcher.client_list())
    finally:
        await watcher.aclose()
