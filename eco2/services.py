"""The project's own processes in the stack table (API, stage workers, router, ...)."""

from __future__ import annotations

from collections.abc import Callable

from contract.settings import Settings
from persistence.migrate import after_postgres

from .stack import AFTER_POSTGRES, APPS, Service, _py, http_ready


def _metrics_service(
    name: str, port: Callable[[Settings], int], argv: Callable[[Settings], list[str]], nice: int = 0
) -> Service:
    """A Kafka consumer process (no HTTP API of its own): ready once its metrics endpoint answers."""

    def url(s: Settings) -> str:
        return f"http://127.0.0.1:{port(s)}"

    return Service(
        name=name,
        url=url,
        port=port,
        ready=http_ready("/metrics", url),
        argv=argv,
        env=lambda s: {"ECO2_METRICS_PORT": str(port(s))},
        nice=nice,
        groups=("app",),
    )


def _http_service(
    name: str,
    url: Callable[[Settings], str],
    port: Callable[[Settings], int],
    module: str,
    probe: str,
    nice: int = 0,
) -> Service:
    return Service(
        name=name,
        url=url,
        port=port,
        ready=http_ready(probe, url),
        argv=_py(module),
        nice=nice,
        groups=("app",),
    )


# Migrations run whenever `stack up` starts Postgres.
if after_postgres not in AFTER_POSTGRES:
    AFTER_POSTGRES.append(after_postgres)

APPS.extend(
    [
        _http_service(
            "model",
            lambda s: f"http://{s.model_host}:{s.model_port}",
            lambda s: s.model_port,
            "simmodel",
            "/health",
            nice=10,
        ),
        _http_service("api", lambda s: s.api_url, lambda s: s.api_port, "producers", "/ready"),
        _metrics_service("workers", lambda s: s.workers_metrics_port, _py("streams", "worker"), nice=10),
        _metrics_service("writer", lambda s: s.writer_metrics_port, _py("persistence"), nice=10),
        _metrics_service("router", lambda s: s.router_metrics_port, _py("streams", "router")),
        _http_service("gateway", lambda s: s.gateway_url, lambda s: s.gateway_port, "gateway", "/health"),
    ]
)
