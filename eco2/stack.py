"""The local stack: one table of processes, each with its command and readiness check.

`up` starts what is not running (idempotent) and waits until each service really answers;
`down` stops only what `up` started, by the pid it recorded; data stays unless `--reset`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from contract.settings import Settings

from . import install

ReadyCheck = Callable[[Settings], Awaitable[bool]]


@dataclass
class Service:
    name: str
    url: Callable[[Settings], str]
    ready: ReadyCheck
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


class StackError(RuntimeError):
    pass


# --- paths ---------------------------------------------------------------------------------


def run_dir(s: Settings) -> Path:
    return s.local_dir / "run"


def log_dir(s: Settings) -> Path:
    return s.local_dir / "logs"


def data_dir(s: Settings) -> Path:
    return s.local_dir / "data"


def log_path(s: Settings, name: str) -> Path:
    return log_dir(s) / f"{name}.log"


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _url_port(url: str) -> int:
    port = urlparse(url).port
    assert port is not None, url
    return port


# --- readiness checks ------------------------------------------------------------------------


async def kafka_ready(s: Settings) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    if not _port_open(*_host_port(s.kafka_bootstrap)):
        return False
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, request_timeout_ms=3000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        await admin.close()


async def redis_ready(s: Settings) -> bool:
    import redis.asyncio as aioredis

    client = aioredis.from_url(s.redis_url, socket_connect_timeout=2)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def postgres_ready(s: Settings) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(s.postgres_dsn, timeout=3)
    except Exception:
        return False
    try:
        return await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def http_ready(path: str, url_of: Callable[[Settings], str]) -> ReadyCheck:
    async def check(s: Settings) -> bool:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(url_of(s) + path)).status_code == 200
        except Exception:
            return False

    return check


# --- kafka -----------------------------------------------------------------------------------


def _kafka_config(s: Settings) -> Path:
    return data_dir(s) / "kafka" / "server.properties"


def _kafka_prepare(s: Settings) -> None:
    home = install.ensure_kafka(s)
    host, port = _host_port(s.kafka_bootstrap)
    ctl = s.kafka_controller_port
    logs = data_dir(s) / "kafka" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = _kafka_config(s)
    cfg.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@{host}:{ctl}",
                f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{ctl}",
                f"advertised.listeners=PLAINTEXT://{host}:{port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"log.dirs={logs}",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=8",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "",
            ]
        )
    )
    if not (logs / "meta.properties").exists():
        cluster_id = _kafka_cluster_id(s)
        proc = subprocess.run(
            [*_java(s, home), "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(cfg)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{proc.stdout}{proc.stderr}")


def _kafka_cluster_id(s: Settings) -> str:
    """A stable cluster id (base64 of a UUID), kept beside the data so re-formats match."""
    path = data_dir(s) / "kafka" / "cluster.id"
    if not path.exists():
        import base64

        raw = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        path.write_text(raw)
    return path.read_text().strip()


def _java(s: Settings, home: Path, heap: str = "512m") -> list[str]:
    log4j = Path(__file__).parent / "kafka" / "log4j2.properties"
    return [
        "java",
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+UseG1GC",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        str(home / "libs" / "*"),
    ]


def _kafka_argv(s: Settings) -> list[str]:
    return [*_java(s, install.kafka_home(s), "768m"), "kafka.Kafka", str(_kafka_config(s))]


async def create_topics(s: Settings) -> list[str]:
    """Create every topic of the single definition that is missing; returns those created."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from contract.topics import TOPICS

    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(t.name, t.partitions, 1, topic_configs=dict(t.config))
            for t in TOPICS
            if t.name not in existing
        ]
        if new:
            await admin.create_topics(new)
        return [t.name for t in new]
    finally:
        await admin.close()


async def _kafka_after_ready(s: Settings) -> None:
    created = await create_topics(s)
    if created:
        print(f"  created topics: {', '.join(created)}", flush=True)


# --- redis -----------------------------------------------------------------------------------


def redis_argv(host: str, port: int, data: Path) -> list[str]:
    """How this project runs redis-server (the stack's, and private ones of tests and benchmarks)."""
    return [
        "redis-server",
        *("--bind", host, "--port", str(port), "--dir", str(data)),
        *("--save", "60 1000", "--appendonly", "no", "--daemonize", "no"),
        *("--maxclients", "20000", "--protected-mode", "no"),
    ]


