"""The project's own processes in the stack table (API, stage workers, router, ...)."""

from __future__ import annotations

from .stack import APPS, Service, _py, http_ready  # noqa: F401

# Components add their Service entries to APPS here.


def _metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


WORKERS_METRICS_PORT = 9101

APPS.extend(
    [
        Service(
            name="model",
            url=lambda s: f"http://{s.model_host}:{s.model_port}",
            port=lambda s: s.model_port,
            ready=http_ready("/health", lambda s: f"http://{s.model_host}:{s.model_port}"),
            argv=_py("simmodel"),
            nice=10,
            groups=("app",),
        ),
        Service(
            name="api",
            url=lambda s: s.api_url,
            port=lambda s: s.api_port,
            ready=http_ready("/ready", lambda s: s.api_url),
            argv=_py("producers"),
            groups=("app",),
        ),
        Service(
            name="workers",
            url=lambda s: _metrics_url(WORKERS_METRICS_PORT),
            port=lambda s: WORKERS_METRICS_PORT,
            ready=http_ready("/metrics", lambda s: _metrics_url(WORKERS_METRICS_PORT)),
            argv=_py("streams", "worker"),
            env=lambda s: {"ECO2_METRICS_PORT": str(WORKERS_METRICS_PORT)},
            nice=10,
            groups=("app",),
        ),
    ]
)

# Persistence (issue 5): migrations whenever `stack up` starts Postgres, and the batched writer.
from persistence.migrate import after_postgres  # noqa: E402

from .stack import AFTER_POSTGRES  # noqa: E402

WRITER_METRICS_PORT = 9103

if after_postgres not in AFTER_POSTGRES:
    AFTER_POSTGRES.append(after_postgres)
APPS.append(
    Service(
        name="writer",
        url=lambda s: _metrics_url(WRITER_METRICS_PORT),
        port=lambda s: WRITER_METRICS_PORT,
        ready=http_ready("/metrics", lambda s: _metrics_url(WRITER_METRICS_PORT)),
        argv=_py("persistence"),
        env=lambda s: {"ECO2_METRICS_PORT": str(WRITER_METRICS_PORT)},
        nice=10,
        groups=("app",),
    )
)

# Event router and SSE gateway (issue 4).
ROUTER_METRICS_PORT = 9102

APPS.extend(
    [
        Service(
            name="router",
            url=lambda s: _metrics_url(ROUTER_METRICS_PORT),
            port=lambda s: ROUTER_METRICS_PORT,
            ready=http_ready("/metrics", lambda s: _metrics_url(ROUTER_METRICS_PORT)),
            argv=_py("streams", "router"),
            env=lambda s: {"ECO2_METRICS_PORT": str(ROUTER_METRICS_PORT)},
            groups=("app",),
        ),
        Service(
            name="gateway",
            url=lambda s: s.gateway_url,
            port=lambda s: s.gateway_port,
            ready=http_ready("/health", lambda s: s.gateway_url),
            argv=_py("gateway"),
            groups=("app",),
        ),
    ]
)
