"""The Postgres side: write a batch of results in one statement, read one result back.

A batch is one INSERT ... SELECT FROM unnest(...) per table, both in a single statement (one round
trip, atomic without an explicit transaction). Idempotent: a job's row is never changed once
written (ON CONFLICT DO NOTHING) and an ownership row keeps the earliest granting scan, so replaying
any events, in any order, leaves the tables as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from contract import versioning
from contract.events import ScanResult

from .records import Ownership, ownership_of

# Error classes that mean "this row is wrong" (data exception, integrity constraint, program
# limit such as a too large value): the record is isolated and, failing again, dead-lettered.
# Any other error (connection, shutdown, timeout, lock, missing table...) holds the writer.
DATA_ERROR_CLASSES = ("22", "23", "54")

_JSON_COLUMNS = ("classification", "rules", "answer", "reward", "timings")

WRITE_SQL = """
WITH s AS (
  INSERT INTO scans (job_id, user_id, status, image_url, classification, rules_key, rules, answer,
                     reward, error, failed_stage, timings, created_at, finished_at, v, extra)
  SELECT job_id, user_id, status, image_url, classification::jsonb, rules_key, rules::jsonb,
         answer::jsonb, reward::jsonb, error, failed_stage, timings::jsonb,
         to_timestamp(created_at), to_timestamp(finished_at), v, extra::jsonb
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
              $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::float8[], $14::float8[],
              $19::text[], $20::text[])
       AS t(job_id, user_id, status, image_url, classification, rules_key, rules, answer, reward,
            error, failed_stage, timings, created_at, finished_at, v, extra)
  ON CONFLICT (job_id) DO NOTHING
  RETURNING 1
), o AS (
  INSERT INTO character_ownership AS c (user_id, character_code, job_id, acquired_at)
  SELECT user_id, character_code, job_id, to_timestamp(acquired_at)
  FROM unnest($15::text[], $16::text[], $17::text[], $18::float8[])
       AS t(user_id, character_code, job_id, acquired_at)
  ON CONFLICT (user_id, character_code) DO UPDATE
     SET job_id = EXCLUDED.job_id, acquired_at = EXCLUDED.acquired_at
     WHERE (EXCLUDED.acquired_at, EXCLUDED.job_id) < (c.acquired_at, c.job_id)
  RETURNING 1
)
SELECT (SELECT count(*) FROM s) AS scans, (SELECT count(*) FROM o) AS ownership
"""

FETCH_SQL = """
SELECT job_id, user_id, status, image_url, classification::text, rules_key, rules::text,
       answer::text, reward::text, error, failed_stage, timings::text, created_at, finished_at,
       v, extra::text
FROM scans WHERE job_id = $1
"""


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


def batch_args(results: Sequence[ScanResult]) -> list[list[Any]]:
    """The 20 array arguments of WRITE_SQL; duplicates inside the batch are resolved here because
    one statement may not touch the same ownership row twice."""
    scans: dict[str, ScanResult] = {}
    for r in results:
        scans.setdefault(r.job_id, r)  # the first terminal event of a job wins, as in the table
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
        [r.job_id for r in rows],
        [r.user_id for r in rows],
        [r.status for r in rows],
        [r.image_url for r in rows],
        [_json(r.classification) for r in rows],
        [r.rules_key for r in rows],
        [_json(r.rules) for r in rows],
        [_json(r.answer) for r in rows],
        [_json(r.reward) for r in rows],
        [r.error for r in rows],
        [r.failed_stage for r in rows],
        [_json(r.timings) for r in rows],
        [r.created_at for r in rows],
        [r.finished_at for r in rows],
        [o.user_id for o in own],
        [o.character_code for o in own],
        [o.job_id for o in own],
        [o.acquired_at for o in own],
        [r.v for r in rows],
        [_json(r.model_extra) if r.model_extra else None for r in rows],  # a newer version's fields
    ]


async def write_batch(db: asyncpg.Pool | asyncpg.Connection, results: Sequence[ScanResult]) -> Written:
    """Store a batch of results in one statement (all or nothing)."""
    if not results:
        return Written(0, 0)
    row = await db.fetchrow(WRITE_SQL, *batch_args(results))
    assert row is not None
    return Written(row["scans"], row["ownership"])


async def fetch_result(db: asyncpg.Pool | asyncpg.Connection, job_id: str) -> dict[str, Any] | None:
    """The stored result of a finished job, shaped like ScanResult (user_id included), or None.

    The scan API's fallback for `GET /api/v1/scan/{job_id}/result` once Redis has expired it.
    """
    row = await db.fetchrow(FETCH_SQL, job_id)
    if row is None:
        return None
    out: dict[str, Any] = dict(row)
    for col in _JSON_COLUMNS:
        out[col] = json.loads(out[col]) if out[col] is not None else None
    out["timings"] = out["timings"] or {}
    out["v"] = out["v"] or versioning.LEGACY_VERSION
    extra = out.pop("extra")
    if extra is not None:  # a newer version's fields, as the result carried them
        out = {**json.loads(extra), **out}
    for col in ("created_at", "finished_at"):
        out[col] = _epoch(out[col])
    return out


def _epoch(ts: datetime) -> float:
    return round(ts.timestamp(), 6)
