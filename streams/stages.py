"""The stage engine: runs each stage's agent (streams/agents.py) on its topic, in pipeline order.

Each agent runs `stage_concurrency` jobs at once (model calls take seconds). Processing is
at-least-once: Faust commits an offset only after the job's messages are flushed. A redelivered
job re-emits byte-identical events because each event and each stage's output is memoised in
Redis under the job id and attempt (set-if-absent), so downstream never sees two versions of one
seq. A failure is memoised too (a redelivery re-sends the same `failed`), but only for its
attempt: a re-drive (`eco2 dlq replay`) is the next attempt, with its own memo and seqs, and it
passes through the stages the job already completed (their timing is on the job) without
calling the model again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from redis.exceptions import RedisError

from contract import keys, trace, versioning
from contract.events import (
    DONE,
    PIPELINE,
    DeadLetter,
    ScanJob,
    ScanResult,
    Status,
    make_event,
    next_stage,
    now,
)
from contract.settings import Settings
from contract.topics import BY_NAME, DLQ, EVENTS, STAGE_TOPICS, partition_for
from view import pooled_client

from . import metrics, model, registry
from .app import topic, trace_logger
from .claims import Claims

log = trace_logger("eco2.stages")


class StageFailure(Exception):
    """A job cannot go on: it gets a terminal `failed` event and a dead letter."""

    def __init__(self, reason: str, error: str, attempts: int = 1) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.attempts = attempts


class Pipeline:
    """What every stage needs: topics, Redis (memo), the model client, settings."""

    def __init__(self, app: faust.App, s: Settings) -> None:
        self.s = s
        self.app = app
        # The agents' topics. Events and dead letters are sent straight to the producer (`_send`).
        self.topics = {name: topic(app, name) for name in STAGE_TOPICS.values()}
        self.redis = pooled_client(s.redis_url, 64, f"eco2-stages-{os.getpid()}")
        # Memo claims: one Lua call per step of a job, those asked meanwhile sent together.
        self.claims = Claims(self.redis, s.memo_ttl_s, _redis_retry)
        self.models = model.Clients(s)
        self.memo_ttl_s = s.memo_ttl_s
        self.trace_log = s.stage_trace_log
        self._meters: dict[str, tuple[Any, Any, Any]] = {}

    # --- output ------------------------------------------------------------------------------

    async def _send(self, name: str, job_id: str, value: str, traceparent: str) -> None:
        """Hand one record to Faust's producer. Not through `Topic.send`: its per-message layer
        (a FutureMessage, serializers for bytes we already have, sensors nobody reads) cost about
        as much as the produce call itself (issue 19). The record is in the same producer, so
        Faust's commit still flushes it before the offset that led to it (streams/commits.py)."""
        sent = await self.app.producer.send(
            name,
            job_id.encode(),
            value.encode(),
            partition_for(job_id, BY_NAME[name].partitions),
            None,
            {trace.HEADER: traceparent.encode()},
        )
        sent.add_done_callback(_warn_unsent)  # type: ignore[attr-defined]

    async def _claim(
        self, claims: list[tuple[str, str]], read: tuple[str, ...] = (), guard: int = 0
    ) -> tuple[list[str], list[bytes | None]]:
        """In one claim (streams/claims.py): SET NX GET every (key, value) of `claims` (the first
        value ever stored under each key wins: what a redelivery re-sends) and GET every key of
        `read`.

        `guard` (1-based): the claims after that one were built from its value; when another
        value is stored under its key already, the answers stop there (a shorter list) and
        nothing after it is claimed."""
        out = await self.claims.claim(claims, read, guard)
        won = [
            prev.decode() if prev is not None else value
            for (_, value), prev in zip(claims, out, strict=False)
        ]
        return won, out[len(claims) :]

    def _event(
        self,
        job: ScanJob,
        stage: str,
        status: Status,
        result: ScanResult | None = None,
        error: str | None = None,
    ) -> tuple[str, str]:
        """(memo key, JSON) of one event; building it is cheap, the memo decides which is sent."""
        name = f"event:{stage}:{status}" if status != "failed" else "event:failed"
        data = make_event(job, stage, status, result=result, error=error).model_dump_json()
        return keys.memo(job.job_id, name, job.attempt), data

    async def emit(
        self,
        job: ScanJob,
        stage: str,
        status: Status,
        traceparent: str,
        result: ScanResult | None = None,
        error: str | None = None,
    ) -> None:
        (data,), _ = await self._claim([self._event(job, stage, status, result, error)])
        await self._send(EVENTS, job.job_id, data, traceparent)

    # --- the work of each stage ------------------------------------------------------------

    async def _with_retries(self, stage: str, call: Callable[[], Awaitable[Any]]) -> Any:
        attempts = 0
        while True:
            attempts += 1
            try:
                async with asyncio.timeout(self.s.stage_timeout_s):
                    return await call()
            except model.PermanentModelError as exc:
                raise StageFailure("model_permanent_error", str(exc), attempts) from exc
            except (model.TransientModelError, TimeoutError) as exc:
                if attempts > self.s.stage_max_retries:
                    raise StageFailure(
                        "model_retries_exhausted", f"{type(exc).__name__}: {exc}", attempts
                    ) from exc
                metrics.RETRIES.labels(stage).inc()
                delay = self.s.retry_backoff_s * 2 ** (attempts - 1)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    # The agents' view of this worker (registry.Context).
    def model(self) -> Any:
        return self.models.take()

    async def retried(self, stage: str, call: Callable[[], Awaitable[Any]]) -> Any:
        return await self._with_retries(stage, call)

    async def run_stage(self, stage: str, job: ScanJob) -> ScanJob:
        """Do one stage's work (its registered agent) and return the job with its output added,
        stamped with this worker's schema version (contract/versioning.py)."""
        agent = registry.REGISTRY[stage]
        found = await agent.run(self, job)
        return self.stamp(job, found.model_dump())

    @staticmethod
    def stamp(job: ScanJob, found: dict[str, Any] | None = None) -> ScanJob:
        """The job with `found` added (an unknown field rides along as an extra) and this
        worker's schema version. A copy, not a dump and a re-validation of the whole job: both
        the job and the agent's output model are validated already (issue 19). Its own
        `timings`, as the engine adds this stage's to it."""
        update = {**(found or {}), "timings": dict(job.timings)}
        update[versioning.FIELD] = versioning.SCHEMA_VERSION
        return job.model_copy(update=update)

    # --- one message ----------------------------------------------------------------------

    async def handle(self, stage: str, raw: bytes, headers: Any) -> None:
        parent = trace.from_headers(headers)
        tp = trace.child_of(parent)
        try:
            job = ScanJob.model_validate_json(raw)
        except ValueError as exc:
            await self._dead_letter_raw(stage, raw, str(exc), tp)
            return
        if self.trace_log:  # ECO2_STAGE_TRACE_LOG: a line per stage and job (~3% of the CPU)
            log.info("stage=%s job=%s trace=%s", stage, job.job_id, trace.trace_id(tp))
        in_flight, latency, jobs = self._meters.get(stage) or self._meter(stage)
        in_flight.inc()
        t0 = time.monotonic()
        try:
            async def compute() -> tuple[str, ScanJob | None]:
                # A failure is memoised like a success within its attempt (a redelivery re-sends
                # the same events); only a re-drive, the next attempt, may turn it around.
                if carried(job, stage):
                    out = self.stamp(job)
                    return out.model_dump_json(), out
                t_start = time.monotonic()
                try:
                    out = await self.run_stage(stage, job)
                except StageFailure as exc:
                    return json.dumps({"failure": [exc.reason, exc.error, exc.attempts]}), None
                except Exception as exc:  # a bug or bad data must still end the job visibly
                    log.exception("stage=%s job=%s crashed", stage, job.job_id)
                    error = f"{type(exc).__name__}: {exc}"
                    return json.dumps({"failure": ["internal_error", error, 1]}), None
                out.timings[stage] = round(time.monotonic() - t_start, 3)
                return out.model_dump_json(), out

            out_key = keys.memo(job.job_id, f"out:{stage}", job.attempt)
            started_claim = self._event(job, stage, "started")
            events: list[str] | None = None
            made: ScanJob | None = None  # the output this delivery computed, while it is the stored one
            if registry.REGISTRY[stage].model_free:
                # Cheap and free of side effects: computed first, so that one round trip claims
                # `started`, the output and its events (unless another delivery's output is stored).
                raw_out, made = await compute()
                claims = [started_claim, (out_key, raw_out), *self._completion(made, stage)]
                won, _ = await self._claim(claims, guard=2)
                await self._send(EVENTS, job.job_id, won[0], tp)
                events, made = self._settle(won, claims, 1, made)
                raw_out = won[1]
            else:
                # One round trip claims the `started` event and reads the stage's memoised output
                # (a redelivered job re-sends what was stored, and skips the work when it is done).
                (started,), (stored,) = await self._claim([started_claim], (out_key,))
                await self._send(EVENTS, job.job_id, started, tp)
                if stored is not None:
                    raw_out = stored.decode()
                else:
                    # One round trip claims the output and the events built from it (completed,
                    # and done after the last stage), unless another delivery's output is stored.
                    raw_out, made = await compute()
                    claims = [(out_key, raw_out), *self._completion(made, stage)]
                    won, _ = await self._claim(claims, guard=1)
                    events, made = self._settle(won, claims, 0, made)
                    raw_out = won[0]
            if made is not None:
                out = made
            else:
                done = json.loads(raw_out)
                if "failure" in done:
                    await self.fail(job, stage, StageFailure(*done["failure"]), tp)
                    return
                out = ScanJob.model_validate(done)
            if events is None:  # a redelivery, or a lost race: the events of the stored output
                events, _ = await self._claim(self._completion(out, stage))
            nxt = next_stage(stage)
            for data in events:
                await self._send(EVENTS, out.job_id, data, tp)
            if nxt == DONE:
                if out.attempt == 0:  # a re-drive's age is the outage's, not the pipeline's
                    metrics.E2E.observe(max(0.0, time.time() - out.created_at))
            else:
                await self._send(STAGE_TOPICS[nxt], out.job_id, raw_out, tp)  # the memo's bytes
            jobs.inc()
        finally:
            in_flight.dec()
            latency.observe(time.monotonic() - t0)

    def _meter(self, stage: str) -> tuple[Any, Any, Any]:
        """The stage's labelled metrics, looked up once (`labels()` takes a lock and builds a key)."""
        meters = (
            metrics.IN_FLIGHT.labels(stage),
            metrics.STAGE_LATENCY.labels(stage),
            metrics.JOBS.labels(stage),
        )
        self._meters[stage] = meters
        return meters

    @staticmethod
    def _settle(
        won: list[str], claims: list[tuple[str, str]], at: int, made: ScanJob | None
    ) -> tuple[list[str] | None, ScanJob | None]:
        """After a guarded claim of the output (at `at`) and its events: (the events, the output)
        when ours was stored and its events claimed; (None, None) when another delivery's output
        (or our failure) was: the caller then reads the stored output and claims its events."""
        if made is not None and len(won) == len(claims) and won[at] == claims[at][1]:
            return won[at + 1 :], made
        return None, None

    def _completion(self, out: ScanJob | None, stage: str) -> list[tuple[str, str]]:
        """(memo key, JSON) of the stage's `completed` event, and of `done` after the last stage;
        none for a failure (no output)."""
        if out is None:
            return []
        nxt = next_stage(stage)
        claims = [self._event(out, stage, "completed")]
        if nxt == DONE:
            claims.append(self._event(out, DONE, "completed", result=result_of(out, "completed")))
        return claims

    async def fail(self, job: ScanJob, stage: str, exc: StageFailure, tp: str) -> None:
        log.warning("stage=%s job=%s failed reason=%s error=%s", stage, job.job_id, exc.reason, exc.error)
        metrics.FAILURES.labels(stage, exc.reason).inc()
        result = result_of(job, "failed", error=exc.error, failed_stage=stage)
        await self.emit(job, stage, "failed", tp, result=result, error=exc.error)
        letter = DeadLetter(
            source="pipeline",
            topic=STAGE_TOPICS[stage],
            key=job.job_id,
            value=job.model_dump(),
            stage=stage,
            reason=exc.reason,
            error=exc.error,
            attempts=exc.attempts,
        )
        await self._send(DLQ, job.job_id, letter.model_dump_json(), tp)

    async def _dead_letter_raw(self, stage: str, raw: bytes, error: str, tp: str) -> None:
        try:
            value = json.loads(raw)
        except ValueError:
            value = {"raw": raw.decode(errors="replace")}
        if not isinstance(value, dict):
            value = {"raw": value}
        letter = DeadLetter(
            source="pipeline",
            topic=STAGE_TOPICS[stage],
            key=str(value.get("job_id")) if value.get("job_id") else None,
            value=value,
            stage=stage,
            reason="invalid_message" if versioning.readable(value) else "unknown_version",
            error=error[:2000],
        )
        await self._send(DLQ, letter.key or "unknown", letter.model_dump_json(), tp)
        metrics.FAILURES.labels(stage, "invalid_message").inc()


