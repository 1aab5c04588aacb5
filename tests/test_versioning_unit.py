"""The version rule (contract/versioning.py) and each consumer's reading of records shaped as the
previous and the next minor, and as an unknown major. Pure functions, no stack."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from contract import versioning
from contract.events import DeadLetter, ScanEvent, ScanJob
from gateway.hub import UNREADABLE, history_items
from persistence import records
from streams import router
from streams.stages import result_of

from .gateway_support import full_events, job
from .versions import MAJOR, NEW_FIELDS, NEW_STAGE_RESULT, NEXT, PREVIOUS, READABLE, encode, shaped


@pytest.mark.parametrize(
    "v", [None, versioning.LEGACY_VERSION, PREVIOUS, versioning.SCHEMA_VERSION, NEXT, "1.9"]
)
def test_every_minor_of_the_major_is_readable(v: str | None) -> None:
    assert versioning.check(v) == (v or versioning.LEGACY_VERSION)
    assert versioning.readable({} if v is None else {"v": v})


@pytest.mark.parametrize("v", [MAJOR, "0.9", "1", "1.x", "", 1.1, 2])
def test_another_major_or_a_malformed_version_is_not(v: Any) -> None:
    with pytest.raises(versioning.UnknownVersion):
        versioning.check(v)
    assert not versioning.readable({"v": v})


def test_models_stamp_this_version_and_keep_unknown_fields() -> None:
    j = job("u1")
    assert j.v == versioning.SCHEMA_VERSION
    raw = shaped(j.model_dump(), "next", finding=True)
    again = ScanJob.model_validate_json(encode(raw))
    assert again.v == NEXT
    dumped = json.loads(again.model_dump_json())
    assert {**NEW_FIELDS, **NEW_STAGE_RESULT}.items() <= dumped.items()  # passed on unchanged
    legacy = ScanJob.model_validate_json(encode(shaped(j.model_dump(), "legacy")))
    assert legacy.model_dump(exclude={"v"}) == j.model_dump(exclude={"v"})
    for model, record in ((ScanJob, j.model_dump()), (ScanEvent, full_events(j)[-1].model_dump())):
        with pytest.raises(ValidationError, match="major"):
            model.model_validate_json(encode(shaped(record, "major")))


def test_result_of_carries_a_newer_stage_result_on() -> None:
    j = ScanJob.model_validate(shaped(job("u1").model_dump(), "next", finding=True))
    result = result_of(j, "completed")
    assert result.model_dump()["recycling_score"] == NEW_STAGE_RESULT["recycling_score"]
    assert result.model_dump()["region"] == NEW_FIELDS["region"]
    assert result.v == versioning.SCHEMA_VERSION  # the writer stamps its own version


@pytest.mark.parametrize("shape", READABLE)
def test_writer_stores_previous_and_next_minor(shape: str) -> None:
    events = full_events(job("u1"))
    for ev in events[:-1]:
        assert records.parse(encode(shaped(ev.model_dump(), shape))) is None  # not terminal: skipped
    terminal = shaped(events[-1].model_dump(), shape)
    out = records.parse(encode(terminal))
    assert not isinstance(out, records.Bad), out
    assert out is not None and out.job_id == events[-1].job_id and out.status == "completed"
    assert out.reward == events[-1].result["reward"]  # type: ignore[index]


@pytest.mark.parametrize("which", [0, -1])
def test_writer_dead_letters_only_an_unknown_major(which: int) -> None:
    """Terminal or not: a record of another major cannot be read at all, so it is a dead letter."""
    ev = full_events(job("u1"))[which]
    out = records.parse(encode(shaped(ev.model_dump(), "major")))
    assert isinstance(out, records.Bad) and out.reason == "unknown_version"
    assert out.value["job_id"] == ev.job_id  # the letter keeps the record as it was


def _faust_events(raws: list[bytes]) -> list[Any]:
    msg = SimpleNamespace(topic="scan.events", partition=0, offset=0)
    return [SimpleNamespace(value=r, headers={}, message=msg) for r in raws]


def test_router_parses_previous_and_next_minor_and_skips_an_unknown_major() -> None:
    events = full_events(job("u1"))
    raws = [encode(shaped(ev.model_dump(), shape)) for shape in READABLE for ev in events]
    major = [encode(shaped(ev.model_dump(), "major")) for ev in events[:2]]
    before = router.INVALID._value.get()
    parsed = router.parse(_faust_events(raws + major))
    assert len(parsed) == len(raws)
    assert router.INVALID._value.get() - before == len(major)
    nxt = [p for p in parsed if p.v == NEXT]
    assert len(nxt) == len(events)
    stored = json.loads(nxt[-1].model_dump_json())  # what the router writes into the history
    assert NEW_FIELDS.items() <= stored.items()
    assert NEW_STAGE_RESULT.items() <= stored["result"].items()


def test_gateway_history_serves_other_minors_as_stored_and_skips_an_unknown_major() -> None:
    events = full_events(job("u1"))
    raws = [json.dumps(shaped(ev.model_dump(), "next")) for ev in events]
    raws += [json.dumps(shaped(ev.model_dump(), "legacy")) for ev in events]
    before = UNREADABLE._value.get()
    items = history_items([*raws, json.dumps(shaped(events[0].model_dump(), "major"))])
    assert [i.data for i in items] == raws  # byte for byte: the client gets the newer fields too
    assert [i.seq for i in items] == [e.seq for e in events] * 2
    assert UNREADABLE._value.get() - before == 1


def test_dead_letters_are_versioned_too() -> None:
    letter = DeadLetter(source="writer", topic="scan.events", key="k", value={}, reason="r", error="e")
    assert json.loads(letter.model_dump_json())["v"] == versioning.SCHEMA_VERSION
    nxt = DeadLetter.model_validate(shaped(letter.model_dump(), "next"))
    assert nxt.v == NEXT
