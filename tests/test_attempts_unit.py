"""Attempts of a job (issue 22): the seq space, the gateway's order across attempts, the memo keys,
what a re-drive produces and which stored outcome wins. No stack."""

from __future__ import annotations

import asyncio
import json

from contract import keys
from contract.events import DeadLetter, ScanResult
from contract.pipeline import (
    ATTEMPT_SPAN,
    FAILED_SEQ,
    PIPELINE,
    STAGES,
    SUCCESS_SEQS,
    attempt_of,
    first_seq,
    is_failure_seq,
    next_seq,
    seq_of,
)
from contract.topics import DLQ, EVENTS, STAGE_TOPICS
from eco2.dlq import Letter, plan
from gateway.hub import Item, Subscriber
from gateway.stream import JobStream, in_order
from persistence.store import batch_args, columns, supersedes, write_sql
from streams.stages import carried

from .gateway_support import full_events, job

RETRY = [ATTEMPT_SPAN + s for s in SUCCESS_SEQS]


def test_every_seq_of_an_attempt_lies_above_every_seq_of_the_one_before() -> None:
    for attempt in range(4):
        seqs = [seq_of(st, status, attempt) for st in STAGES for status in ("started", "completed", "failed")]
        assert {attempt_of(s) for s in seqs} == {attempt}
        assert min(seqs) > seq_of("vision", "failed", attempt - 1) if attempt else True
    assert seq_of("answer", "failed", 2) == 2 * ATTEMPT_SPAN + FAILED_SEQ
    assert first_seq(1) == ATTEMPT_SPAN + SUCCESS_SEQS[0]


def test_next_seq_walks_an_attempt_then_goes_from_its_failure_to_the_next_attempt() -> None:
    walk, seq = [], 0
    while (seq := next_seq(seq)) is not None:  # type: ignore[assignment]
        walk.append(seq)
    assert walk == list(SUCCESS_SEQS)  # done has no successor: a completed job is never re-driven
    assert next_seq(FAILED_SEQ) == first_seq(1) == 101
    assert next_seq(101) == 110 and next_seq(ATTEMPT_SPAN + FAILED_SEQ) == 201
    assert is_failure_seq(99) and is_failure_seq(199) and not is_failure_seq(101)


def test_gateway_order_across_attempts() -> None:
    assert in_order(101, 99)  # the failed client's next event: the new attempt's queued
    assert not in_order(110, 99)  # not the new attempt's second event before its first
    assert in_order(199, 121)  # a failure may follow anything of its own attempt
    assert not in_order(199, 99)  # ... but not jump over the attempt's queued
    assert not in_order(99, 101)  # nor is an old attempt's failure in order after a new attempt


def _item(ev: object) -> Item:
    return Item.parse(ev.model_dump_json())  # type: ignore[attr-defined]


class History:
    def __init__(self, items: list[Item]) -> None:
        self.items = items

    async def __call__(self, job_id: str, after: int) -> list[Item]:
        return [i for i in self.items if i.seq > after]


def _stream(items: list[Item], last: int) -> JobStream:
    return JobStream(
        "j", last, Subscriber("j", 64), History(items), keepalive_s=30, max_stream_s=10, gap_wait_s=5
    )


async def _collect(js: JobStream) -> list[int]:
    async with asyncio.timeout(10):
        return [int(sse.id) async for sse in js.events() if sse.id]


async def test_a_stream_reopens_after_a_failure_and_a_new_reader_is_not_stopped_by_the_old_one() -> None:
    j = job("alice", "j")
    failed = full_events(j, fail_at="answer")
    again = full_events(j.model_copy(update={"attempt": 1}))
    items = [_item(e) for e in failed + again]
    assert [i.seq for i in items[len(failed):]] == RETRY and items[len(failed) - 1].terminal
    # the client that saw the failure reconnects with Last-Event-ID 99: exactly the new attempt
    assert await _collect(_stream(items, FAILED_SEQ)) == RETRY
    # a client from the start reads both attempts: the superseded failure does not end its stream
    assert await _collect(_stream(items, 0)) == [e.seq for e in failed] + RETRY
    # while no re-drive has come, the failure still ends the stream
    assert await _collect(_stream(items[: len(failed)], 0)) == [e.seq for e in failed]