def carried(job: ScanJob, stage: str) -> bool:
    """Did an earlier attempt of this re-driven job complete `stage` (its output and timing ride on
    the job)? Then the new attempt passes it through: same events, no model call."""
    return job.attempt > 0 and stage in job.timings


def result_of(
    job: ScanJob, status: str, error: str | None = None, failed_stage: str | None = None
) -> ScanResult:
    """The job's outcome: its identity, every stage output it gathered, timings, and how it ended."""
    kept = (set(ScanResult.model_fields) & set(ScanJob.model_fields)) | set(job.model_extra or {})
    return ScanResult.model_validate(
        {
            **job.model_dump(include=kept),
            "status": status,
            "error": error,
            "failed_stage": failed_stage,
            "finished_at": now(),
            versioning.FIELD: versioning.SCHEMA_VERSION,  # a new record: the writer's stamp
        }
    )


def _warn_unsent(sent: asyncio.Future[Any]) -> None:
    """What Faust's Topic.send did with a record the producer gave up on: say so."""
    if not sent.cancelled() and sent.exception() is not None:
        log.warning("a record was not delivered: %s", sent.exception())


async def _redis_retry(call: Callable[[], Awaitable[Any]]) -> Any:
    """Redis hiccups hold the job (and its offset) instead of failing it."""
    delay = 0.2
    while True:
        try:
            return await call()
        except (RedisError, OSError) as exc:
            log.warning("redis unavailable (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def register(app: faust.App, s: Settings, stages: list[str]) -> Pipeline:
    """Define one agent per stage in `stages` on this process's Faust app."""
    registry.check()  # every stage of the pipeline has its agent, and no agent is left over
    pipeline = Pipeline(app, s)
    for stage in stages:
        assert stage in PIPELINE, stage

        async def agent(stream: faust.StreamT, stage: str = stage) -> None:
            async for event in stream.events():
                await pipeline.handle(stage, event.value, event.headers)

        app.agent(
            pipeline.topics[STAGE_TOPICS[stage]],
            name=f"eco2.stage.{stage}",
            concurrency=s.stage_concurrency,
        )(agent)
    return pipeline
