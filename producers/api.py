"""The scan API: accepts scan jobs, produces them to Kafka, serves their results."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import urlencode

import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

import view
from catalog import rules
from contract import identity, keys, stream_token, trace
from contract.events import QUEUED, ScanEvent, ScanJob, ScanRequest, make_event, now
from contract.openapi import install_openapi
from contract.settings import Settings, get_settings
from quota import refusal
from quota.limits import Decision, ScanQuota
from runtime.http_metrics import ARRIVED, RequestMetrics
from runtime.metrics import add_metrics_route, track_event_loop
from view import StateStore, pooled_client

from . import idempotency, openapi
from .body_limit import BodyLimit
from .jobs import JobWriter
from .validation import InvalidInput, check_request

# Counted by runtime/http_metrics.py's middleware: route = the route's template, every status.
REQUESTS = Counter("eco2_api_requests_total", "scan API requests", ["route", "status"])
LATENCY = Histogram(
    "eco2_api_seconds",
    "scan API latency (to the response's start)",
    ["route"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
)

# Where a POST's server time goes (issue 19): each phase of `submit`, timed in the handler
# (`entry` is from the request's arrival at the outermost middleware to the handler's first line:
# the event loop's queue, body parsing and FastAPI's validation). jobs.py adds the transaction's.
PHASE = Histogram(
    "eco2_api_post_phase_seconds",
    "time of each phase of a scan POST on the server",
    ["phase"],
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25),
)

PHASE_ENTRY, PHASE_CHECKS, PHASE_IDEM, PHASE_QUOTA, PHASE_BUILD, PHASE_TXN, PHASE_CACHE, PHASE_RESPOND = (
    PHASE.labels(p) for p in ("entry", "checks", "idempotency", "quota", "build", "txn", "cache", "respond")
)


def _lap(phase: Any, t: float) -> float:
    """Observe the time since `t` as `phase`; the time now, the next phase's start."""
    now = time.perf_counter()
    phase.observe(now - t)
    return now


log = logging.getLogger("eco2.api")

# Both headers are documented (required, limits, lifetime) by openapi.complete.
UserHeader = Annotated[str | None, Header(alias="X-User-ID")]  # set by the auth proxy
IdemHeader = Annotated[str | None, Header(alias="X-Idempotency-Key")]

HTTP_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status, headers=headers)


RETRY_AFTER_S = 2


def unavailable(message: str, code: str = "unavailable") -> JSONResponse:
    """503 with Retry-After: a dependency is down or the view is being rebuilt; retrying is safe."""
    return error(503, code, message, headers={"Retry-After": str(RETRY_AFTER_S)})


class ResultStoreDown(Exception):
    """The Postgres result store did not answer (the request gets a 503, not a 404)."""


# Results of finished jobs that left the Redis cache come from Postgres (persistence/).
ResultFallback = Callable[[str], Awaitable[dict[str, Any] | None]]