def test_memo_keys_are_per_attempt_and_attempt_0_keeps_its_old_keys() -> None:
    assert keys.memo("j", "out:vision") == keys.memo("j", "out:vision", 0) == "scan:memo:j:out:vision"
    assert len({keys.memo("j", "event:failed", a) for a in range(3)}) == 3


def test_a_new_attempt_passes_through_only_the_stages_an_earlier_attempt_completed() -> None:
    j = job("alice", "j").model_copy(update={"timings": {"vision": 0.1, "rule": 0.0}})
    assert not carried(j, "vision")  # attempt 0: a redelivery goes through the memo, not this
    again = j.model_copy(update={"attempt": 1})
    assert carried(again, "vision") and carried(again, "rule") and not carried(again, "answer")


def _letter(value: dict[str, object], stage: str = "answer") -> Letter:
    dl = DeadLetter(source="pipeline", topic=STAGE_TOPICS[stage], key=str(value["job_id"]), value=value,
                    stage=stage, reason="model_permanent_error", error="400")
    return Letter(DLQ, 0, 7, dl.key, [], dl)


def test_a_redrive_is_the_next_attempt_from_the_first_stage_with_its_queued_event() -> None:
    j = job("alice", "j")
    p = plan(_letter(j.model_dump()))
    assert (p.target, p.key, p.attempt, p.value["attempt"]) == (STAGE_TOPICS[PIPELINE[0]], "j", 1, 1)
    queued = json.loads(p.event or "")
    got = (queued["seq"], queued["attempt"], queued["stage"], queued["event_id"])
    assert got == (101, 1, "queued", "j:101")
    # a letter of attempt 1 (the re-drive failed too) becomes attempt 2, and so on
    p2 = plan(_letter({**j.model_dump(), "attempt": 1}))
    assert (p2.attempt, json.loads(p2.event or "")["seq"]) == (2, 201)
    assert EVENTS != p.target


def _result(status: str, attempt: int) -> ScanResult:
    return ScanResult(job_id="j", user_id="u", status=status, image_url="x", created_at=1.0,  # type: ignore[arg-type]
                      finished_at=2.0, attempt=attempt)


def test_a_later_attempt_replaces_a_failure_never_the_reverse() -> None:
    assert supersedes(_result("completed", 1), _result("failed", 0))
    assert supersedes(_result("failed", 2), _result("failed", 1))
    assert not supersedes(_result("failed", 0), _result("completed", 1))
    assert not supersedes(_result("completed", 1), _result("completed", 1))
    assert not supersedes(_result("failed", 1), _result("failed", 1))  # a repeat changes nothing
    # in one batch the kept row is the one the table would keep, in any order
    attempt_col = [c.name for c in columns()].index("attempt")
    failed, completed = _result("failed", 0), _result("completed", 1)
    for batch in ([failed, completed], [completed, failed]):
        assert batch_args(batch)[attempt_col] == [1]
    sql = write_sql()
    assert "DO UPDATE SET" in sql
    assert "WHERE scans.status = 'failed' AND EXCLUDED.attempt > scans.attempt" in sql


def test_since_reads_iso_utc_or_unix_seconds() -> None:
    from datetime import UTC, datetime

    from eco2.dlq import _since

    assert _since(None) is None and _since("1764750000") == 1764750000.0
    assert _since("2026-12-03T08:00") == datetime(2026, 12, 3, 8, 0, tzinfo=UTC).timestamp()
    assert _since("2026-12-03T09:00+01:00") == _since("2026-12-03T08:00")
