"""The scan API: accepts scan jobs, produces them to Kafka, serves their results."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from fastapi import FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel

from contract import keys, trace
from contract.events import ScanJob, ScanRequest, make_event, now
from contract.settings import Settings, get_settings
from streams import rules
from streams.state import StateStore, pooled_client

from .jobs import JobWriter
from .validation import InvalidInput, check_request

REQUESTS = Counter("eco2_api_requests_total", "scan API requests", ["route", "status"])
LATENCY = Histogram(
    "eco2_api_seconds", "scan API latency", ["route"], buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
)

UserHeader = Annotated[str | None, Header(alias="X-User-ID")]
IdemHeader = Annotated[str | None, Header(alias="X-Idempotency-Key")]


class ScanAccepted(BaseModel):
    job_id: str
    status: str
    stream_url: str
    result_url: str


def error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


# Results of finished jobs that left the Redis cache come from Postgres (persistence/).
ResultFallback = Callable[[str], Awaitable[dict[str, Any] | None]]


def create_app(s: Settings | None = None, result_fallback: ResultFallback | None = None) -> FastAPI:
    s = s or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = pooled_client(s.redis_url, 64, f"eco2-api-{os.getpid()}")
        app.state.store = StateStore(app.state.redis, s.state_ttl_s)
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
        description="Submit a waste photo for classification; follow it over SSE; read its result.",
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=s.cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["X-User-ID", "X-Idempotency-Key", "Content-Type", "Last-Event-ID"],
    )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > s.max_body_bytes:
            return error(413, "body_too_large", f"request body is larger than {s.max_body_bytes} bytes")
        if request.method == "POST" and length is None:
            body = await request.body()  # chunked: read (bounded by the server) and measure
            if len(body) > s.max_body_bytes:
                return error(413, "body_too_large", f"request body is larger than {s.max_body_bytes} bytes")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(str(p) for p in e["loc"][1:]), "problem": e["msg"]} for e in exc.errors()
        ]
        return error(400, "invalid_request", "the request body is not a valid scan request", details=details)

    @app.post(
        "/api/v1/scan", status_code=202, response_model=ScanAccepted, responses={400: {}, 401: {}, 413: {}}
    )
    async def submit(
        body: ScanRequest, request: Request, user: UserHeader = None, idem: IdemHeader = None
    ) -> JSONResponse:
        t0 = time.perf_counter()
        if not user:
            return error(401, "unauthenticated", "the X-User-ID header is required")
        try:
            req = check_request(body, s)
        except InvalidInput as exc:
            REQUESTS.labels("submit", "400").inc()
            return error(400, exc.code, exc.message, field=exc.field)
        redis: aioredis.Redis = request.app.state.redis
        job_id = uuid.uuid4().hex
        idem_key = keys.idempotency(user, idem) if idem else None
        if idem_key:
            if len(idem) > 200:  # type: ignore[arg-type]
                return error(
                    400, "idempotency_key_too_long", "X-Idempotency-Key is longer than 200 characters"
                )
            # SET NX is the atomic claim: of two concurrent POSTs only one creates a job.
            existing = await redis.set(idem_key, job_id, nx=True, get=True, ex=s.idempotency_ttl_s)
            if existing is not None:
                REQUESTS.labels("submit", "202").inc()
                return JSONResponse(_accepted(s, _text(existing)), status_code=202)
        job = ScanJob(
            job_id=job_id,
            user_id=user,
            image_url=req.image_url,
            user_input=req.user_input,
            model=req.model or s.vision_model,
            created_at=now(),
        )
        queued = make_event(job, "queued", "completed")
        tp = trace.child_of(request.headers.get("traceparent"))
        try:
            await request.app.state.writer.submit(job, queued, tp)
        except Exception as exc:
            if idem_key:
                await redis.delete(idem_key)  # let the client retry with the same key
            REQUESTS.labels("submit", "503").inc()
            return error(503, "unavailable", f"could not queue the scan: {type(exc).__name__}")
        # The router derives the same state from scan.events; writing it here too means a
        # result poll right after this response already finds the job and its owner.
        await request.app.state.store.apply([queued])
        REQUESTS.labels("submit", "202").inc()
        LATENCY.labels("submit").observe(time.perf_counter() - t0)
        return JSONResponse(_accepted(s, job_id), status_code=202, headers={"traceparent": tp})

    @app.get("/api/v1/scan/categories")
    async def categories() -> dict[str, Any]:
        return {
            "categories": [
                {"major": major, "middle": list(rules.MIDDLE_CATEGORIES.get(major, ()))}
                for major in rules.MAJOR_CATEGORIES
            ]
        }

    @app.get("/api/v1/scan/{job_id}/result", responses={200: {}, 202: {}, 401: {}, 404: {}})
    async def result(job_id: str, request: Request, user: UserHeader = None) -> JSONResponse:
        t0 = time.perf_counter()
        if not user:
            return error(401, "unauthenticated", "the X-User-ID header is required")
        state = await request.app.state.store.state(job_id)
        if state is None:
            stored = await request.app.state.fallback(job_id) if request.app.state.fallback else None
            if stored is None or stored.get("user_id") != user:
                return error(404, "not_found", "no such scan")
            REQUESTS.labels("result", "200").inc()
            return JSONResponse(stored)
        if state.get("user_id") != user:  # not yours: indistinguishable from unknown
            return error(404, "not_found", "no such scan")
        LATENCY.labels("result").observe(time.perf_counter() - t0)
        if "result" in state:
            REQUESTS.labels("result", "200").inc()
            return JSONResponse(state["result"])
        REQUESTS.labels("result", "202").inc()
        return JSONResponse(
            {
                "job_id": job_id,
                "status": "processing",
                "current_stage": state["stage"],
                "progress": state["progress"],
            },
            status_code=202,
            headers={"Retry-After": "2"},
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
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

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _accepted(s: Settings, job_id: str) -> dict[str, str]:
    base = s.public_base_url.rstrip("/")
    return ScanAccepted(
        job_id=job_id,
        status="queued",
        stream_url=f"{base}/api/v1/scan/{job_id}/events",
        result_url=f"{base}/api/v1/scan/{job_id}/result",
    ).model_dump()


def _text(value: bytes | str | bool) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
                pool = await asyncpg.create_pool(s.postgres_dsn, min_size=1, max_size=4)
            return await fetch_result(pool, job_id)
        except (OSError, asyncpg.PostgresError):
            return None

    return fetch
