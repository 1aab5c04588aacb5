"""The schema version every record carries, and the one rule for reading a record of another version.

A rollout runs version N and N+1 of a component side by side for minutes, so every Kafka record
(jobs on the stage topics, events on scan.events, dead letters) and every Redis view entry (the
state hash, each history entry) says which schema wrote it: `v`, "MAJOR.MINOR".

The rule (also in the AsyncAPI document, `RULE`):
- A minor version only adds optional fields. It never removes, renames or retypes one, and never
  changes what an existing field means. So a reader accepts every minor of its major (in a rollout
  it meets the previous and the next one), ignores the fields it does not know, and passes them on
  unchanged when it re-emits the record (the models keep them: `extra="allow"`).
- A record without `v` was written before versions were stamped: it is 1.0 (1.1 only added `v`),
  read like any other 1.x record.
- A different major is a record the reader truly cannot read: the stage workers and the writer
  dead-letter it (reason `unknown_version`), the router and the gateway skip it (logged, counted).
  A major change therefore ships on new topics and Redis keys, never mixed into the old ones.
- Whoever writes a record stamps its own version (`SCHEMA_VERSION`, the models' default); a copy
  kept as it is (the router's history entry of an event, its state hash) keeps the event's `v`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = "1.2"  # 1.1 added `v` itself (and the pass-through of unknown fields); 1.2 `attempt`
LEGACY_VERSION = "1.0"  # what a record without `v` is
FIELD = "v"
PATTERN = r"^[0-9]+\.[0-9]+$"
_RE = re.compile(PATTERN)

RULE = (
    f"Every record and Redis view entry carries `{FIELD}`, its schema version MAJOR.MINOR "
    f"(now {SCHEMA_VERSION}); a record without it is {LEGACY_VERSION}. A minor version only adds "
    "optional fields: readers accept every minor of their major (the previous and the next during a "
    "rollout), ignore unknown fields and pass them on unchanged. A different major cannot be read: "
    "stage workers and the writer dead-letter it with reason `unknown_version`, the router and the "
    "gateway skip it; a major change ships on new topics and keys. Writers stamp their own version; "
    "the router's view entries (history entry, state hash field `v`) keep the event's."
)


class UnknownVersion(ValueError):
    """A record of a major version this reader does not know (or a malformed `v`)."""


def parse(v: str) -> tuple[int, int]:
    """(major, minor) of a version string; UnknownVersion when it is not MAJOR.MINOR."""
    if not isinstance(v, str) or not _RE.match(v):
        raise UnknownVersion(f"schema version {v!r} is not MAJOR.MINOR")
    major, minor = v.split(".")
    return int(major), int(minor)


MAJOR, MINOR = parse(SCHEMA_VERSION)


def check(v: str | None) -> str:
    """`v` itself when this reader can read it (missing: 1.0), else UnknownVersion.

    A version once found readable is remembered (up to 64): the gateway checks every event it
    parses, and the regex per event showed in its profile (issue 23)."""
    v = LEGACY_VERSION if v is None else v
    if isinstance(v, str) and v in _READABLE:
        return v
    major, _ = parse(v)
    if major != MAJOR:
        raise UnknownVersion(f"schema version {v} has major {major}; this reader reads {MAJOR}.x")
    if len(_READABLE) < 64:
        _READABLE.add(v)
    return v


_READABLE: set[str] = set()  # versions `check` found readable


def readable(value: Any) -> bool:
    """Can this reader read a decoded record (a dict; anything else has no version to judge)?"""
    if not isinstance(value, dict):
        return True
    try:
        check(value.get(FIELD))
    except UnknownVersion:
        return False
    return True


def extras(record: BaseModel, into: type[BaseModel]) -> dict[str, Any]:
    """The unknown fields of `record` that `into` does not declare itself: what a newer version
    added, to carry over when a record is built from another (a job's findings into its result)."""
    return {k: x for k, x in (record.model_extra or {}).items() if k not in into.model_fields}


class Versioned(BaseModel):
    """Base of every record model: the version stamp, and unknown fields kept (passed on)."""

    model_config = ConfigDict(extra="allow")

    v: str = Field(
        default=SCHEMA_VERSION,
        pattern=PATTERN,
        description=f"schema version MAJOR.MINOR of the writer (absent: {LEGACY_VERSION}); see the rule "
        "in the document's description",
    )

    @field_validator(FIELD)
    @classmethod
    def _known_major(cls, v: str) -> str:
        return check(v)
