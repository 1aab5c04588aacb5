"""The pipeline: the one list of stages. Every other stage name, seq, topic, group, SSE event name,
progress figure and manifest is derived from `SPEC` (here, `contract/topics.py`, `eco2 deploy`).

Adding a stage is one line in `SPEC` plus its agent (a function decorated with
`@streams.agents.stage(...)`, appended to `streams/agents.py`); the workers refuse to start while
the two disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, as everything outside its agent needs to know it."""

    name: str  # topic scan.<name>, consumer group eco2-stage-<name>, SSE event <name>
    doc: str  # what waits on its topic (KafkaTopic annotation, AsyncAPI)
    model: bool = False  # calls the model: its pods get the API key and more memory (eco2 deploy)


# The stages in order. A job goes through each once, then `done`.
SPEC: tuple[Stage, ...] = (
    Stage("vision", "jobs waiting for image classification", model=True),
    Stage("rule", "classified jobs waiting for rule lookup"),
    Stage("answer", "jobs waiting for the written answer", model=True),
    Stage("reward", "answered jobs waiting for the reward"),
)

QUEUED = "queued"  # the API's event when it accepts a job (before the first stage)
DONE = "done"  # the success event after the last stage (carries the result)
FAILED = "failed"  # the status (and SSE event name) of the one terminal failure

PIPELINE: tuple[str, ...] = tuple(st.name for st in SPEC)
BY_STAGE: dict[str, Stage] = {st.name: st for st in SPEC}
STAGES: tuple[str, ...] = (QUEUED, *PIPELINE, DONE)

# seq = index in STAGES * 10 (+1 once completed); the failure is 99, above every other seq, so the
# pipeline holds at most 8 stages (done = 10 * (n + 1) + 1 must stay below it).
FAILED_SEQ = 99
assert len(SPEC) <= 8 and len(set(PIPELINE)) == len(PIPELINE), "at most 8 distinct stages"
assert not {QUEUED, DONE, FAILED} & set(PIPELINE), "a stage may not be named queued, done or failed"

# Percent complete once a stage completed: even steps, the last stage at 100.
PROGRESS: dict[str, int] = {
    QUEUED: 0,
    **{st: round(100 * (i + 1) / len(PIPELINE)) for i, st in enumerate(PIPELINE)},
    DONE: 100,
}


# Attempts (a dead letter re-driven by `eco2 dlq replay` is a new attempt of the same job): the
# seqs of attempt n are those of attempt 0 plus n * ATTEMPT_SPAN, so each attempt's seqs lie above
# every seq of the attempts before it (FAILED_SEQ < ATTEMPT_SPAN): the router's state moves on to
# the new attempt, the history stays in order and one seq never names two events.
ATTEMPT_SPAN = 100
assert FAILED_SEQ < ATTEMPT_SPAN


def seq_of(stage: str, status: str, attempt: int = 0) -> int:
    base = attempt * ATTEMPT_SPAN
    if status == FAILED:
        return base + FAILED_SEQ
    return base + STAGES.index(stage) * 10 + (1 if status == "completed" else 0)


def attempt_of(seq: int) -> int:
    """The attempt an event's seq belongs to."""
    return seq // ATTEMPT_SPAN


def first_seq(attempt: int) -> int:
    """The first event of an attempt: its `queued` (attempt 0: the API's; later ones: the re-drive's)."""
    return seq_of(QUEUED, "completed", attempt)


# Every seq of a successful job, in order: queued, started/completed per stage, done.
SUCCESS_SEQS: tuple[int, ...] = (
    seq_of(QUEUED, "completed"),
    *(seq_of(st, status) for st in PIPELINE for status in ("started", "completed")),
    seq_of(DONE, "completed"),
)
DONE_SEQ = SUCCESS_SEQS[-1]
# A job's first seq: a history holding it holds the job from its start (view/marker.py job_whole).
QUEUED_SEQ = SUCCESS_SEQS[0]


def next_seq(seq: int) -> int | None:
    """The seq that directly follows `seq` in a job's stream, whatever its attempt: the next
    success seq of its attempt, after a failure the next attempt's `queued`, after `done` none
    (a completed job is never re-driven); 0 (nothing seen yet) is followed by attempt 0's first."""
    if seq <= 0:
        return SUCCESS_SEQS[0]
    attempt, rel = divmod(seq, ATTEMPT_SPAN)
    if rel == FAILED_SEQ:
        return first_seq(attempt + 1)
    if rel not in SUCCESS_SEQS or rel == DONE_SEQ:
        return None
    return attempt * ATTEMPT_SPAN + SUCCESS_SEQS[SUCCESS_SEQS.index(rel) + 1]


def is_failure_seq(seq: int) -> bool:
    """Is `seq` the failure of its attempt (it may follow any event of that attempt)?"""
    return seq % ATTEMPT_SPAN == FAILED_SEQ


def next_stage(stage: str) -> str:
    """The stage after `stage` (`done` after the last pipeline stage)."""
    return STAGES[STAGES.index(stage) + 1]


def is_terminal(stage: str | None, status: str | None) -> bool:
    """The one test of "does this event end the job?": `done`, or the failure at any stage."""
    return status == FAILED or stage == DONE


def is_terminal_lua(stage: str, status: str) -> str:
    """`is_terminal` as a Lua expression over two Lua expressions (the Redis apply script is
    generated with it, and a test runs it against `is_terminal` on every event kind)."""
    return f"({status} == '{FAILED}' or {stage} == '{DONE}')"
