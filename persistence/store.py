"""The Postgres side: write a batch of results in one statement, read one result back.

The columns of `scans` are derived: the job's identity, then one per field of each stage's output
model (streams/agents.py), then how it ended; so is the SQL. A batch is one INSERT ... SELECT FROM
unnest(...) per table, both in a single statement (one round
trip, atomic without an explicit transaction). Idempotent: a job's row changes only when a later
attempt of a failed job (a re-drive, `eco2 dlq replay`) ends, never back (`supersedes`), and an
ownership row keeps the earliest granting scan, so replaying any events, in any order, leaves the
tables as they are.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from contract import versioning
from contract.events import ScanResult
from streams import registry

from .records import Ownership, ownership_of

# Error classes that mean "this row is wrong" (data exception, integrity constraint, program
# limit such as a too large value): the record is isolated and, failing again, dead-lettered.
# Any other error (connection, shutdown, timeout, lock, missing table...) holds the writer.
DATA_ERROR_CLASSES = ("22", "23", "54")
EXTRA = "extra"  # the column of the fields no other column holds

@dataclass(frozen=True)
class Column:
    name: str
    kind: Literal["text", "jsonb", "timestamptz", "integer"]

    @property
    def array(self) -> str:  # the unnest() argument type of the column
        return {"timestamptz": "float8[]", "integer": "int4[]"}.get(self.kind, "text[]")

    @property
    def select(self) -> str:  # the value stored, from the unnest() column
        if self.kind == "timestamptz":
            return f"to_timestamp({self.name})"
        return f"{self.name}::jsonb" if self.kind == "jsonb" else self.name


def _stage_columns() -> list[Column]:
    """A column per field of every stage's output model (streams/agents.py), in pipeline order."""
    registry.load()
    fields = registry.output_fields()
    return [Column(name, "text" if registry.is_text(t) else "jsonb") for name, t in fields.items()]


@functools.cache
def columns() -> tuple[Column, ...]:
    """The scans table's columns: the job's identity, each stage's outputs, how the job ended."""
    head = [Column("job_id", "text"), Column("user_id", "text"), Column("status", "text"),
            Column("image_url", "text")]
    tail = [Column("error", "text"), Column("failed_stage", "text"), Column("timings", "jsonb"),
            Column("created_at", "timestamptz"), Column("finished_at", "timestamptz"),
            # The schema version of the result and the fields of a newer version this writer does
            # not know (contract/versioning.py; migration 0003): kept, not dropped, in a rollout.
            Column("v", "text"), Column(EXTRA, "jsonb"),
            # Which attempt ended so (migration 0004): a later attempt replaces a failure.
            Column("attempt", "integer")]
    return (*head, *_stage_columns(), *tail)


def stage_column_ddl() -> dict[str, str]:
    """The additive migration of the stage columns (persistence/migrate.py runs it after the SQL
    files): a stage added to the pipeline gets its columns, existing rows keep theirs (NULL)."""
    return {c.name: f"ALTER TABLE scans ADD COLUMN IF NOT EXISTS {c.name} {c.kind}" for c in _stage_columns()}


@functools.cache
def write_sql() -> str:
    """One statement: INSERT ... SELECT FROM unnest(...) into scans and character_ownership."""
    cols = columns()
    n = len(cols)
    names = ", ".join(c.name for c in cols)
    arrays = ", ".join(f"${i}::{c.array}" for i, c in enumerate(cols, 1))
    updates = ", ".join(f"{c.name} = EXCLUDED.{c.name}" for c in cols if c.name != "job_id")
    own = ", ".join(f"${n + i}::{t}" for i, t in enumerate(("text[]", "text[]", "text[]", "float8[]"), 1))
    return f"""
WITH s AS (
  INSERT INTO scans ({names})
  SELECT {", ".join(c.select for c in cols)}
  FROM unnest({arrays}) AS t({names})
  ON CONFLICT (job_id) DO UPDATE SET {updates}
     WHERE scans.status = 'failed' AND EXCLUDED.attempt > scans.attempt
  RETURNING 1
), o AS (
  INSERT INTO character_ownership AS c (user_id, character_code, job_id, acquired_at)
  SELECT user_id, character_code, job_id, to_timestamp(acquired_at)
  FROM unnest({own}) AS t(user_id, character_code, job_id, acquired_at)
  ON CONFLICT (user_id, character_code) DO UPDATE
     SET job_id = EXCLUDED.job_id, acquired_at = EXCLUDED.acquired_at
     WHERE (EXCLUDED.acquired_at, EXCLUDED.job_id) < (c.acquired_at, c.job_id)
  RETURNING 1
)
SELECT (SELECT count(*) FROM s) AS scans, (SELECT count(*) FROM o) AS ownership
"""


