"""Job and event schemas: the JSON on every topic and in every SSE `data:` line."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

# The stage list and everything derived from it (seqs, progress, the terminal test) live in
# contract/pipeline.py; re-exported here, where the events that carry them are defined.
from contract.pipeline import (
    DONE,
    DONE_SEQ,
    FAILED,
    FAILED_SEQ,
    PIPELINE,
    PROGRESS,
    QUEUED,
    QUEUED_SEQ,
    STAGES,
    SUCCESS_SEQS,
    is_terminal,
    next_stage,
    seq_of,
)
from contract.versioning import Versioned

Status = Literal["started", "completed", "failed"]

# SSE `event:` names. A failure is `failed`, never `error`: EventSource dispatches its own
# connection errors as `error`, so a client could not tell a failed job from a network blip.
FAILED_EVENT = FAILED
SSE_EVENTS: tuple[str, ...] = (*STAGES, FAILED_EVENT)

__all__ = [
    "DONE",
    "DONE_SEQ",
    "FAILED_SEQ",
    "PIPELINE",
    "PROGRESS",
    "QUEUED",
    "QUEUED_SEQ",
    "STAGES",
    "SUCCESS_SEQS",
    "is_terminal",
    "next_stage",
    "seq_of",
]


def sse_event_name(stage: str, status: str) -> str:
    """The SSE `event:` name of an event: its stage, or `failed` for the terminal failure."""
    return FAILED_EVENT if status == FAILED else stage


def now() -> float:
    return round(time.time(), 3)


class ScanRequest(BaseModel):
    image_url: str
    user_input: str | None = None
    model: str | None = None


class ScanJob(Versioned):  # `v` and unknown fields kept: contract/versioning.py
    """The message on every stage topic: the job plus everything earlier stages found.

    Each stage adds the fields of its output model (streams/agents.py); those of the first stages
    are typed here, a newer stage's ride along as extra fields (kept, never dropped)."""

    job_id: str
    user_id: str
    image_url: str
    user_input: str | None = None
    # The model the client asked for, used by every model call of the job; "" = each stage's
    # configured model (ECO2_VISION_MODEL, ECO2_ANSWER_MODEL). An empty string, not null: a worker
    # of the previous version (model: str) reads it, and its `job.model or setting` agrees.
    model: str = ""
    created_at: float
    # Which attempt of the job this is: 0, then +1 per re-drive of its dead letter (`eco2 dlq
    # replay`); it keys the stage memo and offsets the seqs (contract.pipeline.ATTEMPT_SPAN).
    attempt: int = 0
    classification: dict[str, Any] | None = None
    rules_key: str | None = None
    rules: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None
    reward: dict[str, Any] | None = None
    timings: dict[str, float] = Field(default_factory=dict)


class ScanResult(Versioned):  # `v` and unknown fields kept: contract/versioning.py
    """The whole outcome of a scan: carried by the terminal event, cached and stored (every stage
    output the job gathered; see ScanJob)."""

    job_id: str
    user_id: str
    status: Literal["completed", "failed"]
    image_url: str
    classification: dict[str, Any] | None = None
    rules_key: str | None = None
    rules: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None
    reward: dict[str, Any] | None = None
    error: str | None = None
    failed_stage: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: float
    finished_at: float
    attempt: int = 0  # the attempt that ended so (a later attempt's replaces a failure's)


class ScanEvent(Versioned):  # `v` and unknown fields kept: contract/versioning.py
    """One progress event on `scan.events`; event_id is deterministic so replays dedupe."""

    event_id: str
    job_id: str
    user_id: str
    stage: str
    status: Status
    seq: int
    ts: float
    progress: int
    result: dict[str, Any] | None = None
    error: str | None = None
    attempt: int = 0  # the job's attempt (seq // ATTEMPT_SPAN): a re-drive starts a new one

    @property
    def terminal(self) -> bool:
        return is_terminal(self.stage, self.status)

    @property
    def sse_event(self) -> str:
        """The SSE `event:` name: the stage, or `failed` for a failure."""
        return sse_event_name(self.stage, self.status)


def make_event(
    job: ScanJob,
    stage: str,
    status: Status,
    *,
    result: ScanResult | None = None,
    error: str | None = None,
) -> ScanEvent:
    seq = seq_of(stage, status, job.attempt)
    if status == "completed":
        progress = PROGRESS[stage]
    else:
        progress = PROGRESS[STAGES[max(STAGES.index(stage) - 1, 0)]]
    # Built from a validated job and our own values: constructed, not validated again (issue 19).
    return ScanEvent.model_construct(
        event_id=f"{job.job_id}:{seq}",
        job_id=job.job_id,
        user_id=job.user_id,
        stage=stage,
        status=status,
        seq=seq,
        ts=now(),
        progress=progress,
        result=result.model_dump() if result else None,
        error=error,
        attempt=job.attempt,
    )


class Reward(BaseModel):
    """What the reward stage decided; `character_code` is set only when granted."""

    granted: bool
    character_code: str | None = None
    character_name: str | None = None
    reason: str


class DeadLetter(Versioned):  # `v` and unknown fields kept: contract/versioning.py
    """A record on a dead-letter topic: the original message plus why it could not be handled."""

    source: Literal["pipeline", "writer"]
    topic: str  # where the original message came from
    key: str | None
    value: dict[str, Any]  # the original message, as it was
    stage: str | None = None
    reason: str  # short machine-readable reason, e.g. "model_permanent_error"
    error: str  # human-readable detail
    attempts: int = 1
    ts: float = Field(default_factory=now)
