"""Issue 22: the newest-first replay of a flushed view, and when a reader may vouch for one job."""

from __future__ import annotations

import random
import time

from contract.events import QUEUED_SEQ, ScanEvent
from view import marker
from view.rebuild import chunk_plan, newest_first

from .gateway_support import full_events, job


def test_chunk_plan_walks_back_from_the_end_without_gap_or_overlap() -> None:
    assert list(chunk_plan(0, 10, 4)) == [(6, 10), (2, 6), (0, 2)]
    assert list(chunk_plan(5, 5, 4)) == []
    assert list(chunk_plan(3, 4, 100)) == [(3, 4)]
    # A small first round, doubling up to the chunk size.
    assert list(chunk_plan(0, 100, 30, first=5)) == [(95, 100), (85, 95), (65, 85), (35, 65), (5, 35), (0, 5)]
    for begin, end, size, first in [
        (0, 1000, 7, None),
        (17, 9001, 500, 3),
        (0, 3, 1, 10),
        (5, 50_000, 5000, 500),
    ]:
        plan = list(chunk_plan(begin, end, size, first))
        assert plan[0][1] == end and plan[-1][0] == begin
        assert all(a[0] == b[1] for a, b in zip(plan, plan[1:], strict=False))  # contiguous
        assert all(0 < hi - lo <= size for lo, hi in plan)


def _log(n_jobs: int, seed: int) -> list[tuple[int, ScanEvent]]:
    """One partition: the events of `n_jobs` interleaved as jobs run side by side, in order per job."""
    rng = random.Random(seed)
    queues = [full_events(job("u")) for _ in range(n_jobs)]
    out: list[ScanEvent] = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        out.append(q.pop(0))
    return list(enumerate(out))


def test_a_job_whose_queued_event_is_back_has_all_its_later_events_back() -> None:
    """The per-job readiness rule, replayed chunk by chunk: at every moment a reader could look
    (between two applies), a job whose history holds its queued event holds all its events."""
    for seed, size, first in [(1, 7, None), (2, 50, 3), (3, 1, None), (4, 1000, 10)]:
        log = _log(40, seed)
        applied: dict[str, set[int]] = {}
        expected = {ev.job_id: {e.seq for _, e in log if e.job_id == ev.job_id} for _, ev in log}
        ended: dict[str, float] = {}
        for lo, hi in chunk_plan(0, len(log), size, first):
            for _, ev in newest_first(log[lo:hi], ended, time.time(), 3600):
                applied.setdefault(ev.job_id, set()).add(ev.seq)
                for job_id, seqs in applied.items():
                    if QUEUED_SEQ in seqs:
                        assert seqs == expected[job_id], (seed, size, job_id)
        assert applied == expected


def test_newest_first_orders_by_offset_and_remembers_the_end_of_each_job() -> None:
    j = job("u")
    evs = full_events(j)
    for ev in evs:
        ev.ts = 1000.0 + ev.seq
    ended: dict[str, float] = {}
    out = newest_first(list(enumerate(evs)), ended, now=1100.0, finished_ttl_s=3600)
    assert [off for off, _ in out] == list(range(len(evs)))[::-1]
    assert ended == {j.job_id: evs[-1].ts}  # the terminal event's ts: every key's finished TTL


def test_newest_first_leaves_out_jobs_whose_finished_ttl_ran_out() -> None:
    """Their keys expired long ago; an older event must not bring the job back (as running)."""
    old, running, recent = job("u"), job("u"), job("u")
    evs_old = full_events(old)
    for ev in evs_old:
        ev.ts = 0.0
    evs_running = full_events(running)[:3]
    evs_recent = full_events(recent)
    log = list(enumerate([*evs_old, *evs_running, *evs_recent]))
    ended: dict[str, float] = {}
    # Two chunks: the recent job and the running one first, the old job's events in the second.
    first = newest_first(log[len(evs_old) :], ended, now=10_000.0, finished_ttl_s=3600)
    second = newest_first(log[: len(evs_old)], ended, now=10_000.0, finished_ttl_s=3600)
    assert {ev.job_id for _, ev in first} == {running.job_id, recent.job_id}
    assert second == [] and old.job_id in ended


def _raw(status: str | None, run_id: str | None = "r", order: str | None = None) -> list[object]:
    return [status, run_id, "e1", order]


def test_job_whole_vouches_per_job_only_for_a_newest_first_rebuild() -> None:
    nf = marker.NEWEST_FIRST
    assert marker.job_whole(_raw("ready"), "r", has_queued=False)  # whole view: every job
    assert marker.job_whole(_raw("rebuilding", order=nf), "r", has_queued=True)
    assert not marker.job_whole(_raw("rebuilding", order=nf), "r", has_queued=False)  # not back yet
    assert not marker.job_whole(_raw("rebuilding"), "r", has_queued=True)  # from a checkpoint
    assert not marker.job_whole(_raw(None, order=nf), "r", has_queued=True)  # lost
    assert not marker.job_whole(_raw("rebuilding", order=nf), "other-run", has_queued=True)  # restarted
    assert marker.interpret([b"ready", b"r", b"e1", None], "r") == ("ready", "e1")
