"""A process of the local stack as `eco2 stack` sees it (its command, port, readiness), and where
the stack keeps its pid files, logs and data."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from contract.settings import Settings

ReadyCheck = Callable[[Settings], Awaitable[bool]]


@dataclass
class Service:
    name: str
    url: Callable[[Settings], str]
    ready: ReadyCheck  # is it up (status)
    argv: Callable[[Settings], list[str]]
    port: Callable[[Settings], int]
    prepare: Callable[[Settings], None] = lambda s: None
    env: Callable[[Settings], dict[str, str]] = lambda s: {}
    after_ready: Callable[[Settings], Awaitable[None]] | None = None
    timeout_s: float = 90.0
    daemon: bool = False  # True when the command forks a daemon (pg_ctl) instead of running
    stop_argv: Callable[[Settings], list[str]] | None = None
    pid_file: Callable[[Settings], Path] | None = None
    groups: tuple[str, ...] = field(default=("infra",))
    # Scheduling niceness. On one shared box, throughput work (stage workers, the writer, the
    # stand-in for the remote model) yields the CPU to latency-sensitive serving (API, gateway,
    # router, Kafka), as separate pods with their own CPU requests would in Kubernetes.
    nice: int = 0
    # What `up` waits for before it starts the next service (default: `ready`).
    start_ready: ReadyCheck | None = None
    # Several processes of one component may listen on one port (SO_REUSEPORT).
    shared_port: bool = False
    # Components run as several processes: how many, and the service of process i (2, 3...).
    processes: Callable[[Settings], int] = lambda s: 1
    replica: Callable[[int], Service] | None = None


class StackError(RuntimeError):
    pass


def run_dir(s: Settings) -> Path:
    return s.local_dir / "run"


def log_dir(s: Settings) -> Path:
    return s.local_dir / "logs"


def data_dir(s: Settings) -> Path:
    return s.local_dir / "data"


def log_path(s: Settings, name: str) -> Path:
    return log_dir(s) / f"{name}.log"
