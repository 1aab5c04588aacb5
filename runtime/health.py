"""Health of a long-running consumer: alive is not enough, it must be making progress.

A Faust agent can sit forever after a rebalance or a heartbeat failure with its process, its
event loop and its /metrics endpoint all fine (faust-streaming #175, #523, #532, #629). So each
consumer (stage workers, router, writer) keeps a `Progress` record that a watcher task in its
event loop refreshes, and serves `/health` (liveness) and `/ready` (readiness) next to `/metrics`
from a thread, so the answer comes even while the loop is blocked:

- event loop blocked longer than `health_loop_block_s` (the watcher's beat is late): not alive;
- work pending on its partitions (fetched-not-finished, or unread below the end offset) and
  neither a fetch nor a commit for `health_stall_s`: not alive, unless the component retried a
  dependency (Redis, Postgres) meanwhile: then alive but not ready (a restart would not help);
- no partitions `health_unassigned_s` after the last rebalance: not alive;
- an idle consumer with nothing pending stays healthy however long nothing happens.

`health_stall_s` must exceed the longest legitimate job (stage timeout x attempts): one slow job
holds its partition's commit, and with nothing else arriving that looks like a stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import Gauge
from prometheus_client.exposition import MetricsHandler

log = logging.getLogger("eco2.health")

LAG = Gauge(
    "eco2_consumer_lag",
    "records pending per partition: fetched but not finished, plus unread below the end offset",
    ["group", "topic", "partition"],
)
OLDEST_IN_FLIGHT = Gauge(
    "eco2_consumer_oldest_in_flight_seconds",
    "age of the oldest delivered-but-unacked message per partition (it holds the commit)",
    ["group", "topic", "partition"],
)
HEALTHY = Gauge("eco2_consumer_healthy", "1 when /health passes (alive and making progress)", ["group"])

Clock = Callable[[], float]


@dataclass(frozen=True)
class Policy:
    stall_s: float
    unassigned_s: float
    loop_block_s: float

    @classmethod
    def of(cls, s: Any) -> Policy:
        return cls(s.health_stall_s, s.health_unassigned_s, s.health_loop_block_s)


@dataclass
class Verdict:
    alive: bool
    ready: bool
    reasons: list[str]
    detail: dict[str, Any] = field(default_factory=dict)


class Progress:
    """What a consumer last did; written by its event loop, read by the health thread."""

    def __init__(self, group: str, policy: Policy, clock: Clock = time.monotonic) -> None:
        self.group = group
        self.policy = policy
        self.clock = clock
        now = clock()
        self.started = now
        self.last_beat = now
        self.last_progress = now  # last fetch or commit
        self.last_rebalance = now
        self.last_dependency_wait: float | None = None
        self.waiting_for = ""
        self.assigned: frozenset[Any] = frozenset()
        self.pending: dict[Any, int] = {}
        self.oldest: dict[Any, float] = {}  # age of the oldest in-flight message, where known
        self.internals: dict[str, Any] = {}  # the client library's own state, shown in /health

    def beat(self) -> None:
        self.last_beat = self.clock()

    def progressed(self) -> None:
        """Records were fetched or offsets committed."""
        self.last_progress = self.clock()
        self.waiting_for = ""

    def rebalanced(self, assigned: Any) -> None:
        self.assigned = frozenset(assigned)
        self.last_rebalance = self.clock()
        self.last_progress = self.last_rebalance  # a new assignment starts its stall clock anew

    def waiting(self, dependency: str) -> None:
        """A dependency failed and is being retried: not stuck, but not ready either."""
        self.last_dependency_wait = self.clock()
        self.waiting_for = dependency

    def sampled(self, pending: Mapping[Any, int], oldest: Mapping[Any, float] | None = None) -> None:
        for gone in set(self.pending) - set(pending):  # revoked: its series must not linger
            for gauge in (LAG, OLDEST_IN_FLIGHT):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.group, *_tp_labels(gone))
        self.pending = dict(pending)
        self.oldest = dict(oldest or {})
        for tp, n in pending.items():
            LAG.labels(self.group, *_tp_labels(tp)).set(n)
        for tp, age in self.oldest.items():
            OLDEST_IN_FLIGHT.labels(self.group, *_tp_labels(tp)).set(age)

    def verdict(self) -> Verdict:
        p, now = self.policy, self.clock()
        reasons: list[str] = []
        alive = ready = True
        blocked = now - self.last_beat
        if blocked > p.loop_block_s:
            alive = False
            reasons.append(f"event loop blocked for {blocked:.1f}s (limit {p.loop_block_s}s)")
        unassigned = now - self.last_rebalance
        if not self.assigned and p.unassigned_s and unassigned > p.unassigned_s:
            alive = False
            reasons.append(f"no partitions assigned for {unassigned:.1f}s (limit {p.unassigned_s}s)")
        pending = sum(self.pending.values())
        idle = now - self.last_progress
        if self.assigned and pending and idle > p.stall_s:
            waited = self.last_dependency_wait is not None and now - self.last_dependency_wait <= p.stall_s
            if waited:
                reasons.append(f"{pending} pending, waiting for {self.waiting_for} for {idle:.1f}s")
            else:
                alive = False
                reasons.append(f"{pending} pending, no fetch or commit for {idle:.1f}s (limit {p.stall_s}s)")
        if self.waiting_for:
            ready = False
            if not any("waiting for" in r for r in reasons):
                reasons.append(f"waiting for {self.waiting_for}")
        detail = {
            "group": self.group,
            "assigned": len(self.assigned),
            "pending": pending,
            "since_progress_s": round(idle, 1),
            "since_beat_s": round(blocked, 1),
            **({"consumer": self.internals} if self.internals else {}),
            "partitions": {  # the ones with work pending: which partition is stuck
                "{}[{}]".format(*_tp_labels(tp)): {
                    "pending": n,
                    "oldest_in_flight_s": round(self.oldest.get(tp, 0), 1),
                }
                for tp, n in sorted(self.pending.items(), key=lambda kv: _tp_labels(kv[0]))
                if n
            },
        }
        return Verdict(alive, alive and ready, reasons, detail)


def _tp_labels(tp: Any) -> tuple[str, str]:
    return str(tp.topic), str(tp.partition)


# --- the endpoint ---------------------------------------------------------------------------


def serve(port: int, progress: Progress | None, host: str = "127.0.0.1") -> ThreadingHTTPServer | None:
    """/metrics, /health and /ready on `host`:`port` from a daemon thread (port 0 disables it).

    `host` is ECO2_METRICS_HOST: loopback locally, 0.0.0.0 in the pods."""
    if not port:
        return None

    class Handler(MetricsHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            # The verdict on every request, scrapes included: eco2_consumer_healthy must be
            # fresh for Prometheus even where nothing probes /health (locally, or between probes).
            v = progress.verdict() if progress is not None else None
            if progress is not None and v is not None:
                HEALTHY.labels(progress.group).set(1 if v.alive else 0)
            if path not in ("/health", "/ready"):
                return super().do_GET()
            if v is None:
                return self._answer(200, {"status": "ok"})
            ok = v.alive if path == "/health" else v.ready
            body = {"status": "ok" if ok else "failing", "reasons": v.reasons, **v.detail}
            return self._answer(200 if ok else 503, body)

        def _answer(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: quiet
            return None

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="eco2-health", daemon=True).start()
    return server


# --- the watcher ----------------------------------------------------------------------------

# pending per partition, and optionally the age of each partition's oldest in-flight message
Sample = Callable[[], Awaitable[tuple[Mapping[Any, int], Mapping[Any, float] | None]]]


async def watch(progress: Progress, sample: Sample, interval_s: float) -> None:
    """Beat and sample the pending work every `interval_s`, until cancelled.

    A sample that fails or hangs (broker unreachable) keeps the last one: the stall rule then
    judges by progress alone, and the beat still proves the loop runs."""
    failures = 0
    while True:
        progress.beat()
        try:
            progress.sampled(*await asyncio.wait_for(sample(), timeout=max(interval_s * 5, 5.0)))
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken sampler must be visible: its pending view goes stale
            failures += 1
            if failures == 1 or failures % 100 == 0:
                log.warning("health sample failed (%d in a row): %s: %s", failures, type(exc).__name__, exc)
        progress.beat()
        await asyncio.sleep(interval_s)


def unread(ends: Mapping[Any, int], positions: Mapping[Any, int | None]) -> dict[Any, int]:
    """Records below each partition's end offset that the consumer has not fetched yet."""
    return {tp: max(0, end - (positions.get(tp) or end)) for tp, end in ends.items()}
