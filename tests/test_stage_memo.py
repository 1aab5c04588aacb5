"""The stage engine's memo (issue 19: claims in one Lua call per step instead of redis-py pipelines).

A redelivered or concurrently delivered stage must send byte-identical events and the same next
stage message, without a second model call once an output is stored. These tests drive
`Pipeline.handle` directly against the stack's Redis, with the Kafka sends recorded instead of
produced and the stage's work replaced where it would call the model.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from contract import keys
from contract.events import DONE, PIPELINE, ScanJob, now
from contract.settings import Settings
from contract.topics import DLQ, EVENTS, STAGE_TOPICS
from streams import registry
from streams.app import create_app
from streams.stages import Pipeline, StageFailure


@pytest.fixture
async def pipeline(settings: Settings, stack_status: Any, tmp_path: Path):  # type: ignore[no-untyped-def]
    registry.load()  # the real agents, as a worker registers them
    s = settings.model_copy(update={"local_dir": tmp_path})
    p = Pipeline(create_app(f"unit-stage-memo-{uuid.uuid4().hex[:6]}", s), s)
    p.sent = []  # type: ignore[attr-defined]

    async def send(name: str, job_id: str, value: str, traceparent: str) -> None:
        p.sent.append((name, job_id, value))  # type: ignore[attr-defined]

    p._send = send  # type: ignore[method-assign]
    yield p
    await p.redis.aclose()


def scan_job(**extra: Any) -> ScanJob:
    return ScanJob(
        job_id=f"t-memo-{uuid.uuid4().hex[:12]}",
        user_id="u-memo",
        image_url="https://example.com/bottle.jpg",
        created_at=now(),
        **extra,
    )


def fake_work(p: Pipeline, delay: float = 0.0, fail: bool = False) -> list[int]:
    """Replace the stage's work (a model call) by one that gives a different output each call."""
    calls: list[int] = []
    counter = itertools.count()

    async def run_stage(stage: str, job: ScanJob) -> ScanJob:
        calls.append(n := next(counter))
        await asyncio.sleep(delay)
        if fail:
            raise StageFailure("model_permanent_error", f"refused #{n}")
        return p.stamp(job, {"classification": {"major_category": "plastic", "call": n}})

    p.run_stage = run_stage  # type: ignore[method-assign]
    return calls


async def test_the_claim_script_keeps_the_first_value_and_its_guard_stops_it(pipeline: Pipeline) -> None:
    a, b, c, d = (f"scan:memo:t-{uuid.uuid4().hex}:{n}" for n in "abcd")
    won, read = await pipeline._claim([(a, "1"), (b, "2")], (c,))
    assert (won, read) == (["1", "2"], [None])
    won, read = await pipeline._claim([(a, "x"), (c, "3")], (b,))
    assert (won, read) == (["1", "3"], [b"2"])  # unguarded: the later claims go on
    won, _ = await pipeline._claim([(a, "y"), (d, "4")], guard=1)
    assert won == ["1"]  # the first key holds another value: the rest was not claimed
    assert await pipeline.redis.get(d) is None
    won, _ = await pipeline._claim([(d, "5"), (c, "6")], guard=1)
    assert won == ["5", "3"]  # the guard passed: every claim answered
    assert 0 < await pipeline.redis.ttl(a) <= pipeline.memo_ttl_s
    await pipeline.redis.delete(a, b, c, d)


async def test_a_redelivered_stage_resends_identical_bytes_and_calls_no_model(pipeline: Pipeline) -> None:
    calls = fake_work(pipeline)
    job = scan_job()
    await pipeline.handle(PIPELINE[0], job.model_dump_json().encode(), {})
    first = list(pipeline.sent)  # type: ignore[attr-defined]
    assert [n for n, _, _ in first] == [EVENTS, EVENTS, STAGE_TOPICS[PIPELINE[1]]]
    pipeline.sent.clear()  # type: ignore[attr-defined]
    await pipeline.handle(PIPELINE[0], job.model_dump_json().encode(), {})
    assert pipeline.sent == first  # type: ignore[attr-defined]
    assert calls == [0]


async def test_concurrent_deliveries_of_one_job_send_the_output_stored_first(pipeline: Pipeline) -> None:
    """Two deliveries both compute (a rebalance overlap): the one that loses the output claim
    sends the events built from the winner's output, never its own."""
    calls = fake_work(pipeline, delay=0.05)
    job = scan_job()
    raw = job.model_dump_json().encode()
    sent: list[list[tuple[str, str, str]]] = []

    async def deliver() -> None:
        await pipeline.handle(PIPELINE[0], raw, {})

    await asyncio.gather(deliver(), deliver())
    assert len(calls) == 2
    mine = pipeline.sent  # type: ignore[attr-defined]
    sent = [[m for m in mine if m[0] == EVENTS], [m for m in mine if m[0] != EVENTS]]
    events, forward = sent
    assert len(events) == 4 and len(set(events)) == 2  # started and completed, each twice the same
    assert len(forward) == 2 and forward[0] == forward[1]
    calls_seen = {json.loads(v).get("classification", {}).get("call") for _, _, v in forward}
    assert len(calls_seen) == 1
    stored = await pipeline.redis.get(keys.memo(job.job_id, f"out:{PIPELINE[0]}"))
    assert stored is not None and json.loads(stored)["classification"]["call"] in calls_seen
    assert forward[0][2].encode() == stored  # the next stage gets the stored output's bytes


