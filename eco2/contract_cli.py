"""`eco2 contract`: write the published contracts (two OpenAPI documents, one AsyncAPI) to docs/contracts/.

They are generated from the code and contract/ with default settings only, so a checkout's
`.eco2.env` or environment never changes them; `--check` (and a test) fails when they drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from contract import asyncapi
from contract.settings import REPO_ROOT, Settings

DOCS = REPO_ROOT / "docs" / "contracts"
API_DOC = DOCS / "openapi-scan-api.json"
GATEWAY_DOC = DOCS / "openapi-gateway.json"
ASYNCAPI_DOC = DOCS / "asyncapi.yaml"


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def documents() -> dict[Path, str]:
    """Every published document and its text, as the current code generates it."""
    from gateway.app import create_app as gateway_app
    from producers.api import create_app as api_app

    s = Settings.model_construct()  # defaults, not this checkout's ports or environment
    header = "# Generated from contract/ by `eco2 contract`; do not edit by hand.\n"
    return {
        API_DOC: _json(api_app(s).openapi()),
        GATEWAY_DOC: _json(gateway_app(s).openapi()),
        ASYNCAPI_DOC: header + yaml.safe_dump(asyncapi.document(), sort_keys=False, allow_unicode=True),
    }


def stale() -> list[Path]:
    """Documents whose committed text differs from what the code generates."""
    return [p for p, text in documents().items() if not p.exists() or p.read_text() != text]


def contract(
    check: Annotated[bool, typer.Option("--check", help="only report drift; exit 1 if any")] = False,
) -> None:
    """Write docs/contracts/ (OpenAPI of the scan API and the gateway, AsyncAPI of the topics + SSE)."""
    if check:
        drift = stale()
        for p in drift:
            typer.echo(f"out of date: {p.relative_to(REPO_ROOT)} (run `eco2 contract`)")
        raise typer.Exit(1 if drift else 0)
    DOCS.mkdir(parents=True, exist_ok=True)
    for path, text in documents().items():
        path.write_text(text)
        typer.echo(f"wrote {path.relative_to(REPO_ROOT)}")
