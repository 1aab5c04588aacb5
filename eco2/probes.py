"""Readiness probes of the stack's services: does it answer (not merely: is its port open)?"""

from __future__ import annotations

import socket
from collections.abc import Callable

from contract.settings import Settings

from .service import ReadyCheck


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


async def redis_ready(s: Settings) -> bool:
    import redis.asyncio as aioredis

    client = aioredis.from_url(s.redis_url, socket_connect_timeout=2)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def postgres_ready(s: Settings) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(s.postgres_dsn, timeout=3)
    except Exception:
        return False
    try:
        return await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def http_ready(path: str, url_of: Callable[[Settings], str]) -> ReadyCheck:
    async def check(s: Settings) -> bool:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(url_of(s) + path)).status_code == 200
        except Exception:
            return False

    return check


async def broker_answers(address: str, brokers: int = 1) -> bool:
    """True when the broker at `address` serves metadata naming at least `brokers` brokers."""
    from aiokafka.client import AIOKafkaClient

    if not port_open(*host_port(address)):
        return False
    client = AIOKafkaClient(bootstrap_servers=address, request_timeout_ms=3000)
    try:
        await client.bootstrap()
        return len(client.cluster.brokers()) >= brokers
    except Exception:
        return False
    finally:
        await client.close()
