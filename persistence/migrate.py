"""Versioned schema migrations: `migrations/NNNN_name.sql`, applied once each, in order.

`schema_migrations` records what is applied. Everything runs in one transaction under an advisory
lock, so `eco2 stack up`, `eco2 db migrate` and writer start-up may all migrate at once safely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from contract.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
_LOCK = 0x65636F32  # "eco2": the advisory lock id serialising migrators


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def label(self) -> str:
        return f"{self.version}_{self.name}"


def migrations() -> list[Migration]:
    found = []
    for path in MIGRATIONS_DIR.iterdir():
        m = _NAME.match(path.name)
        if m:
            found.append(Migration(m.group(1), m.group(2), path))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version in {MIGRATIONS_DIR}: {versions}")
    return found


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations not applied yet; returns their labels (empty when up to date)."""
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for mig in migrations():
            if mig.version in done:
                continue
            await conn.execute(mig.path.read_text())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", mig.version, mig.name
            )
            applied.append(mig.label)
        # The stage output columns (persistence/store.py): derived, additive, idempotent.
        # Only the missing ones: ALTER TABLE locks the table even when it changes nothing.
        from .store import stage_column_ddl

        have = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'scans'"
            )
        }
        for column, ddl in stage_column_ddl().items():
            if column not in have:
                await conn.execute(ddl)
    return applied


async def applied_versions(conn: asyncpg.Connection) -> list[str]:
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return []
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return [f"{r['version']}_{r['name']}" for r in rows]


async def migrate_dsn(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def after_postgres(s: Settings) -> None:
    """The `eco2 stack up` hook (eco2/services.py hands it to `infra.postgres`): migrate once it is up."""
    applied = await migrate_dsn(s.postgres_dsn)
    if applied:
        print(f"  applied migrations: {', '.join(applied)}", flush=True)
