"""Prometheus metrics of the stream processes (stage workers and router)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from contract.pipeline import PIPELINE

STAGE_LATENCY = Histogram(
    "eco2_stage_seconds",
    "time one job spends in a stage (model calls included)",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 7.5, 10, 15, 20, 30, 60),
)
IN_FLIGHT = Gauge("eco2_stage_in_flight", "jobs being processed now", ["stage"])
RETRIES = Counter("eco2_stage_retries_total", "model call retries after transient errors", ["stage"])
FAILURES = Counter("eco2_stage_failures_total", "jobs failed terminally", ["stage", "reason"])
JOBS = Counter("eco2_stage_jobs_total", "jobs completed by a stage", ["stage"])
# Memo claims and the Redis calls that carried them (streams/claims.py: claims asked while a call is
# in flight share the next one); claims per call is the batching at this load.
MEMO_CLAIMS = Counter("eco2_stage_memo_claims_total", "memo claims (one per step of a stage and job)")
MEMO_CALLS = Counter("eco2_stage_memo_calls_total", "Redis calls carrying the memo claims")
E2E = Histogram(
    "eco2_scan_e2e_seconds",
    "from the POST (job created_at) to its done event, per finished scan",
    buckets=(1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 300),
)

# Every stage's failure series exists from the start at 0, so the dead-letter panel and alert have
# a series to read before the first failure (a labelled counter is otherwise absent until then).
FAILURE_REASONS = ("model_permanent_error", "model_retries_exhausted", "invalid_message", "unknown_version")
for _stage in PIPELINE:
    for _reason in FAILURE_REASONS:
        FAILURES.labels(_stage, _reason)
