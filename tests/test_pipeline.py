"""Issue 3: a scan through the real API, Kafka, stage agents and simulated model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from catalog import rewards, rules
from contract.events import DONE, DONE_SEQ, FAILED_SEQ, PIPELINE, PROGRESS, QUEUED, SUCCESS_SEQS, seq_of
from contract.settings import Settings
from contract.topics import BY_NAME, EVENTS, STAGE_TOPICS, partition_for, shard_of, stage_group
from producers.client import submit, wait_result

from .conftest import REPO, eco2
from .kafka_events import dead_letters, job_events, read_partition

pytestmark = pytest.mark.integration

# Every event of a successful job, in order: queued, started/completed per stage, done.
EXPECTED = [
    (QUEUED, "completed"),
    *((st, status) for st in PIPELINE for status in ("started", "completed")),
    (DONE, "completed"),
]


def img(name: str, uid: str) -> str:
    return f"https://images.example.com/scans/{name}.jpg?u={uid}"


@pytest.fixture
async def api(settings: Settings, zero_latency_model: str):  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as http:
        yield http


def since() -> int:
    return int(time.time() * 1000) - 2000


async def test_scan_end_to_end_events_in_seq_order(api: httpx.AsyncClient, settings: Settings, uid: str):
    t0 = since()
    accepted = await submit(api, img("clear_pet-bottle-label_attached", uid), f"user-{uid}")
    job_id = accepted["job_id"]
    assert accepted["status"] == "queued"
    assert accepted["stream_url"].split("?token=")[0].endswith(f"/api/v1/scan/{job_id}/events")
    assert accepted["result_url"].endswith(f"/api/v1/scan/{job_id}/result")

    events = (await job_events(settings, [job_id], t0))[job_id]
    assert [(e["stage"], e["status"]) for e in events] == EXPECTED
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) == [seq_of(st, status) for st, status in EXPECTED] == list(SUCCESS_SEQS)
    assert [e["progress"] for e in events if e["status"] == "completed"] == [
        PROGRESS[st] for st, status in EXPECTED if status == "completed"
    ]
    assert all(e["event_id"] == f"{job_id}:{e['seq']}" for e in events)
    done = events[-1]["result"]
    assert done["status"] == "completed"
    assert done["classification"]["middle_category"] == "clear_pet"
    assert "label_attached" in done["classification"]["situation_tags"]
    assert done["rules_key"] == "recyclable/clear_pet"
    assert done["reward"]["granted"] is True and done["reward"]["character_code"] == "char_pet"
    assert any("label" in step.lower() for step in done["answer"]["disposal_steps"])

    result, _ = await wait_result(api, job_id, f"user-{uid}", timeout_s=60, interval_s=0.2)
    assert result["job_id"] == job_id and result["status"] == "completed"
    assert result["reward"] == done["reward"]


def scan_to_the_end(settings: Settings, uid: str) -> str:
    """One scan through the real API, waited for until its events are all in Kafka; its job id."""

    async def one() -> str:
        async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as http:
            job_id = (await submit(http, img("glass_bottle-jar", uid), f"user-{uid}"))["job_id"]
            await job_events(settings, [job_id], since())
            return str(job_id)

    return asyncio.run(one())


def test_events_readable_with_kcat(settings: Settings, zero_latency_model: str, uid: str):
    """Every message is plain JSON keyed by job id, with a traceparent header, readable by kcat."""
    job_id = scan_to_the_end(settings, uid)
    out = subprocess.run(
        [
            "kcat",
            "-b",
            settings.kafka_bootstrap,
            "-C",
            "-t",
            EVENTS,
            "-p",
            str(shard_of(job_id)),
            "-o",
            "-400",
            "-e",
            "-q",
            "-f",
            "%k\t%h\t%s\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t", 2) for line in out.stdout.splitlines() if line.startswith(job_id)]
    events = [json.loads(r[2]) for r in rows]
    assert [(e["stage"], e["status"]) for e in events] == EXPECTED
    assert all(r[1].startswith("traceparent=00-") for r in rows)
    trace_ids = {r[1].split("-")[1] for r in rows}
    assert len(trace_ids) == 1, "every stage must continue the same trace"


def _batches(segment: Path) -> list[tuple[int, int]]:
    """(attributes, max timestamp) of every record batch (format v2) in a Kafka log segment."""
    data, out, pos = segment.read_bytes(), [], 0
    while pos + 61 <= len(data):
        (length,) = struct.unpack_from(">i", data, pos + 8)
        (attributes,) = struct.unpack_from(">h", data, pos + 21)
        (max_ts,) = struct.unpack_from(">q", data, pos + 35)
        out.append((attributes, max_ts))
        pos += 12 + length
    return out


def test_records_are_stored_compressed(settings: Settings, zero_latency_model: str, uid: str):
    """Issue 16: Kafka's logs at retention. Every batch the API and the stage workers wrote for a
    scan is stored zstd-compressed (codec 4 in the batch attributes); control batches (transaction
    markers) are never compressed."""
    from eco2.service import data_dir

    t0 = int(time.time() * 1000)

    job_id = scan_to_the_end(settings, uid)
    logs = data_dir(settings) / "kafka" / "logs"
    dirs = [logs / f"{EVENTS}-{shard_of(job_id)}"]
    dirs += [
        logs / f"{topic}-{partition_for(job_id, BY_NAME[topic].partitions)}"
        for topic in STAGE_TOPICS.values()
    ]
    for d in dirs:
        assert d.is_dir(), f"no log directory {d} (the local stack's single node keeps them here)"
        new = [(a, ts) for seg in sorted(d.glob("*.log")) for a, ts in _batches(seg) if ts >= t0]
        data = [a for a, _ in new if not a & 0x20]
        assert data, f"no batch written to {d.name} since the scan started"
        codecs = {a & 0x07 for a in data}
        assert codecs == {4}, f"{d.name}: batch codecs {codecs} (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd)"


async def test_every_rule_category_and_the_fallback(api: httpx.AsyncClient, settings: Settings, uid: str):
    t0 = since()
    user = f"user-{uid}"
    cases: dict[str, tuple[str | None, str | None]] = {}  # job -> (expected rules key, expected character)
    for major in rules.MAJOR_CATEGORIES:
        middles = rules.MIDDLE_CATEGORIES.get(major) or ()
        for middle in middles:
            job = (await submit(api, img(f"{middle}-item", uid), user))["job_id"]
            recyclable = major == "recyclable"
            cases[job] = (f"{major}/{middle}", rewards.character_for(middle).code if recyclable else None)
        job = (await submit(api, img(f"{major}-thing", uid), user))["job_id"]
        expected_key = rules.lookup({"major_category": major, "middle_category": "unknown"})
        char = rewards.character_for("unknown").code if major == "recyclable" else None
        cases[job] = (expected_key.key if expected_key else None, char if expected_key else None)
    # Nothing recognisable in the name: no rule, the fixed fallback answer, no reward.
    fallback_job = (await submit(api, img("mystery-object", uid), user))["job_id"]
    cases[fallback_job] = (None, None)

    events = await job_events(settings, list(cases), t0)
    for job, (key, character) in cases.items():
        result = events[job][-1]["result"]
        assert result["status"] == "completed", (job, result)
        assert result["rules_key"] == key, (key, result["classification"])
        assert result["reward"]["granted"] is (character is not None), (key, result["reward"])
        assert result["reward"]["character_code"] == character
    fallback = events[fallback_job][-1]["result"]
    assert fallback["answer"] == rules.fallback_answer()
    assert fallback["reward"]["reason"] == "not_recyclable"  # unclassified is not recyclable


async def test_reward_refused_when_the_answer_has_gaps(api: httpx.AsyncClient, settings: Settings, uid: str):
    t0 = since()
    job = (await submit(api, img("metal-can-gaps", uid), f"user-{uid}"))["job_id"]
    result = (await job_events(settings, [job], t0))[job][-1]["result"]
    assert result["rules_key"] == "recyclable/metal"
    assert result["answer"]["gaps"]
    assert result["reward"] == {
        "granted": False,
        "character_code": None,
        "character_name": None,
        "reason": "answer_has_gaps",
    }


async def test_transient_model_errors_are_retried(
    api: httpx.AsyncClient, settings: Settings, zero_latency_model: str, uid: str
):
    t0 = since()
    url = img("transient2-paper-box", uid)
    job = (await submit(api, url, f"user-{uid}"))["job_id"]
    events = (await job_events(settings, [job], t0))[job]
    assert events[-1]["stage"] == DONE
    assert events[-1]["result"]["status"] == "completed"
    stats = httpx.get(f"{zero_latency_model}/admin/stats").json()
    assert stats[f"classification:{url}"] == 3  # two 503s, then the answer
    assert stats[f"answer:{url}"] == 3


async def test_permanent_model_error_fails_the_job_with_a_dead_letter(
    api: httpx.AsyncClient, settings: Settings, uid: str
):
    t0 = since()
    user = f"user-{uid}"
    job = (await submit(api, img("permanent-vinyl", uid), user))["job_id"]
    events = (await job_events(settings, [job], t0))[job]
    last = events[-1]
    assert (last["stage"], last["status"], last["seq"]) == ("vision", "failed", FAILED_SEQ)
    assert "400" in last["error"]
    assert last["result"]["status"] == "failed" and last["result"]["failed_stage"] == "vision"
    assert not any(e["stage"] == DONE for e in events)

    letters = await dead_letters(settings, job, t0)
    assert letters and letters[0]["reason"] == "model_permanent_error"
    assert letters[0]["stage"] == "vision" and letters[0]["value"]["job_id"] == job

    result, _ = await wait_result(api, job, user, timeout_s=60, interval_s=0.2)
    assert result["status"] == "failed" and result["error"]


async def test_exhausted_retries_fail_the_job(api: httpx.AsyncClient, settings: Settings, uid: str):
    t0 = since()
    job = (await submit(api, img("transient9-paper", uid), f"user-{uid}"))["job_id"]
    events = (await job_events(settings, [job], t0))[job]
    assert events[-1]["status"] == "failed"
    assert (await dead_letters(settings, job, t0))[0]["reason"] == "model_retries_exhausted"


async def committed_offset(settings: Settings, topic: str, partition: int) -> int:
    """The stage workers' committed offset on one partition of a stage topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(stage_group(PIPELINE))
    finally:
        await admin.close()
    found = offsets.get(TopicPartition(topic, partition))
    return found.offset if found is not None else -1