async def test_the_last_stage_claims_completed_and_done_once(pipeline: Pipeline) -> None:
    """No model call in the last stage: its real agent runs, twice, and sends the same bytes."""
    job = scan_job(classification={"major_category": "plastic"}, answer={"disposal_steps": [], "gaps": []})
    last = PIPELINE[-1]
    for _ in range(2):
        await pipeline.handle(last, job.model_dump_json().encode(), {})
    first, second = pipeline.sent[:3], pipeline.sent[3:]  # type: ignore[attr-defined]
    assert first == second
    stages = [(json.loads(v)["stage"], json.loads(v)["status"]) for _, _, v in first]
    assert stages == [(last, "started"), (last, "completed"), (DONE, "completed")]


async def test_a_failure_is_memoised_within_its_attempt(pipeline: Pipeline) -> None:
    calls = fake_work(pipeline, fail=True)
    job = scan_job()
    for _ in range(2):
        await pipeline.handle(PIPELINE[0], job.model_dump_json().encode(), {})
    first, second = pipeline.sent[:3], pipeline.sent[3:]  # type: ignore[attr-defined]
    assert first[:2] == second[:2] and calls == [0]  # the events (a dead letter has its own time)
    assert [n for n, _, _ in first] == [n for n, _, _ in second] == [EVENTS, EVENTS, DLQ]
    assert json.loads(first[1][2])["status"] == "failed"
    assert "refused #0" in json.loads(first[2][2])["error"]


async def test_a_model_free_stage_claims_its_whole_step_once_whoever_computes_it(pipeline: Pipeline) -> None:
    """A model-free stage runs before its claims (one round trip): deliveries that compute
    different outputs at once, and a later redelivery, all send the bytes stored first."""
    free = next(name for name in PIPELINE if registry.REGISTRY[name].model_free)
    calls = fake_work(pipeline, delay=0.05)
    job = scan_job()
    raw = job.model_dump_json().encode()
    await asyncio.gather(pipeline.handle(free, raw, {}), pipeline.handle(free, raw, {}))
    await pipeline.handle(free, raw, {})
    assert len(calls) == 3  # cheap work is done again; what is sent is not
    sent = pipeline.sent  # type: ignore[attr-defined]
    assert len(sent) == 9 and len(set(sent)) == 3
    stored = await pipeline.redis.get(keys.memo(job.job_id, f"out:{free}"))
    assert stored is not None and {v.encode() for n, _, v in sent if n != EVENTS} == {stored}
    # The deliveries' sends interleave (a loser sends `started`, then reads the stored output),
    # so the order is checked on each distinct record's first send.
    first = list(dict.fromkeys(sent))
    statuses = [(json.loads(v)["stage"], json.loads(v)["status"]) for n, _, v in first if n == EVENTS]
    assert statuses == [(free, "started"), (free, "completed")]


async def test_model_free_agents_ask_for_no_model() -> None:
    """`model_free=True` lets the engine run an agent again on every redelivery: only an agent
    that never takes a model client (nor makes any other outside call) may say so."""

    class NoModel:
        s = Settings()

        def model(self) -> Any:
            raise AssertionError("a model_free agent asked for a model")

        async def retried(self, stage: str, call: Any) -> Any:
            raise AssertionError("a model_free agent made a retried call")

    job = scan_job(classification={"major_category": "plastic"}, answer={"disposal_steps": [], "gaps": []})
    free = [a for a in registry.load().values() if a.model_free]
    assert free and len(free) < len(PIPELINE)
    for agent in free:
        await agent.run(NoModel(), job)
    with pytest.raises(AssertionError):  # the check can fail: the first stage calls the model
        await registry.REGISTRY[PIPELINE[0]].run(NoModel(), job)


async def test_the_per_stage_trace_line_is_written_only_when_asked_for(pipeline: Pipeline) -> None:
    """ECO2_STAGE_TRACE_LOG (off by default, issue 19): one INFO line per stage and job."""
    import logging

    from streams.stages import log

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    fake_work(pipeline)
    handler = Keep()
    log.addHandler(handler)
    try:
        assert pipeline.trace_log is False  # the default
        await pipeline.handle(PIPELINE[0], scan_job().model_dump_json().encode(), {})
        assert not [x for x in lines if x.startswith("stage=")]
        pipeline.trace_log = True
        job = scan_job()
        await pipeline.handle(PIPELINE[0], job.model_dump_json().encode(), {})
        (line,) = [x for x in lines if x.startswith("stage=")]
        assert re.fullmatch(f"stage={PIPELINE[0]} job={job.job_id} trace=[0-9a-f]{{32}}", line)
    finally:
        log.removeHandler(handler)


