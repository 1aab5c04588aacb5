"""Issue 5, no services needed: batching, what the writer stores or dead-letters, batch arguments."""

from __future__ import annotations

import json

import pytest

from contract.events import Reward, ScanJob, ScanResult, make_event, now
from contract.versioning import SCHEMA_VERSION
from persistence.batcher import Batcher
from persistence.records import Bad, ownership_of, parse
from persistence.store import batch_args, columns, is_data_error


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drain(n: int, size: int = 50, timeout_s: float = 1.0) -> list[int]:
    """Feed n records the way the writer's poll loop does (ask for `room`, flush when due)."""
    clock = Clock()
    b: Batcher[int] = Batcher(size, timeout_s, clock)
    sizes: list[int] = []
    left = n
    while left or len(b):
        take = min(b.room(), left)
        for i in range(take):
            b.add(i)
        left -= take
        if not b.due():
            assert left == 0, "a full batch must be due"
            clock.t += b.wait_s()  # nothing else arrives: the poll times out
        while b.due():
            sizes.append(len(b.take()))
    return sizes


@pytest.mark.parametrize(
    "n, expected",
    [(1, [1]), (49, [49]), (50, [50]), (51, [50, 1]), (500, [50] * 10), (0, [])],
)
def test_batch_boundaries(n: int, expected: list[int]) -> None:
    assert drain(n) == expected


def test_flush_on_size_before_timeout() -> None:
    clock = Clock()
    b: Batcher[int] = Batcher(3, 1.0, clock)
    for i in range(2):
        b.add(i)
    assert not b.due()
    b.add(2)
    assert b.due() and b.take() == [0, 1, 2]
    assert not b.due() and len(b) == 0


def test_flush_on_timeout_counts_from_oldest_record() -> None:
    clock = Clock()
    b: Batcher[str] = Batcher(50, 1.0, clock)
    assert b.wait_s() == 1.0 and not b.due()
    b.add("a")
    clock.t += 0.6
    b.add("b")
    assert b.wait_s() == pytest.approx(0.4)
    clock.t += 0.39
    assert not b.due()
    clock.t += 0.01
    assert b.due()
    assert b.take() == ["a", "b"]
    assert b.wait_s() == 1.0  # the clock restarts with the next record


def test_take_keeps_the_rest_and_drop_forgets() -> None:
    clock = Clock()
    b: Batcher[int] = Batcher(2, 1.0, clock)
    for i in range(5):
        b.add(i)
    assert b.take() == [0, 1]
    assert b.drop(lambda i: i % 2 == 0) == 2  # 2 and 4
    assert b.take() == [3]
    assert not b.due()
    with pytest.raises(ValueError):
        Batcher(0, 1.0)


# --- records ---------------------------------------------------------------------------------


def _job(job_id: str = "job-1", user: str = "user-1") -> ScanJob:
    return ScanJob(
        job_id=job_id, user_id=user, image_url="https://img.example/a.jpg", model="m", created_at=now()
    )


def _result(job: ScanJob, **kw: object) -> ScanResult:
    base: dict[str, object] = dict(
        job_id=job.job_id,
        user_id=job.user_id,
        status="completed",
        image_url=job.image_url,
        reward=Reward(granted=True, character_code="PET", reason="ok").model_dump(),
        created_at=job.created_at,
        finished_at=job.created_at + 12.5,
    )
    base.update(kw)
    return ScanResult.model_validate(base)


def _bytes(ev: object) -> bytes:
    return ev.model_dump_json().encode()  # type: ignore[attr-defined]


def test_parse_skips_non_terminal_and_keeps_terminal() -> None:
    job = _job()
    assert parse(_bytes(make_event(job, "vision", "started"))) is None
    assert parse(_bytes(make_event(job, "reward", "completed"))) is None
    assert parse(b'{"job_id": "smoke", "stage": "smoke"}') is None  # not ours, not terminal
    done = parse(_bytes(make_event(job, "done", "completed", result=_result(job))))
    assert isinstance(done, ScanResult) and done.job_id == job.job_id
    failed_result = _result(job, status="failed", reward=None, error="model down", failed_stage="vision")
    failed = parse(_bytes(make_event(job, "vision", "failed", result=failed_result, error="model down")))
    assert isinstance(failed, ScanResult) and failed.status == "failed"
    assert ownership_of(failed) is None
    own = ownership_of(done)
    assert own is not None and (own.user_id, own.character_code, own.job_id) == ("user-1", "PET", "job-1")


