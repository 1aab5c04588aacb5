"""The project's own processes in the stack table (API, stage workers, router, ...)."""

from __future__ import annotations

from .stack import APPS, Service, _py, http_ready  # noqa: F401

# Components add their Service entries to APPS here.