async def wait_for_commit(settings: Settings, topic: str, p: int, done: Callable[[int], bool]) -> int:
    deadline = time.monotonic() + 30
    while not done(offset := await committed_offset(settings, topic, p)) and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
    return offset


async def test_a_slow_job_holds_its_partitions_commit(api: httpx.AsyncClient, settings: Settings, uid: str):
    """Jobs behind a slow one on its partition finish first; the committed offset must stay at the
    slow job while it is in flight (a worker killed then must get it again), and pass it after.
    Faust's own commit logic passed it (faust-streaming #606); see streams/commits.py."""
    t0 = since()
    user = f"user-{uid}"
    answer, parts = STAGE_TOPICS["answer"], BY_NAME[STAGE_TOPICS["answer"]].partitions
    slow = (await submit(api, img("paper-slow15", uid), user))["job_id"]  # its answer call: +15 s
    p = partition_for(slow, parts)
    msgs = await read_partition(settings, answer, p, t0, lambda ms: any(m.key == slow.encode() for m in ms))
    slow_offset = next(m.offset for m in msgs if m.key == slow.encode())

    behind: list[str] = []
    for i in range(400):  # about 12 POSTs per job that lands on the slow job's partition
        job = (await submit(api, img("paper-fast", f"{uid}-{i}"), user))["job_id"]
        if partition_for(job, parts) == p:
            behind.append(job)
            if len(behind) == 3:
                break
    assert len(behind) == 3
    await job_events(settings, behind, t0)  # all three done while the slow one is in its model call
    await asyncio.sleep(3)  # a few commit intervals (1 s)
    held = await committed_offset(settings, answer, p)  # -1: nothing committed yet (fresh topic)
    assert held <= slow_offset, f"committed {held} while offset {slow_offset} is still in flight"

    await job_events(settings, [slow], t0)
    assert await wait_for_commit(settings, answer, p, lambda o: o > slow_offset) > slow_offset