def _in_result(**changes: object):  # type: ignore[no-untyped-def]
    return lambda ev: {**ev, "result": {**ev["result"], **changes}}


def _without_image_url(ev):  # type: ignore[no-untyped-def]
    return {**ev, "result": {k: v for k, v in ev["result"].items() if k != "image_url"}}


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda ev: "not json{", "not_json"),
        (lambda ev: "[1, 2]", "not_json"),
        (lambda ev: {**ev, "seq": "many"}, "invalid_event"),
        (lambda ev: {**ev, "result": None}, "invalid_result"),
        (_without_image_url, "invalid_result"),
        (_in_result(job_id="other"), "invalid_result"),
        (_in_result(status="failed"), "invalid_result"),
        (_in_result(reward={"granted": True, "reason": "x"}), "invalid_result"),
        (_in_result(reward={"granted": "maybe"}), "invalid_result"),
    ],
)
def test_parse_dead_letters_bad_terminal_events(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    job = _job()
    ev = json.loads(_bytes(make_event(job, "done", "completed", result=_result(job))))
    bad_value = mutate(ev)
    raw = bad_value if isinstance(bad_value, str) else json.dumps(bad_value)
    out = parse(raw.encode())
    assert isinstance(out, Bad), out
    assert out.reason == reason
    assert out.error
    if reason != "not_json":
        assert out.value == bad_value  # the original value travels to the dead letter
    else:
        assert out.value == {"raw": raw}


def test_batch_args_dedupe_jobs_and_keep_earliest_ownership() -> None:
    a, b, c = _job("a", "u"), _job("b", "u"), _job("c", "u")
    ra = _result(a, finished_at=300.0)
    rb = _result(b, finished_at=100.0)  # the earliest grant of PET to u
    rc = _result(c, reward=Reward(granted=False, reason="no").model_dump())
    ra_again = _result(a, finished_at=50.0, answer={"text": "later duplicate"})
    args = batch_args([ra, rb, rc, ra_again])
    names = [c.name for c in columns()]
    assert len(args) == len(names) + 4
    by = dict(zip(names, args, strict=False))
    assert by["job_id"] == ["a", "b", "c"]  # one row per job; the first terminal event wins
    assert json.loads(by["answer"][0] or "null") is None  # a's answer: the first one (None)
    assert args[len(names) :] == [["u"], ["PET"], ["b"], [100.0]]
    assert by["v"] == [SCHEMA_VERSION] * 3 and by["extra"] == [None] * 3  # no fields of a newer version


def test_is_data_error_only_for_data_classes() -> None:
    import asyncpg

    assert is_data_error(asyncpg.exceptions.CharacterNotInRepertoireError("x"))
    assert is_data_error(asyncpg.exceptions.UniqueViolationError("x"))
    assert is_data_error(asyncpg.exceptions.DataError("x"))  # asyncpg could not encode an argument
    assert not is_data_error(asyncpg.exceptions.UndefinedTableError("x"))
    assert not is_data_error(asyncpg.exceptions.CannotConnectNowError("x"))
    assert not is_data_error(ConnectionRefusedError())
    assert not is_data_error(TimeoutError())


def test_writer_reports_the_age_of_each_partitions_oldest_pending_record() -> None:
    """What eco2_consumer_oldest_in_flight_seconds shows for the writer (the stuck-message alert):
    per partition the oldest record fetched and not yet committed, 0 for an idle partition; the
    arrivals of records already written are forgotten."""
    import time

    from aiokafka import ConsumerRecord, TopicPartition

    from contract.settings import Settings
    from persistence.writer import Writer

    def rec(partition: int, offset: int) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord("scan.events", partition, offset, 0, 0, None, b"{}", None, 0, 2, [])

    w = Writer(Settings())
    now = time.monotonic()
    old, young, written = rec(0, 7), rec(0, 8), rec(1, 3)
    for m, age in ((old, 30.0), (young, 2.0), (written, 50.0)):
        w._arrived[(m.topic, m.partition, m.offset)] = now - age
    w._flushing = [old]
    w.batcher.add(young)
    tps = {TopicPartition("scan.events", p) for p in (0, 1, 2)}
    ages = w._oldest(tps)
    assert 30.0 <= ages[TopicPartition("scan.events", 0)] < 31.0
    assert ages[TopicPartition("scan.events", 1)] == ages[TopicPartition("scan.events", 2)] == 0.0
    assert set(w._arrived) == {("scan.events", 0, 7), ("scan.events", 0, 8)}