async def test_claims_asked_together_share_a_call_and_keep_their_own_answers(pipeline: Pipeline) -> None:
    """Many jobs' claims at once (streams/claims.py): fewer Redis calls than claims, and each
    claim answered as if alone, a lost guard stopping only its own claim."""
    n = 40
    key = [[f"scan:memo:t-{uuid.uuid4().hex}:{x}" for x in "abc"] for _ in range(n)]
    for i in range(0, n, 2):  # every other claim finds its guard taken
        await pipeline.redis.set(key[i][0], f"taken-{i}", ex=60)
    calls = pipeline.claims.calls
    answers = await asyncio.gather(
        *(pipeline._claim([(k[0], f"v{i}"), (k[1], f"w{i}")], (k[2],), guard=1) for i, k in enumerate(key))
    )
    assert pipeline.claims.calls - calls < n / 4  # one call in flight at a time, the rest queued together
    for i, (won, read) in enumerate(answers):
        if i % 2 == 0:
            assert (won, read) == ([f"taken-{i}"], [])  # stopped at its guard
            assert await pipeline.redis.get(key[i][1]) is None
        else:
            assert (won, read) == ([f"v{i}", f"w{i}"], [None])
    await pipeline.redis.delete(*(k for ks in key for k in ks))


async def test_a_cancelled_claim_leaves_the_others_answered(pipeline: Pipeline) -> None:
    keys_ = [f"scan:memo:t-{uuid.uuid4().hex}" for _ in range(3)]
    tasks = [asyncio.ensure_future(pipeline._claim([(k, "1")])) for k in keys_]
    await asyncio.sleep(0)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[0] == (["1"], []) and done[2] == (["1"], [])
    assert isinstance(done[1], asyncio.CancelledError)
    again = await asyncio.gather(*(pipeline._claim([(k, "2")]) for k in keys_))  # the claimer goes on
    assert [won for won, _ in again][::2] == [["1"], ["1"]]
    await pipeline.redis.delete(*keys_)


async def test_claims_reload_the_script_after_redis_lost_it(pipeline: Pipeline) -> None:
    key = f"scan:memo:t-{uuid.uuid4().hex}"
    await pipeline.redis.script_flush()  # what a Redis restart does to the script cache
    assert await pipeline._claim([(key, "1")]) == (["1"], [])
    assert await pipeline._claim([(key, "2")]) == (["1"], [])
    await pipeline.redis.delete(key)


async def test_the_memo_metrics_count_claims_and_the_calls_that_carried_them(pipeline: Pipeline) -> None:
    from streams import metrics

    claims0, calls0 = metrics.MEMO_CLAIMS._value.get(), metrics.MEMO_CALLS._value.get()
    keys_ = [f"scan:memo:t-{uuid.uuid4().hex}" for _ in range(10)]
    await asyncio.gather(*(pipeline._claim([(k, "1")]) for k in keys_))
    assert metrics.MEMO_CLAIMS._value.get() - claims0 == 10
    assert 1 <= metrics.MEMO_CALLS._value.get() - calls0 < 10
    await pipeline.redis.delete(*keys_)


async def test_claims_queued_behind_a_cancelled_first_claim_are_still_answered(pipeline: Pipeline) -> None:
    """The first claim goes from its own task; when that job is cancelled mid-call (a stopping
    worker), the claims queued behind it still go, from a sender task."""
    keys_ = [f"scan:memo:t-{uuid.uuid4().hex}" for _ in range(4)]
    first = asyncio.ensure_future(pipeline._claim([(keys_[0], "1")]))
    await asyncio.sleep(0)  # the first claim is in flight
    rest = [asyncio.ensure_future(pipeline._claim([(k, "1")])) for k in keys_[1:]]
    await asyncio.sleep(0)  # queued behind it
    first.cancel()
    assert await asyncio.wait_for(asyncio.gather(*rest), 10) == [(["1"], [])] * 3
    assert isinstance((await asyncio.gather(first, return_exceptions=True))[0], asyncio.CancelledError)
    assert await pipeline._claim([(keys_[0], "2")]) in ((["1"], []), (["2"], []))  # and it goes on
    await pipeline.redis.delete(*keys_)


async def test_claims_keep_one_connection_and_reconnect_when_it_is_lost(pipeline: Pipeline) -> None:
    """The claims' calls never overlap, so they hold one connection of the pool; a dropped one
    (Redis restarted, a proxy hung up) is reconnected and the claim still answered."""
    keys_ = [f"scan:memo:t-{uuid.uuid4().hex}" for _ in range(6)]
    await asyncio.gather(*(pipeline._claim([(k, "1")]) for k in keys_[:3]))
    conn = pipeline.claims.redis.connection
    assert conn is not None
    await asyncio.gather(*(pipeline._claim([(k, "1")]) for k in keys_[3:5]))
    assert pipeline.claims.redis.connection is conn  # the same one, not one from the pool per call
    client_id = await pipeline.claims.redis.client_id()
    assert await pipeline.redis.client_kill_filter(_id=str(client_id)) == 1
    assert await pipeline._claim([(keys_[5], "2")]) == (["2"], [])
    assert await pipeline._claim([(keys_[0], "3")]) == (["1"], [])
    await pipeline.redis.delete(*keys_)
