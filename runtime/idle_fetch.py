"""Idle consumers long-poll the broker for longer, and answer the first record at once (issue 19).

A consumer's fetch waits at most `fetch_max_wait_ms` for `fetch_min_bytes` (64 KiB here, so
several records share a fetch). On an idle topic every fetch times out empty, so the stack's
three consumers (stage workers 100 ms, router 50 ms, writer) asked the broker ~31 times a second
for nothing: about 1.2 ms of broker CPU each (network thread, handler, fetch purgatory and its
executor), most of the idle broker's 5% of a core (bench/reports/issue19-broker/round4/).

This patch makes a fetch that follows an empty one ask for `min_bytes=1` with `idle_wait_ms`:
the broker holds it until the first committed record arrives (then answers at once) or the
long wait ends. A fetch that follows one with records uses the consumer's own settings, so a
loaded consumer batches exactly as before. Latency never grows: the first record after a quiet
spell is answered immediately (before: after up to the consumer's max wait), later ones as
before. Per broker node, since a consumer fetches from each partition leader separately. Not
while any partition is paused or has records not yet consumed: its next fetch must not wait.

Installed per process (`install`): Faust apps (`streams.app.create_app`) and the writer.
`tests/test_idle_fetch.py` fails when aiokafka changes what this relies on.
"""

from __future__ import annotations

from typing import Any

from aiokafka.consumer.fetcher import Fetcher
from aiokafka.protocol.fetch import FetchRequest

IDLE_MIN_BYTES = 1


def install(idle_wait_ms: int) -> None:
    """Patch aiokafka's Fetcher for this process (0 = off: every fetch as configured); idempotent,
    the last call's wait wins."""
    cls: Any = Fetcher
    cls._eco2_idle_wait_ms = max(0, idle_wait_ms)
    if getattr(cls, "_eco2_idle_fetch", False):
        return
    probe = FetchRequest(1, 1, 1, 0, [])
    if not (hasattr(probe, "_max_wait_ms") and hasattr(probe, "_min_bytes")):
        raise RuntimeError("aiokafka's FetchRequest changed: update runtime/idle_fetch.py")
    actions, proc = cls._get_actions_per_node, cls._proc_fetch_request

    def get_actions_per_node(self: Any, assignment: Any) -> Any:
        result = actions(self, assignment)
        wait = cls._eco2_idle_wait_ms
        idle: set[int] = getattr(self, "_eco2_idle_nodes", set())
        # Not while a partition waits: a paused one (resume_futures) or records not yet consumed
        # would otherwise be fetched only after the long wait.
        if wait > self._fetch_max_wait_ms and idle and not result[4] and not self._records:
            for node_id, request in result[0]:  # (fetch_requests, reset_requests, timeout, ...)
                if node_id in idle:
                    request._max_wait_ms, request._min_bytes = wait, IDLE_MIN_BYTES
        return result

    async def proc_fetch_request(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
        got: bool = await proc(self, assignment, node_id, request)
        idle = self.__dict__.setdefault("_eco2_idle_nodes", set())
        if got:
            idle.discard(node_id)
        else:
            idle.add(node_id)
        return got

    cls._get_actions_per_node = get_actions_per_node
    cls._proc_fetch_request = proc_fetch_request
    cls._eco2_idle_fetch_originals = (actions, proc)  # for tests
    cls._eco2_idle_fetch = True