async def test_sigkill_worker_mid_flight_loses_no_job(settings: Settings, zero_latency_model: str, uid: str):
    """SIGKILL the stage workers while jobs are in flight; after a restart every job ends, and no
    seq appears twice with different content."""
    httpx.put(f"{zero_latency_model}/admin/latency", json={"min_s": 0.5, "max_s": 1.5}).raise_for_status()
    t0 = since()
    user = f"user-{uid}"
    try:
        async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as http:
            jobs = [
                (await submit(http, img(f"{m}-kill", f"{uid}-{i}"), user))["job_id"]
                for i, m in enumerate(rules.RECYCLABLE_MIDDLES * 2)
            ]
        await asyncio.sleep(1.5)  # let the workers pick them up
        pid = int((settings.local_dir / "run" / "workers.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
        # Start again once the broker has expired the dead member (session timeout 10 s): a new
        # member joining while the dead one is still listed once stalled the rejoin for minutes.
        await asyncio.sleep(12)
        eco2("stack", "up", "--only", "workers")
        events = await job_events(settings, jobs, t0, timeout_s=150)
    finally:
        httpx.put(f"{zero_latency_model}/admin/latency", json={"min_s": 0, "max_s": 0})
    for job in jobs:
        by_seq: dict[int, set[str]] = {}
        for e in events[job]:
            by_seq.setdefault(e["seq"], set()).add(json.dumps(e, sort_keys=True))
        assert all(len(v) == 1 for v in by_seq.values()), f"{job}: a seq with two contents"
        assert DONE_SEQ in by_seq, f"{job} never finished"
        assert sorted(by_seq) == [seq_of(st, status) for st, status in EXPECTED]


# --- the API's contract ------------------------------------------------------------------------


async def test_idempotency_key_under_concurrent_duplicates(api: httpx.AsyncClient, uid: str):
    user = f"user-{uid}"
    url = img("paper-idem", uid)
    answers = await asyncio.gather(*[submit(api, url, user, idempotency_key=f"k-{uid}") for _ in range(20)])
    assert len({a["job_id"] for a in answers}) == 1
    # Keys are per user: the same key from someone else is a different job.
    other = await submit(api, url, f"other-{uid}", idempotency_key=f"k-{uid}")
    assert other["job_id"] != answers[0]["job_id"]


async def test_only_the_owner_reads_a_result(api: httpx.AsyncClient, uid: str):
    job = (await submit(api, img("paper-owner", uid), f"owner-{uid}"))["job_id"]
    theirs = await api.get(f"/api/v1/scan/{job}/result", headers={"X-User-ID": f"thief-{uid}"})
    unknown = await api.get(f"/api/v1/scan/{uid}nope/result", headers={"X-User-ID": f"owner-{uid}"})
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == unknown.json()
    mine = await api.get(f"/api/v1/scan/{job}/result", headers={"X-User-ID": f"owner-{uid}"})
    assert mine.status_code in (200, 202)
    if mine.status_code == 202:
        assert mine.headers["Retry-After"] == "2"
        assert set(mine.json()) >= {"status", "current_stage", "progress"}
    no_user = await api.get(f"/api/v1/scan/{job}/result")
    assert no_user.status_code == 401 and no_user.json()["error"] == "unauthenticated"


@pytest.mark.parametrize(
    "body,code",
    [
        ({"image_url": "http://127.0.0.1/x.jpg"}, "image_url_internal"),
        ({"image_url": "http://localhost:8080/x.jpg"}, "image_url_internal"),
        ({"image_url": "http://10.1.2.3/x.jpg"}, "image_url_internal"),
        ({"image_url": "http://169.254.169.254/latest/meta-data"}, "image_url_internal"),
        ({"image_url": "http://[::1]/x.jpg"}, "image_url_internal"),
        ({"image_url": "http://2130706433/x.jpg"}, "image_url_internal"),
        ({"image_url": "http://metadata.google.internal/x"}, "image_url_internal"),
        ({"image_url": "ftp://images.example.com/x.jpg"}, "image_url_scheme"),
        ({"image_url": "https://images.example.com/" + "a" * 3000}, "image_url_too_long"),
        ({"image_url": "https://images.example.com/a.jpg", "user_input": "x" * 5000}, "user_input_too_long"),
        ({"image_url": "https://images.example.com/a.jpg", "model": "gpt-2"}, "unknown_model"),
        ({"user_input": "no url"}, "invalid_request"),
    ],
)
async def test_bad_input_is_a_clear_400(api: httpx.AsyncClient, body: dict[str, Any], code: str):
    resp = await api.post("/api/v1/scan", json=body, headers={"X-User-ID": "u"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == code
    if code == "unknown_model":
        assert "gpt-4o-mini" in resp.json()["message"]


async def test_missing_user_and_oversized_body(api: httpx.AsyncClient):
    resp = await api.post("/api/v1/scan", json={"image_url": "https://images.example.com/a.jpg"})
    assert resp.status_code == 401 and resp.json()["error"] == "unauthenticated"
    big = await api.post(
        "/api/v1/scan",
        content=json.dumps({"image_url": "https://images.example.com/a.jpg", "user_input": "x" * 40000}),
        headers={"X-User-ID": "u", "Content-Type": "application/json"},
    )
    assert big.status_code == 413 and big.json()["error"] == "body_too_large"


async def test_categories_health_ready_docs(api: httpx.AsyncClient):
    cats = (await api.get("/api/v1/scan/categories")).json()["categories"]
    assert [c["major"] for c in cats] == list(rules.MAJOR_CATEGORIES)
    assert (await api.get("/health")).status_code == 200
    ready = await api.get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": True, "kafka": True}
    assert "/api/v1/scan" in (await api.get("/openapi.json")).json()["paths"]


def test_allow_list_setting(uid: str):
    """With an allow-list, only listed hosts (and their subdomains) pass."""
    from contract.settings import Settings
    from producers.validation import InvalidInput, check_image_url

    s = Settings(image_host_allowlist=["cdn.eco2.app"])
    assert check_image_url("https://cdn.eco2.app/a.jpg", s)
    assert check_image_url("https://img.cdn.eco2.app/a.jpg", s)
    with pytest.raises(InvalidInput):
        check_image_url("https://evil.example.com/a.jpg", s)
    with pytest.raises(InvalidInput):
        check_image_url("https://cdn.eco2.app.evil.com/a.jpg", s)


async def test_overlap_check_sees_every_other_live_stage_group(settings: Settings, stack_status, uid: str):
    """Two other live groups running `rule` are both reported (a DescribeGroups request for
    several groups failed to decode with aiokafka 0.14 and Kafka 4: the check silently saw none)."""
    from aiokafka import AIOKafkaConsumer

    from streams.groups import overlapping_groups

    names = [f"eco2-stage-rule-t{uid}{k}" for k in "ab"]
    # Members are what the check counts, not the topic: a quiet one, read from its end.
    consumers = [
        AIOKafkaConsumer("scan.persistence.dlq", bootstrap_servers=settings.kafka_bootstrap, group_id=name)
        for name in names
    ]
    try:
        for c in consumers:
            await c.start()
        deadline = time.monotonic() + 60
        while not all(c.assignment() for c in consumers):  # joined: members of live groups
            assert time.monotonic() < deadline, "test consumers never got their partitions"
            await asyncio.sleep(0.2)
        found = await overlapping_groups(settings, ["rule"])  # the stack's own worker group too
        assert set(names) <= set(found), found
    finally:
        for c in consumers:
            await c.stop()


def test_worker_runs_a_subset_of_stages():
    """`--stages` picks agents; unknown stage names are refused with a clear message."""
    out = subprocess.run(
        [sys.executable, "-m", "streams", "worker", "--stages", "vision,bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode != 0 and "unknown stages ['bogus']" in out.stderr
