"""Requests of an HTTP service counted by route template and status, every status included.

One ASGI middleware outside every handler and every other middleware: a 401, a 400 from
validation, a 404, a 413 from the body limit or a 429 from a quota is counted exactly like a
202, without the handler counting anything itself. The route label is the route's template
(`/api/v1/scan/{job_id}/result`), never the path (one series per job id would grow without
bound); a path no route knows is `unmatched`. Latency runs to the response's start (an SSE
stream's duration is not the request's latency).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"
ARRIVED = "eco2.arrived"  # scope key: perf_counter() when the request reached this middleware


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The template of the route that served (or would serve) this request."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    # Answered before routing (the body limit, CORS): find the route the way the router would.
    partial = None
    for candidate in routes:
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", UNMATCHED))
        if match == Match.PARTIAL and partial is None:  # the path exists, the method does not
            partial = str(getattr(candidate, "path", UNMATCHED))
    return partial or UNMATCHED


class RequestMetrics:
    """`app.add_middleware(RequestMetrics, requests=..., latency=...)` as the LAST middleware
    added (the outermost), so it sees what the others answer. `requests` has the labels
    (route, status), `latency` (route)."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram | None = None) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope[ARRIVED] = t0
        started = False

        def record(status: int) -> None:
            route = route_template(scope, _routes(scope))
            self.requests.labels(route, str(status)).inc()
            if self.latency is not None:
                self.latency.labels(route).observe(time.perf_counter() - t0)

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # Starlette's error middleware, outside this one, answers 500
                record(500)
            raise


def _routes(scope: Scope) -> Sequence[BaseRoute]:
    app: Any = scope.get("app")
    return getattr(getattr(app, "router", None), "routes", ())
