"""`eco2 state ...`: operate on the Redis state derived from the Kafka log."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from contract.settings import get_settings

state_app = typer.Typer(help="Redis job state (a cache of scan.events).")


@state_app.command("rebuild")
def state_rebuild(
    batch: Annotated[int, typer.Option("--batch", help="events per Redis round trip")] = 500,
) -> None:
    """Rebuild every job's state and history from scan.events (idempotent; safe while running)."""
    from view.rebuild import rebuild

    try:
        asyncio.run(rebuild(get_settings(), typer.echo, batch=batch))
    except Exception as exc:
        typer.secho(f"rebuild failed: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from exc
