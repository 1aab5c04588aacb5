"""After a Kafka outage: does every consumer (stage workers, router, writer) resume by itself?

Read from each consumer's /health (runtime/health.py): a consumer has resumed once it holds its
partitions with no rebalance under way and, where Faust reports it, its flow running
(`consumer.flow_active`, the flag a stalled member left False for ever: streams/rejoin.py), and it
is either idle (nothing pending) or fetching/committing again (progress within `fresh_s`). Such a
state must hold for `steady_s`, since a rebalance resets the stall clock: one look proves nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from contract.settings import Settings

from . import prometheus as prom


def resumed(body: dict[str, Any], fresh_s: float) -> bool:
    """One /health answer: is this consumer consuming (or idle with nothing to do)?"""
    inner = body.get("consumer") or {}
    if inner.get("flow_active") is False or inner.get("rebalancing"):
        return False
    if not body.get("assigned"):
        return False
    return not body.get("pending") or body.get("since_progress_s", fresh_s) < fresh_s


async def consumers_resumed(
    s: Settings, timeout_s: float, fresh_s: float = 10.0, steady_s: float = 20.0
) -> tuple[float | None, dict[str, str]]:
    """Seconds until every consumer had resumed and stayed so for `steady_s` (None: not within
    `timeout_s`), and for each one not resumed at the end, its last /health in short."""
    t0 = time.monotonic()
    consumers = [t for t in prom.targets(s) if t.job == "eco2-consumers"]
    since: dict[str, float] = {}
    last: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() - t0 < timeout_s:
            now = time.monotonic()
            for t in consumers:
                try:
                    body = (await client.get(f"http://{t.address}/health")).json()
                except (httpx.HTTPError, ValueError) as exc:
                    body = {"error": type(exc).__name__}
                if "error" not in body and resumed(body, fresh_s):
                    since.setdefault(t.pod, now)
                    last.pop(t.pod, None)
                else:
                    since.pop(t.pod, None)
                    last[t.pod] = _short(body)
            if len(since) == len(consumers) and all(now - at >= steady_s for at in since.values()):
                return round(max(since.values()) - t0, 1), {}
            await asyncio.sleep(1.0)
    return None, last


def _short(body: dict[str, Any]) -> str:
    if "error" in body:
        return str(body["error"])
    inner = body.get("consumer") or {}
    return (
        f"pending {body.get('pending')}, no progress for {body.get('since_progress_s')}s, "
        f"flow_active {inner.get('flow_active')}, rebalancing {inner.get('rebalancing')}, "
        f"generation {inner.get('coordinator_generation')}"
    )