def create_app(s: Settings | None = None, result_fallback: ResultFallback | None = None) -> FastAPI:
    s = s or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        track_event_loop()
        app.state.redis = pooled_client(s.redis_url, 64, f"eco2-api-{os.getpid()}")
        app.state.store = StateStore(app.state.redis, s.state_ttl_s)
        app.state.quota = ScanQuota(app.state.redis, s)
        app.state.view = view.Reader(app.state.redis)
        app.state.writer = JobWriter(s)
        await app.state.writer.start()
        app.state.fallback = result_fallback or await _postgres_fallback(s)
        try:
            yield
        finally:
            await app.state.writer.stop()
            await app.state.redis.aclose()

    app = FastAPI(
        title="eco2 scan API",
        version="1",
        lifespan=lifespan,
        description="Submit a waste photo for classification; follow it over SSE (the gateway's "
        "`GET /api/v1/scan/{job_id}/events`, see `stream_url`); read its result. Every error is a "
        "JSON `ApiError`.",
    )
    install_openapi(app, lambda doc: openapi.complete(doc, s))
    app.add_middleware(
        CORSMiddleware,
        allow_origins=s.cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["X-User-ID", "X-Idempotency-Key", "Content-Type", "Last-Event-ID"],
        expose_headers=["Location", "Retry-After", "RateLimit", "RateLimit-Policy"],
    )

    app.add_middleware(
        BodyLimit,
        max_bytes=s.max_body_bytes,
        too_large=lambda: error(
            413, "body_too_large", f"request body is larger than {s.max_body_bytes} bytes"
        ),
    )

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> JSONResponse:
        # redis-py already retried a dropped connection; Redis is really unavailable.
        return unavailable(f"state store unavailable: {type(exc).__name__}")

    @app.exception_handler(ResultStoreDown)
    async def postgres_down(request: Request, exc: ResultStoreDown) -> JSONResponse:
        return unavailable(f"result store unavailable: {exc}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e["loc"][1:]), "problem": e["msg"]} for e in exc.errors()
        ]
        return error(400, "invalid_request", "the request is not a valid scan request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Framework errors (unparsable body, unknown path, wrong method) as ApiError too."""
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.post(
        "/api/v1/scan",
        status_code=202,
        response_model=None,
        responses=openapi.submit_responses(s),
        operation_id="submitScan",
    )
    async def submit(
        body: ScanRequest, request: Request, user: UserHeader = None, idem: IdemHeader = None
    ) -> JSONResponse:
        t = time.perf_counter()
        if (arrived := request.scope.get(ARRIVED)) is not None:
            PHASE_ENTRY.observe(t - arrived)
        if not user:
            return error(401, "unauthenticated", "the X-User-ID header is required")
        if bad := _bad_user(user, s):
            return bad
        try:
            req = check_request(body, s)
        except InvalidInput as exc:
            return error(400, exc.code, exc.message, field=exc.field)
        redis: aioredis.Redis = request.app.state.redis
        job_id = uuid.uuid4().hex
        if idem is not None and (why := identity.problem(idem, s.max_idempotency_key_len)):
            return error(
                400, "invalid_idempotency_key", f"X-Idempotency-Key {why}", field="X-Idempotency-Key"
            )
        idem_key = keys.idempotency(user, idem) if idem else None
        t = _lap(PHASE_CHECKS, t)
        if idem_key:
            fp = idempotency.fingerprint(req)
            claim = await idempotency.claim(redis, idem_key, job_id, fp, s.idempotency_ttl_s)
            if claim.outcome == "conflict":
                return error(
                    409,
                    "idempotency_key_reused",
                    "X-Idempotency-Key was used with a different request body; use a new key for a new scan",
                    job_id=claim.job_id,
                )
            if claim.outcome == "replay":
                return _accepted(s, claim.job_id, user)  # no quota taken twice
            t = _lap(PHASE_IDEM, t)
        quota: ScanQuota = request.app.state.quota
        decision = await quota.take(user, job_id)
        t = _lap(PHASE_QUOTA, t)
        if not decision.allowed:
            if idem_key:
                await idempotency.forget(redis, idem_key)  # the key names no job: a retry may use it
            return _too_many(s, decision)
        job = ScanJob(
            job_id=job_id,
            user_id=user,
            image_url=req.image_url,
            user_input=req.user_input,
            model=req.model or "",
            created_at=now(),
        )
        queued = make_event(job, QUEUED, "completed")
        tp = trace.child_of(request.headers.get("traceparent"))
        t = _lap(PHASE_BUILD, t)
        # The router derives the same state from scan.events; the API caches it too, so a result
        # poll or a stream opened right after the 202 already finds the job and its owner. It is
        # written while the transaction commits (a Redis round trip off the POST's path): no one
        # can ask for the job before the 202 names it, and a failed transaction takes it back.
        store: StateStore = request.app.state.store
        cached = asyncio.ensure_future(_cache_queued(store, queued))
        try:
            await request.app.state.writer.submit(job, queued, tp)
        except Exception as exc:  # Kafka down or too slow (api_submit_timeout_s): not accepted
            await _uncache_queued(store, cached, job_id)
            if idem_key:
                await idempotency.forget(redis, idem_key)  # let the client retry with the same key
            await quota.release(user, job_id)
            return unavailable(f"could not queue the scan: {type(exc).__name__}")
        t = _lap(PHASE_TXN, t)
        await cached  # the job is in Kafka now: a Redis failure here does not undo the 202
        t = _lap(PHASE_CACHE, t)
        limits = refusal.headers(decision, s, refusal.scan_policy(s))
        response = _accepted(s, job_id, user, {"traceparent": tp, **limits})
        _lap(PHASE_RESPOND, t)
        return response

    @app.get("/api/v1/scan/categories")
    async def categories() -> dict[str, Any]:
        return {
            "categories": [
                {"major": major, "middle": list(rules.MIDDLE_CATEGORIES.get(major, ()))}
                for major in rules.MAJOR_CATEGORIES
            ]
        }

    @app.get(
        "/api/v1/scan/{job_id}/result",
        response_model=None,
        responses=openapi.result_responses(),
        operation_id=openapi.RESULT_OPERATION,
    )
    async def result(job_id: str, request: Request, user: UserHeader = None) -> JSONResponse:
        if not user:
            return error(401, "unauthenticated", "the X-User-ID header is required")
        if bad := _bad_user(user, s):
            return bad
        store: StateStore = request.app.state.store
        state = await store.state(job_id)
        if state is not None and "result" in state:  # a result is final whatever the view's state
            if state.get("user_id") != user:
                return error(404, "not_found", "no such scan")
            return JSONResponse(state["result"])
        # A known job: whole once the view vouches for its history (ready, or a newest-first
        # rebuild brought it back from its queued event); an unknown one only when ready.
        reader: view.Reader = request.app.state.view
        whole = await (reader.job_whole(job_id) if state is not None else reader.ready())
        if state is None or not whole:
            # Expired from the cache, or the view is being rebuilt (its state may be missing or
            # behind): a finished job's result is in Postgres.
            stored = await request.app.state.fallback(job_id) if request.app.state.fallback else None
            if stored is not None:
                if stored.get("user_id") != user:
                    return error(404, "not_found", "no such scan")
                return JSONResponse(stored)
            if not whole:
                return unavailable("scan state is being rebuilt; retry shortly", "rebuilding")
            return error(404, "not_found", "no such scan")
        if state.get("user_id") != user:  # not yours: indistinguishable from unknown
            return error(404, "not_found", "no such scan")
        return JSONResponse(
            {
                "job_id": job_id,
                "status": "processing",
                "current_stage": state["stage"],
                "progress": state["progress"],
            },
            status_code=202,
            headers={"Retry-After": "2", "Location": _result_url(s, job_id)},
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses=openapi.READY_RESPONSES)
    async def ready(request: Request) -> JSONResponse:
        checks = {"redis": False, "kafka": False}
        try:
            checks["redis"] = bool(await request.app.state.redis.ping())
        except Exception:
            pass
        admin = AIOKafkaAdminClient(
            bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=2000, **s.kafka_client_kwargs()
        )
        try:
            await admin.start()
            await admin.describe_cluster()
            checks["kafka"] = True
        except Exception:
            pass
        finally:
            await admin.close()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    add_metrics_route(app)
    # Last, so outermost: it counts what every handler and middleware above answers.
    app.add_middleware(RequestMetrics, requests=REQUESTS, latency=LATENCY)
    return app


async def _cache_queued(store: StateStore, queued: ScanEvent) -> None:
    """Apply the job's queued event to Redis; a Redis failure is logged, never raised."""
    try:
        await store.apply([queued])
    except RedisError as exc:
        log.warning("job %s: its queued state not cached (%s)", queued.job_id, exc)


async def _uncache_queued(store: StateStore, cached: asyncio.Future[None], job_id: str) -> None:
    """The transaction failed: once the cache write is done, remove what it wrote (best effort;
    `forget_queued` keeps a job whose later events the router has applied)."""
    await cached
    try:
        await store.forget_queued(job_id)
    except RedisError as exc:
        log.warning("job %s not accepted; its queued state stays cached until it expires (%s)", job_id, exc)


def _bad_user(user: str, s: Settings) -> JSONResponse | None:
    """400 for an X-User-ID outside contract/identity.py's bounds (before Kafka or Redis sees it)."""
    why = identity.problem(user, s.max_user_id_len)
    return error(400, "invalid_user_id", f"X-User-ID {why}", field="X-User-ID") if why else None


def _too_many(s: Settings, d: Decision) -> JSONResponse:
    """429: which per-user limit refused, and when to come back (Retry-After, RateLimit fields)."""
    assert d.refused is not None
    return error(
        429,
        "rate_limited",
        refusal.message(d.refused, s),
        headers=refusal.headers(d, s, refusal.scan_policy(s)),
        limit=d.refused,
        retry_after_s=max(d.retry_after_s, 1),
    )


def _result_url(s: Settings, job_id: str) -> str:
    return f"{s.public_base_url.rstrip('/')}/api/v1/scan/{job_id}/result"


def _accepted(s: Settings, job_id: str, user: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The 202 of a POST: where to follow the job (with a stream token) and where its result is."""
    token = stream_token.issue(s, job_id, user)
    body = openapi.ScanAccepted(
        job_id=job_id,
        status="queued",
        stream_url=f"{s.public_base_url.rstrip('/')}/api/v1/scan/{job_id}/events?"
        + urlencode({stream_token.QUERY_PARAM: token}),
        result_url=_result_url(s, job_id),
    )
    return JSONResponse(
        body.model_dump(), status_code=202, headers={"Location": body.result_url, **(headers or {})}
    )


async def _postgres_fallback(s: Settings) -> ResultFallback | None:
    """The Postgres reader of persistence/, when that component is installed and reachable."""
    try:
        from persistence.store import fetch_result
    except ImportError:
        return None
    import asyncpg

    pool: asyncpg.Pool | None = None

    async def fetch(job_id: str) -> dict[str, Any] | None:
        nonlocal pool
        try:
            if pool is None:
                pool = await asyncpg.create_pool(
                    s.postgres_dsn, min_size=1, max_size=4, timeout=3, command_timeout=5
                )
            return await fetch_result(pool, job_id)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ResultStoreDown(type(exc).__name__) from exc

    return fetch