def _redis_argv(s: Settings) -> list[str]:
    u = urlparse(s.redis_url)
    d = data_dir(s) / "redis"
    d.mkdir(parents=True, exist_ok=True)
    return redis_argv(u.hostname or "127.0.0.1", u.port or 6379, d)


# --- postgres --------------------------------------------------------------------------------


def _pg_dir(s: Settings) -> Path:
    return data_dir(s) / "postgres"


def _as_pg_user(argv: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` system user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _pg_prepare(s: Settings) -> None:
    install.pg_bin("initdb")
    d = _pg_dir(s)
    if (d / "PG_VERSION").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(d, "postgres", "postgres")
        os.chmod(d, 0o700)
        probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(d)])
        if probe.returncode != 0:
            raise StackError(
                f"the postgres user cannot write {d}: make its parent folders traversable "
                f"(chmod o+x) or set ECO2_LOCAL_DIR to a folder outside /root"
            )
    u = urlparse(s.postgres_dsn)
    proc = subprocess.run(
        _as_pg_user(
            [
                install.pg_bin("initdb"),
                "-D",
                str(d),
                "-U",
                u.username or "eco2",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ]
        ),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise StackError(f"initdb failed:\n{proc.stdout}{proc.stderr}")


def _pg_argv(s: Settings) -> list[str]:
    u = urlparse(s.postgres_dsn)
    log = log_path(s, "postgres")
    log.touch()
    if os.geteuid() == 0:  # the server writes its own log as the postgres user
        shutil.chown(log, "postgres", "postgres")
    opts = (
        f"-p {u.port or 5432} -c listen_addresses={u.hostname or '127.0.0.1'} "
        "-c unix_socket_directories='' -c max_connections=200 -c fsync=on"
    )
    return _as_pg_user(
        [
            install.pg_bin("pg_ctl"),
            "start",
            "-D",
            str(_pg_dir(s)),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "-l",
            str(log_path(s, "postgres")),
        ]
    )


def _pg_stop_argv(s: Settings) -> list[str]:
    return _as_pg_user([install.pg_bin("pg_ctl"), "stop", "-D", str(_pg_dir(s)), "-m", "fast"])


async def _pg_after_ready(s: Settings) -> None:
    """Create the project's database when missing, then apply migrations when there are any."""
    import asyncpg

    u = urlparse(s.postgres_dsn)
    dbname = (u.path or "/eco2").lstrip("/")
    admin_dsn = s.postgres_dsn.rsplit("/", 1)[0] + "/postgres"
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname):
            await conn.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        await conn.close()
    for hook in AFTER_POSTGRES:
        await hook(s)


async def _pg_ready_db(s: Settings) -> bool:
    """Ready means the server answers SELECT 1 (on the maintenance db before ours exists)."""
    if await postgres_ready(s):
        return True
    admin = s.model_copy(update={"postgres_dsn": s.postgres_dsn.rsplit("/", 1)[0] + "/postgres"})
    return await postgres_ready(admin)


# Hooks later components register (e.g. persistence migrations) to run once Postgres is up.
AFTER_POSTGRES: list[Callable[[Settings], Awaitable[None]]] = []


# --- the table -------------------------------------------------------------------------------


def _py(module: str, *args: str) -> Callable[[Settings], list[str]]:
    return lambda s: [sys.executable, "-m", module, *args]


INFRA: list[Service] = [
    Service(
        name="kafka",
        url=lambda s: s.kafka_bootstrap,
        port=lambda s: _host_port(s.kafka_bootstrap)[1],
        ready=kafka_ready,
        argv=_kafka_argv,
        prepare=_kafka_prepare,
        after_ready=_kafka_after_ready,
        timeout_s=120,
    ),
    Service(
        name="redis",
        url=lambda s: s.redis_url,
        port=lambda s: urlparse(s.redis_url).port or 6379,
        ready=redis_ready,
        argv=_redis_argv,
    ),
    Service(
        name="postgres",
        url=lambda s: s.postgres_dsn,
        port=lambda s: urlparse(s.postgres_dsn).port or 5432,
        ready=_pg_ready_db,
        argv=_pg_argv,
        prepare=_pg_prepare,
        after_ready=_pg_after_ready,
        daemon=True,
        stop_argv=_pg_stop_argv,
        pid_file=lambda s: _pg_dir(s) / "postmaster.pid",
    ),
]

# The project's own processes; later components append theirs here (see eco2/services.py).
APPS: list[Service] = []


def services(groups: set[str] | None = None) -> list[Service]:
    from . import services as _app_services  # noqa: F401  (registers APPS)

    every = INFRA + APPS
    if groups is None:
        return every
    return [svc for svc in every if (set(svc.groups) | {svc.name}) & groups]


def find(name: str) -> Service:
    for svc in services():
        if svc.name == name:
            return svc
    raise StackError(f"unknown service {name!r}; known: {', '.join(s.name for s in services())}")


# --- process control -------------------------------------------------------------------------


def _pid_path(s: Settings, svc: Service) -> Path:
    if svc.pid_file is not None:
        return svc.pid_file(s)
    return run_dir(s) / f"{svc.name}.pid"


def read_pid(s: Settings, svc: Service) -> int | None:
    path = _pid_path(s, svc)
    try:
        pid = int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


async def start(s: Settings, svc: Service) -> str:
    """Start one service unless it already runs; wait for readiness. Returns what happened."""
    if read_pid(s, svc) is not None and await svc.ready(s):
        return "already up"
    port = svc.port(s)
    if read_pid(s, svc) is None and _port_open("127.0.0.1", port):
        raise StackError(
            f"{svc.name}: port {port} is in use by a process this stack did not start; "
            f"stop it or set the ECO2_* setting for {svc.name}'s address"
        )
    for d in (run_dir(s), log_dir(s), data_dir(s)):
        d.mkdir(parents=True, exist_ok=True)
    svc.prepare(s)
    log = log_path(s, svc.name)
    env = {**os.environ, **svc.env(s)}
    if svc.daemon:
        proc = subprocess.run(svc.argv(s), capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise StackError(f"{svc.name} failed to start:\n{proc.stdout}{proc.stderr}\n{_tail(log)}")
    else:
        with open(log, "ab") as out:
            child = subprocess.Popen(
                (["nice", "-n", str(svc.nice)] if svc.nice else []) + svc.argv(s),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        _pid_path(s, svc).write_text(f"{child.pid}\n")
    deadline = time.monotonic() + svc.timeout_s
    while time.monotonic() < deadline:
        if await svc.ready(s):
            if svc.after_ready is not None:
                await svc.after_ready(s)
            return "started"
        if read_pid(s, svc) is None:
            raise StackError(f"{svc.name} exited during start-up; last log lines:\n{_tail(log)}")
        await asyncio.sleep(0.3)
    raise StackError(f"{svc.name} not ready after {svc.timeout_s:.0f}s; last log lines:\n{_tail(log)}")


def stop(s: Settings, svc: Service, timeout_s: float = 20.0) -> bool:
    """Stop a service this stack started (by its recorded pid). Returns False if it wasn't up."""
    pid = read_pid(s, svc)
    if pid is None:
        return False
    if svc.stop_argv is not None:
        subprocess.run(svc.stop_argv(s), capture_output=True)
    else:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if svc.pid_file is None:
        _pid_path(s, svc).unlink(missing_ok=True)
    return True


async def status(s: Settings, groups: set[str] | None = None) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for svc in services(groups):
        up = read_pid(s, svc) is not None and await svc.ready(s)
        out[svc.name] = {"url": svc.url(s), "up": up}
    return out


async def up(s: Settings, groups: set[str] | None = None, echo: Callable[[str], None] = print) -> None:
    install.ensure_apt_packages()
    for svc in services(groups):
        t0 = time.monotonic()
        what = await start(s, svc)
        echo(f"{svc.name:<10} {what:<11} {svc.url(s)}  ({time.monotonic() - t0:.1f}s)")


def down(
    s: Settings, groups: set[str] | None = None, reset: bool = False, echo: Callable[[str], None] = print
) -> None:
    for svc in reversed(services(groups)):
        echo(f"{svc.name:<10} {'stopped' if stop(s, svc) else 'was not running'}")
    if reset:
        shutil.rmtree(data_dir(s), ignore_errors=True)
        echo(f"removed {data_dir(s)}")
