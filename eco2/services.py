"""The project's own processes in the stack table (API, stage workers, router, ...)."""

from __future__ import annotations

from collections.abc import Callable

from contract.settings import Settings
from persistence.migrate import after_postgres

from .stack import AFTER_POSTGRES, APPS, Service, _py, http_ready

# Local Prometheus ports of the processes that serve no HTTP API of their own.
WORKERS_METRICS_PORT = 9101
ROUTER_METRICS_PORT = 9102
WRITER_METRICS_PORT = 9103


def _metrics_service(name: str, port: int, argv: Callable[[Settings], list[str]], nice: int = 0) -> Service:
    """A Kafka consumer process: ready once its metrics endpoint answers on `port`."""
    url = f"http://127.0.0.1:{port}"
    return Service(
        name=name,
        url=lambda s: url,
        port=lambda s: port,
        ready=http_ready("/metrics", lambda s: url),
        argv=argv,
        env=lambda s: {"ECO2_METRICS_PORT": str(port)},
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
        _metrics_service("workers", WORKERS_METRICS_PORT, _py("streams", "worker"), nice=10),
        _metrics_service("writer", WRITER_METRICS_PORT, _py("persistence"), nice=10),
        _metrics_service("router", ROUTER_METRICS_PORT, _py("streams", "router")),
        _http_service("gateway", lambda s: s.gateway_url, lambda s: s.gateway_port, "gateway", "/health"),
    ]
)
