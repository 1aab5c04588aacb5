"""`eco2 db`: the Postgres schema (versioned migrations in persistence/migrations)."""

from __future__ import annotations

import asyncio

import typer

from contract.settings import get_settings

db_app = typer.Typer(help="Postgres schema: versioned migrations (persistence/migrations/NNNN_*.sql).")


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply the migrations not applied yet (recorded in schema_migrations); safe to repeat."""
    import asyncpg

    from persistence.migrate import applied_versions, migrate

    async def run() -> tuple[list[str], list[str]]:
        conn = await asyncpg.connect(get_settings().postgres_dsn, timeout=10)
        try:
            return await migrate(conn), await applied_versions(conn)
        finally:
            await conn.close()

    try:
        new, every = asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        typer.secho(f"migration failed: {type(exc).__name__}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
    for label in new:
        typer.echo(f"applied {label}")
    typer.echo(f"schema at {every[-1] if every else 'nothing'} ({len(every)} migrations applied)")
