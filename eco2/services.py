"""The stack's table of processes: the Kafka nodes, Redis, Postgres, then the project's own
(API, stage workers, router, ...), each a `Service`; `eco2 stack` starts them in this order."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

from contract.settings import Settings, get_settings
from persistence.migrate import after_postgres

from . import infra
from .probes import http_ready
from .service import Service, StackError

# Process i > 1 of a consumer component serves its metrics this much above process 1's port.
METRICS_PORT_STEP = 10

# The per-user quotas a local stack runs without unless the checkout sets them (env or
# .eco2.env): the tests and benchmarks drive one user far past a real user's pace. Production
# (deploy/app/config.yaml) keeps contract/settings.py's defaults; tests/test_quota.py and
# `eco2 bench abuse` run private API and gateway processes with them.
LOCAL_QUOTA_FIELDS = ("scan_burst", "inflight_max", "streams_max")


def local_quotas(s: Settings) -> dict[str, str]:
    return {f"ECO2_{f.upper()}": "0" for f in LOCAL_QUOTA_FIELDS if f not in s.model_fields_set}


def _metrics_service(
    name: str,
    port: Callable[[Settings], int],
    argv: Callable[[Settings], list[str]],
    nice: int = 0,
    processes: Callable[[Settings], int] = lambda s: 1,
    index: int = 1,
) -> Service:
    """A Kafka consumer process (no HTTP API of its own): ready once its metrics endpoint answers.
    With `processes`, `eco2 stack up` runs that many, in one consumer group, each on its own
    metrics port."""

    def own_port(s: Settings) -> int:
        return port(s) + METRICS_PORT_STEP * (index - 1)

    def url(s: Settings) -> str:
        return f"http://127.0.0.1:{own_port(s)}"

    return Service(
        name=name,
        url=url,
        port=own_port,
        ready=http_ready("/metrics", url),
        argv=argv,
        env=lambda s: {"ECO2_METRICS_PORT": str(own_port(s))},
        nice=nice,
        groups=("app",),
        processes=processes,
        replica=lambda i: _metrics_service(name, port, argv, nice, processes, i),
    )


def _http_service(
    name: str,
    url: Callable[[Settings], str],
    port: Callable[[Settings], int],
    module: str,
    probe: str,
    nice: int = 0,
    processes: Callable[[Settings], int] | None = None,
    env: Callable[[Settings], dict[str, str]] = lambda s: {},
) -> Service:
    """An HTTP server. With `processes`, that many share the port (SO_REUSEPORT; the kernel
    spreads new connections over them)."""
    svc = Service(
        name=name,
        url=url,
        port=port,
        ready=http_ready(probe, url),
        argv=_py(module),
        env=env,
        nice=nice,
        groups=("app",),
    )
    if processes is None:
        return svc
    shared = replace(svc, processes=processes, shared_port=True)
    return replace(shared, replica=lambda i: shared)


def _py(module: str, *args: str) -> Callable[[Settings], list[str]]:
    return lambda s: [sys.executable, "-m", module, *args]


# Migrations run whenever `stack up` starts Postgres.
INFRA: list[Service] = [infra.REDIS, infra.postgres(after_postgres)]

APPS: list[Service] = [
    _http_service(
        "model",
        lambda s: f"http://{s.model_host}:{s.model_port}",
        lambda s: s.model_port,
        "simmodel",
        "/health",
        nice=10,
    ),
    _http_service("api", lambda s: s.api_url, lambda s: s.api_port, "producers", "/ready", env=local_quotas),
    _metrics_service(
        "workers",
        lambda s: s.workers_metrics_port,
        _py("streams", "worker"),
        nice=10,
        processes=lambda s: s.worker_processes,
    ),
    _metrics_service("writer", lambda s: s.writer_metrics_port, _py("persistence"), nice=10),
    _metrics_service(
        "router",
        lambda s: s.router_metrics_port,
        _py("streams", "router"),
        processes=lambda s: s.router_processes,
    ),
    _http_service(
        "gateway",
        lambda s: s.gateway_url,
        lambda s: s.gateway_port,
        "gateway",
        "/health",
        processes=lambda s: s.gateway_processes,
        env=local_quotas,
    ),
]


def expand(apps: list[Service], s: Settings) -> list[Service]:
    """Each app service once per process (`processes`): process 1 keeps the name, process i is
    `name-i`; all of them are in the group `name`, so `--only workers` means every worker."""
    out: list[Service] = []
    for svc in apps:
        n = svc.processes(s) if svc.replica is not None else 1
        if n <= 1:
            out.append(svc)
            continue
        out.append(replace(svc, groups=(*svc.groups, svc.name)))
        for i in range(2, n + 1):
            assert svc.replica is not None
            r = svc.replica(i)
            out.append(replace(r, name=f"{svc.name}-{i}", groups=(*r.groups, svc.name)))
    return out


def services(groups: set[str] | None = None, s: Settings | None = None) -> list[Service]:
    """The stack's services for settings `s` (default: this process's): the Kafka nodes first."""
    s = s or get_settings()
    every = infra.kafka_services(s) + INFRA + expand(APPS, s)
    if groups is None:
        return every
    return [svc for svc in every if (set(svc.groups) | {svc.name}) & groups]


def find(name: str) -> Service:
    for svc in services():
        if svc.name == name:
            return svc
    raise StackError(f"unknown service {name!r}; known: {', '.join(s.name for s in services())}")
