"""What the stage engine's cheaper paths (issue 19) must keep: the stamped job equal to the one a
full re-validation built, events equal to validated ones, W3C trace ids, the health watcher's
positions read in one hop to the consumer thread. No stack."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from contract import trace, versioning
from contract.events import PIPELINE, ScanEvent, ScanJob, make_event
from streams.stages import Pipeline, result_of
from streams.watch import _positions


def _job(**extra: Any) -> ScanJob:
    return ScanJob.model_validate(
        {"job_id": "j-1", "user_id": "u", "image_url": "https://img.example/a.jpg", "created_at": 1.5,
         "v": "1.1", "timings": {"vision": 1.0}, **extra}
    )


def _validated(job: ScanJob, found: dict[str, Any]) -> ScanJob:
    """What `stamp` built before issue 19: a dump of the job re-validated with the output."""
    return ScanJob.model_validate({**job.model_dump(), **found, versioning.FIELD: versioning.SCHEMA_VERSION})


def test_stamp_equals_a_full_revalidation_with_extras_and_a_newer_stages_output() -> None:
    job = _job(from_the_future={"kept": [1, 2]})  # a newer minor's field rides along
    found = {"rules_key": "pet", "rules": {"steps": ["rinse"]}, "newer_stage_output": {"x": 1}}
    out = Pipeline.stamp(job, found)
    assert out.model_dump_json() == _validated(job, found).model_dump_json()
    assert out.v == versioning.SCHEMA_VERSION and job.v == "1.1"  # the input is left as it was
    assert out.model_extra == {"from_the_future": {"kept": [1, 2]}, "newer_stage_output": {"x": 1}}
    assert Pipeline.stamp(job).model_dump_json() == _validated(job, {}).model_dump_json()


def test_a_stamped_jobs_timings_are_its_own() -> None:
    job = _job()
    out = Pipeline.stamp(job, {})
    out.timings[PIPELINE[1]] = 0.25  # what the engine does after the stage ran
    assert job.timings == {"vision": 1.0}
    assert ScanJob.model_validate_json(out.model_dump_json()).timings == {"vision": 1.0, PIPELINE[1]: 0.25}


def test_events_built_without_validation_equal_validated_ones() -> None:
    job = _job(attempt=1, classification={"major_category": "plastic"})
    result = result_of(job, "completed")
    for stage, status, kw in [
        (PIPELINE[0], "started", {}),
        (PIPELINE[0], "completed", {}),
        ("done", "completed", {"result": result}),
        (PIPELINE[1], "failed", {"result": result, "error": "boom"}),
    ]:
        event = make_event(job, stage, status, **kw)  # type: ignore[arg-type]
        again = ScanEvent.model_validate_json(event.model_dump_json())
        assert again.model_dump_json() == event.model_dump_json()
        assert again.v == versioning.SCHEMA_VERSION and again.attempt == 1
        assert json.loads(event.model_dump_json())["event_id"] == f"j-1:{again.seq}"


def test_trace_ids_are_w3c_and_a_child_keeps_its_trace() -> None:
    pattern = re.compile(trace.PATTERN)
    parents = {trace.new_traceparent() for _ in range(200)}
    assert len(parents) == 200 and all(pattern.match(p) for p in parents)
    parent = parents.pop()
    children = {trace.child_of(parent) for _ in range(200)}
    assert len(children) == 200
    for child in children:
        assert pattern.match(child) and trace.trace_id(child) == trace.trace_id(parent)
        assert child.split("-")[2] != "0" * 16
    assert pattern.match(trace.child_of("garbage"))  # an invalid parent starts a new trace


class _Kafka:
    async def position(self, tp: str) -> int:
        return {"a": 1, "b": 2}[tp]


class _Thread:
    def __init__(self) -> None:
        self.hops = 0

    def _ensure_consumer(self) -> _Kafka:
        return _Kafka()

    async def call_thread(self, fn: Any, *args: Any) -> Any:
        self.hops += 1
        return await fn(*args)


def test_the_health_watcher_reads_every_position_in_one_hop() -> None:
    thread = _Thread()

    class Consumer:
        _thread = thread

    assert asyncio.run(_positions(Consumer(), frozenset({"a", "b"}))) == {"a": 1, "b": 2}
    assert thread.hops == 1


def test_partitions_stay_kafkas_murmur2_with_the_cache() -> None:
    from aiokafka.partitioner import murmur2

    from contract.topics import partition_for

    keys = [f"job-{n}" for n in range(300)] + ["", "é-ünïcode"]
    for _ in range(2):  # misses, then hits
        for key in keys:
            for n in (4, 12):
                assert partition_for(key, n) == (murmur2(key.encode()) & 0x7FFFFFFF) % n


def test_the_start_up_heap_is_frozen_out_of_full_collections() -> None:
    import gc

    from streams.__main__ import freeze_startup_heap

    gc.unfreeze()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000  # the modules, models and clients loaded so far
    finally:
        gc.unfreeze()


def test_the_workers_monitor_keeps_only_what_faust_reads(tmp_path: Any) -> None:
    """streams/monitor.py: a worker's Faust app gets `InboundOnly`, which records when each
    partition's stream last took an event (Faust's slow-processing check reads it) and none of
    the Monitor's per-event statistics."""
    from faust.types import TP

    from contract.settings import Settings
    from streams.app import create_app
    from streams.monitor import InboundOnly

    s = Settings().model_copy(update={"local_dir": tmp_path})
    app = create_app("unit-monitor", s, monitor=InboundOnly)
    default = create_app("unit-monitor-default", s)
    monitor, faust_own = app.monitor, default.monitor
    assert isinstance(monitor, InboundOnly) and type(faust_own) is not InboundOnly
    tp = TP("scan.vision", 3)

    class Owner:
        pass

    class Stream:
        task_owner = Owner()

    class Message:
        time_in = None

    for m in (monitor, faust_own):
        m.on_message_in(tp, 5, Message())  # type: ignore[arg-type]
        state = m.on_stream_event_in(tp, 5, Stream(), object())  # type: ignore[arg-type]
        m.on_stream_event_out(tp, 5, Stream(), object(), state)  # type: ignore[arg-type]
        m.on_message_out(tp, 5, Message())  # type: ignore[arg-type]
        assert tp in m.stream_inbound_time  # what Faust's verify_event_path reads
    assert faust_own.events_total == 1 and faust_own.messages_received_total == 1  # the test can tell
    assert monitor.events_total == 0 and monitor.messages_received_total == 0
    assert monitor.messages_active == 0 and not monitor.events_runtime
