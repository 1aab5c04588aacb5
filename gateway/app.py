"""The SSE gateway app: `GET /api/v1/scan/{job_id}/events` plus health, readiness and the demo page.

Connections to Redis are fixed per process whatever the number of clients: one pub/sub connection
(the Hub) and a small blocking pool for ownership checks and history reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl

import redis.asyncio as aioredis
from fastapi import FastAPI, Header, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyQuery
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

import view
from contract import stream_token
from contract.events import DONE, FAILED_EVENT, STAGES
from contract.openapi import install_openapi
from contract.settings import Settings, get_settings
from quota import refusal
from quota.limits import Decision, StreamLeases
from runtime.http_metrics import RequestMetrics
from runtime.metrics import add_metrics_route, track_event_loop
from view.stream_snapshot import SCRIPT as SNAPSHOT_SCRIPT

from . import openapi, opening
from .first_read import FirstRead
from .hub import Hub, Item, history_items
from .opening import Snapshot
from .script_call import ScriptCall
from .sse import LeanEventSourceResponse
from .stream import JobStream

log = logging.getLogger("eco2.gateway")

STATIC = Path(__file__).parent / "static"
CLIENT_NAME = f"eco2-gateway-{os.getpid()}"  # CLIENT LIST shows how few connections a gateway holds

# The token of the POST's stream_url, the way a browser's EventSource authenticates (no headers).
STREAM_TOKEN = APIKeyQuery(
    name=stream_token.QUERY_PARAM,
    scheme_name="StreamToken",
    description="the JWT in the scan API's stream_url, bound to one job and its owner",
    auto_error=False,
)

STREAMS = Gauge("eco2_gateway_streams", "open SSE streams")
VIEW_READY = Gauge("eco2_gateway_view_ready", "1 while the Redis view is whole (not lost or rebuilding)")
VIEW_WATCH_S = 0.5  # how often a gateway reads the view marker
REJECTED = Counter("eco2_gateway_rejected_total", "refused subscriptions", ["code"])
# Counted by runtime/http_metrics.py's middleware: route = the route's template, every status.
REQUESTS = Counter("eco2_gateway_requests_total", "gateway HTTP requests", ["route", "status"])
MAX_STREAMS = Gauge("eco2_gateway_max_streams", "ECO2_MAX_CONNECTIONS: streams beyond it get 503")


async def _on_loop(fn: Callable[[], None]) -> None:
    """Runs a stream's release on the event loop: Starlette runs a plain function given as a
    BackgroundTask in a worker thread, a thread hop per stream close (issue 13's profile)."""
    fn()


class Gateway:
    """Per-process state: settings, the Redis pool, the pub/sub hub and the stream count."""

    def __init__(self, s: Settings, redis: aioredis.Redis, hub: Hub) -> None:
        self.s = s
        self.redis = redis
        self.store = view.StateStore(redis, s.state_ttl_s)  # reads only: the router applies
        self._snapshot_call = ScriptCall(redis, SNAPSHOT_SCRIPT)  # gateway/script_call.py
        self.snapshots = view.SnapshotReader(redis, self._snapshot_call)
        self.hub = hub
        self.active = 0
        self.run_id: str | None = None  # the Redis server's, as last seen by the view watcher
        self.view_ok = False
        self.epoch: str | None = None
        self._view_changed = asyncio.Event()
        self.leases = StreamLeases(redis, s)  # per-user stream slots across all gateways
        self.first_read = FirstRead(redis, self.leases)

    def view_ready(self) -> bool:
        return self.view_ok

    async def aclose_calls(self) -> None:
        """Hang up the first reads' own connections (`gateway/script_call.py`)."""
        await self.first_read.aclose()
        await self._snapshot_call.aclose()

    async def watch_view(self) -> None:
        """Follow the view marker; when a rebuild ends every open stream re-reads its history."""
        while True:
            try:
                self.run_id = await view.run_id(self.redis)
                st, epoch = await view.read(self.redis, self.run_id)
                ok = st == "ready"
            except RedisError:
                ok, epoch = False, self.epoch
            if ok and self.view_ok and epoch != self.epoch:
                # Lost and rebuilt between two looks: the rebuild does not publish what it
                # replays, so open streams re-read their history all the same.
                log.warning("Redis view was rebuilt (epoch %s)", epoch)
                self.hub.resync_all("view")
            self.epoch = epoch
            if ok != self.view_ok:
                log.warning("Redis view %s", "ready" if ok else "lost or rebuilding: holding new streams")
                self.view_ok = ok
                VIEW_READY.set(int(ok))
                if ok:
                    self.hub.resync_all("view")
                self._view_changed.set()
                self._view_changed = asyncio.Event()
            await asyncio.sleep(VIEW_WATCH_S)

    async def view_changed(self, timeout_s: float) -> None:
        """Wait until the watcher sees the view change, at most `timeout_s` (and never longer than
        one watcher period); the caller then looks at Redis itself (`snapshot`)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(min(timeout_s, VIEW_WATCH_S), 0.0)):
                await self._view_changed.wait()

    async def read_history(self, job_id: str, after: int) -> list[Item]:
        return history_items(await self.store.history_json(job_id, after))

    async def snapshot(self, job_id: str, after: int) -> Snapshot:
        """The view's status (as this gateway last saw the server), the job's owner and its
        history after `after`, in one round trip (`view.SnapshotReader`: `StateStore.snapshot`
        as one Lua call)."""
        return self._snapshot(await self.snapshots.read(job_id, after, self.run_id))

    async def open_read(
        self, uid: str, job_id: str, after: int
    ) -> tuple[Decision, str | None, Snapshot | None]:
        """The user's stream lease and the job's first snapshot in one round trip
        (`gateway/first_read.py`); no snapshot when the leases are off or the call failed (the
        lease is then skipped, fail open, and `settle` reads the snapshot alone)."""
        if not self.leases.enabled:
            return Decision(), None, None
        decision, lease, snap = await self.first_read.read(uid, job_id, after, self.run_id)
        return decision, lease, None if snap is None else self._snapshot(snap)

    def _snapshot(self, snap: view.Snapshot) -> Snapshot:
        # Ready: once this gateway's watcher saw it too (it resyncs open streams then). Rebuilding
        # newest first: this job's history is whole once its queued event is back (view/marker.py).
        ready = snap.whole and (self.view_ok or snap.status == "rebuilding")
        return Snapshot(ready, snap.owner, history_items(snap.history))

    def slot(self, release_sub: Callable[[], None]) -> Callable[[], None]:
        """Count one stream; the returned release is idempotent (generator end or response end)."""
        self.active += 1
        STREAMS.inc()
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.active -= 1
                STREAMS.dec()
                release_sub()

        return release


def _error(code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    REJECTED.labels(str(code)).inc()
    return JSONResponse({"detail": detail}, status_code=code, headers=headers)


async def _guarded(events: AsyncIterator[bytes], release: Callable[[], None]) -> AsyncIterator[bytes]:
    """Release the stream's slot however it ends; a Redis failure just ends the stream (the
    client resumes with Last-Event-ID)."""
    try:
        async for ev in events:
            yield ev
    except RedisError as exc:
        log.warning("stream ended by a Redis error: %s", exc)
    finally:
        release()


async def open_stream(
    gw: Gateway,
    job_id: str,
    x_user_id: str | None,
    last_event_id: str | None,
    token: str | None,
    query_user: str | None,
) -> Response:
    """`GET /api/v1/scan/{job_id}/events`: the caller, the stream limit, the user's stream lease,
    the job's snapshot, then the stream (or the refusal). Shared by the documented FastAPI route
    and the events fast path (`EventsFastPath`)."""
    s = gw.s
    uid = opening.caller(s, job_id, x_user_id, token, query_user)
    if isinstance(uid, opening.Refusal):
        return _error(uid.status, uid.detail)
    if gw.active >= s.max_connections:
        return _error(503, "too many streams on this gateway; retry shortly", {"Retry-After": "1"})
    last = opening.last_seq(last_event_id)
    sub = gw.hub.subscribe(job_id)  # before any read: nothing published from now on is missed
    try:
        decision, lease, first = await gw.open_read(uid, job_id, last)
    except BaseException:
        gw.hub.unsubscribe(sub)
        raise
    if not decision.allowed:
        gw.hub.unsubscribe(sub)
        assert decision.refused is not None
        REJECTED.labels("429").inc()
        return JSONResponse(
            {
                "detail": refusal.message(decision.refused, s),
                "limit": decision.refused,
                "retry_after_s": max(decision.retry_after_s, 1),
            },
            status_code=429,
            headers=refusal.headers(decision, s, refusal.stream_policy(s)),
        )

    def unsubscribe() -> None:
        gw.hub.unsubscribe(sub)
        gw.leases.release(lease)

    release = gw.slot(unsubscribe)
    streaming = False
    try:
        try:
            snap = await opening.settle(
                gw, sub, job_id, last, s.view_wait_s, s.unknown_job_wait_s, first=first
            )
        except RedisError as exc:
            log.warning("state lookup of %s failed: %s", job_id, exc)
            return _error(503, "job state unavailable; retry shortly", {"Retry-After": "1"})
        if snap is None:  # the view stayed lost or rebuilding: never a partial history as whole
            return _error(
                503,
                "event history is being rebuilt (or Redis is down); retry shortly",
                {"Retry-After": "2"},
            )
        answer = opening.verdict(snap, uid, last)
        if answer == "unknown":
            return _error(404, "job not found")  # the same answer for someone else's job
        if answer == "finished":
            return Response(status_code=204)  # finished and fully delivered: EventSource stops
        stream = JobStream(
            job_id,
            last,
            sub,
            gw.read_history,
            history=snap.history,
            keepalive_s=s.keepalive_s,
            max_stream_s=s.max_stream_s,
            gap_wait_s=s.gap_wait_s,
            view_ready=gw.view_ready,
        )
        streaming = True
        return LeanEventSourceResponse(
            _guarded(stream.batches(), release),
            ping=0,  # the stream sends its own keepalive after keepalive_s of silence
            send_timeout=max(s.keepalive_s * 2, 5.0),
            background=BackgroundTask(_on_loop, release),
            on_writer=stream.bind_writer,  # idle streams get live events straight from the hub
            first_ready=stream.ready_at_open(),  # the listener only once it may wait
        )
    finally:
        if not streaming:
            release()


EVENTS_PATH = "/api/v1/scan/{job_id}/events"


async def _events_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """The events route as a plain ASGI handler: what FastAPI's route does (`open_stream` with the
    path's job id, the X-User-ID and Last-Event-ID headers, the `token` and `user` query
    parameters, read as Starlette reads them: the first header, the last query value), counted as
    `RequestMetrics` counts it, without FastAPI's parameter solving and the middleware chain
    around every event sent (issue 23's profile)."""
    job_id = scope["path"].split("/")[4]
    user = last = None
    for name, value in scope["headers"]:
        if name == b"x-user-id":
            user = value.decode("latin-1") if user is None else user
        elif name == b"last-event-id":
            last = value.decode("latin-1") if last is None else last
    query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
    try:
        response = await open_stream(
            scope["app"].state.gw, job_id, user, last, query.get(stream_token.QUERY_PARAM), query.get("user")
        )
    except Exception:
        _counted(500).inc()
        raise
    _counted(response.status_code).inc()
    await response(scope, receive, send)


@functools.cache
def _counted(status: int) -> Any:
    """The events route's request counter of one status (a `labels` lookup per stream was 1.5% of
    its CPU, issue 23)."""
    return REQUESTS.labels(EVENTS_PATH, str(status))


class GatewayApp(FastAPI):
    """FastAPI with a fast path for `GET /api/v1/scan/{job_id}/events`: the route stays FastAPI's
    (documented in the OpenAPI document, and serving HEAD), but a GET goes straight to
    `_events_asgi` behind the same CORS policy."""

    events_app: Any = None  # set by create_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.events_app is not None
            and scope["type"] == "http"
            and scope["method"] == "GET"
            and _EVENTS.fullmatch(scope["path"])
        ):
            scope["app"] = self
            if any(name == b"origin" for name, _ in scope["headers"]):
                await self.events_app(scope, receive, send)  # cross-origin: the CORS policy
            else:  # Starlette's CORS middleware would wrap every send even without an Origin
                await _events_asgi(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


_EVENTS = re.compile(r"/api/v1/scan/[^/]+/events")


def create_app(
    s: Settings | None = None, background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
) -> FastAPI:
    """`background`: coroutines the process runs beside the app while it serves (`python -m
    gateway` passes its young-generation collector)."""
    s = s or get_settings()
    MAX_STREAMS.set(s.max_connections)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        track_event_loop()
        redis = view.pooled_client(s.redis_url, s.gateway_redis_pool, CLIENT_NAME)
        hub = Hub(s.redis_url, s.client_queue_size, client_name=CLIENT_NAME)
        await hub.start()
        app.state.gw = gw = Gateway(s, redis, hub)
        watcher = asyncio.create_task(gw.watch_view(), name="view-watch")
        renewer = asyncio.create_task(gw.leases.renew_forever(), name="lease-renew")
        extra = [asyncio.create_task(fn(), name=getattr(fn, "__name__", "background")) for fn in background]
        try:
            yield
        finally:
            for task in (watcher, renewer, *extra):
                task.cancel()
            await asyncio.gather(watcher, renewer, *extra, return_exceptions=True)
            await gw.leases.flush()  # the ended streams' leases still waiting for their batch
            await hub.stop()
            await gw.aclose_calls()
            await redis.aclose()  # the client owns its pool: this hangs up every connection

    app = GatewayApp(
        title="eco2 SSE gateway",
        version="1",
        lifespan=lifespan,
        description="Live progress of scan jobs as Server-Sent Events (see streamScanEvents).",
    )
    install_openapi(app, lambda doc: openapi.complete(doc, s))
    cors: dict[str, Any] = {
        "allow_origins": s.cors_origins,
        "allow_methods": ["GET"],
        "allow_headers": ["X-User-ID", "Last-Event-ID", "Cache-Control"],
        "expose_headers": ["Retry-After", "RateLimit", "RateLimit-Policy"],
    }
    app.add_middleware(CORSMiddleware, **cors)
    app.events_app = CORSMiddleware(_events_asgi, **cors)
    add_metrics_route(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses=openapi.READY_RESPONSES)
    async def ready(request: Request) -> JSONResponse:
        gw: Gateway = request.app.state.gw
        try:
            redis_ok = bool(await gw.redis.ping())  # type: ignore[misc]
        except Exception:
            redis_ok = False
        ok = redis_ok and gw.hub.connected
        body = {"redis": redis_ok, "pubsub": gw.hub.connected, "streams": gw.active}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/config.json", include_in_schema=False)
    async def config() -> dict[str, Any]:
        """What the demo page needs: where to POST scans (the API allows this origin via CORS), and
        the pipeline as contract/pipeline.py has it (the page draws one step per stage)."""
        return {
            "api_url": s.public_base_url or s.api_url,
            "stages": list(STAGES),
            "done": DONE,
            "failed": FAILED_EVENT,
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        # The page's URL carries a stream token (?job=&token=): never send it on as a Referer.
        return FileResponse(
            STATIC / "index.html", media_type="text/html", headers={"Referrer-Policy": "no-referrer"}
        )

    @app.get(
        EVENTS_PATH,
        response_model=None,
        responses=openapi.events_responses(s),
        operation_id=openapi.EVENTS_OPERATION,
        summary="Follow a scan's progress (SSE)",
    )
    async def events(
        job_id: str,
        request: Request,
        x_user_id: Annotated[
            str | None, Header(alias="X-User-ID", description="the caller, set by the auth proxy")
        ] = None,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        token: Annotated[str | None, Security(STREAM_TOKEN)] = None,
    ) -> Response:
        return await open_stream(
            request.app.state.gw, job_id, x_user_id, last_event_id, token, request.query_params.get("user")
        )

    # Last, so outermost: it counts what every handler and middleware above answers.
    app.add_middleware(RequestMetrics, requests=REQUESTS)
    return app