@functools.cache
def fetch_sql() -> str:
    cols = ", ".join(f"{c.name}::text" if c.kind == "jsonb" else c.name for c in columns())
    return f"SELECT {cols} FROM scans WHERE job_id = $1"


@dataclass(frozen=True)
class Written:
    scans: int  # new scan rows
    ownership: int  # ownership rows created or moved to an earlier scan


def is_data_error(exc: BaseException) -> bool:
    """True when Postgres (or asyncpg encoding the arguments) rejected the data itself."""
    state = getattr(exc, "sqlstate", None)
    if not isinstance(exc, asyncpg.PostgresError) or not isinstance(state, str):
        return False
    return state[:2] in DATA_ERROR_CLASSES


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _arg(r: ScanResult, c: Column) -> Any:
    """One result's value for column `c` (a stage output the job never got is NULL)."""
    if c.name == EXTRA:  # what no column holds: a newer version's fields
        known = {col.name for col in columns()}
        rest = {k: v for k, v in (r.model_extra or {}).items() if k not in known}
        return _json(rest) if rest else None
    value = getattr(r, c.name, None)
    return _json(value) if c.kind == "jsonb" else value


def batch_args(results: Sequence[ScanResult]) -> list[list[Any]]:
    """The array arguments of `write_sql()` (one per column, then the 4 of ownership); duplicates
    inside the batch are resolved here because one statement may not touch the same ownership row twice."""
    scans: dict[str, ScanResult] = {}
    for r in results:  # one row per job, chosen as the table would keep it
        kept = scans.get(r.job_id)
        if kept is None or supersedes(r, kept):
            scans[r.job_id] = r
    owned: dict[tuple[str, str], Ownership] = {}
    for r in scans.values():
        o = ownership_of(r)
        if o is None:
            continue
        cur = owned.get((o.user_id, o.character_code))
        if cur is None or (o.acquired_at, o.job_id) < (cur.acquired_at, cur.job_id):
            owned[(o.user_id, o.character_code)] = o
    rows = list(scans.values())
    own = list(owned.values())
    return [
        *([_arg(r, c) for r in rows] for c in columns()),
        [o.user_id for o in own],
        [o.character_code for o in own],
        [o.job_id for o in own],
        [o.acquired_at for o in own],
    ]


def supersedes(new: ScanResult, old: ScanResult) -> bool:
    """Does `new` replace the stored `old`? Only a later attempt's outcome replaces a failure
    (the ON CONFLICT rule of `write_sql`); a repeat of the same attempt never changes a row."""
    return old.status == "failed" and new.attempt > old.attempt


async def write_batch(db: asyncpg.Pool | asyncpg.Connection, results: Sequence[ScanResult]) -> Written:
    """Store a batch of results in one statement (all or nothing)."""
    if not results:
        return Written(0, 0)
    row = await db.fetchrow(write_sql(), *batch_args(results))
    assert row is not None
    return Written(row["scans"], row["ownership"])


async def fetch_result(db: asyncpg.Pool | asyncpg.Connection, job_id: str) -> dict[str, Any] | None:
    """The stored result of a finished job, shaped like ScanResult (user_id included), or None.

    The scan API's fallback for `GET /api/v1/scan/{job_id}/result` once Redis has expired it.
    """
    row = await db.fetchrow(fetch_sql(), job_id)
    if row is None:
        return None
    out: dict[str, Any] = dict(row)
    for c in columns():
        if c.kind == "jsonb":
            out[c.name] = json.loads(out[c.name]) if out[c.name] is not None else None
        elif c.kind == "timestamptz":
            out[c.name] = _epoch(out[c.name])
    out["timings"] = out["timings"] or {}
    out["v"] = out["v"] or versioning.LEGACY_VERSION
    extra = out.pop("extra")
    if extra is not None:  # a newer version's fields, as the result carried them
        out = {**extra, **out}
    return out


def _epoch(ts: datetime) -> float:
    return round(ts.timestamp(), 6)
