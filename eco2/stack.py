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
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

from contract.settings import Settings

from . import install

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


@dataclass(frozen=True)
class KafkaNode:
    """One local KRaft node (broker + controller). A single node keeps the historical names."""

    index: int  # 0-based
    count: int

    @property
    def name(self) -> str:
        return "kafka" if self.count == 1 else f"kafka-{self.index + 1}"

    def address(self, s: Settings) -> str:
        return s.kafka_bootstrap.split(",")[self.index]

    def controller_port(self, s: Settings) -> int:
        return s.kafka_controller_port + 2 * self.index

    def dir(self, s: Settings) -> Path:
        return data_dir(s) / ("kafka" if self.count == 1 else f"kafka-{self.index + 1}")


def kafka_nodes(s: Settings) -> list[KafkaNode]:
    n = max(1, s.kafka_nodes)
    if len(s.kafka_bootstrap.split(",")) != n:
        raise StackError(
            f"ECO2_KAFKA_BOOTSTRAP lists {len(s.kafka_bootstrap.split(','))} addresses "
            f"but ECO2_KAFKA_NODES is {n}: give one address (the others follow at +2, +4...) or {n}"
        )
    return [KafkaNode(i, n) for i in range(n)]


async def broker_answers(address: str, brokers: int = 1) -> bool:
    """True when the broker at `address` serves metadata naming at least `brokers` brokers."""
    from aiokafka.client import AIOKafkaClient

    if not _port_open(*_host_port(address)):
        return False
    client = AIOKafkaClient(bootstrap_servers=address, request_timeout_ms=3000)
    try:
        await client.bootstrap()
        return len(client.cluster.brokers()) >= brokers
    except Exception:
        return False
    finally:
        await client.close()


async def kafka_ready(s: Settings) -> bool:
    """Every node answers and sees the whole cluster."""
    nodes = kafka_nodes(s)
    return all([await broker_answers(n.address(s), len(nodes)) for n in nodes])


def _kafka_config(s: Settings, node: KafkaNode) -> Path:
    return node.dir(s) / "server.properties"


def _kafka_prepare(s: Settings, node: KafkaNode) -> None:
    from contract.topics import replication

    home = install.ensure_kafka(s)
    nodes = kafka_nodes(s)
    host, port = _host_port(node.address(s))
    ctl = node.controller_port(s)
    voters = ",".join(f"{n.index + 1}@{_host_port(n.address(s))[0]}:{n.controller_port(s)}" for n in nodes)
    rep = replication(len(nodes))
    logs = node.dir(s) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = _kafka_config(s, node)
    cfg.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={node.index + 1}",
                f"controller.quorum.voters={voters}",
                f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{ctl}",
                f"advertised.listeners=PLAINTEXT://{host}:{port}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                f"log.dirs={logs}",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                "unclean.leader.election.enable=false",
                # Replication as deploy/strimzi/kafka.yaml sets it, scaled to the node count.
                f"default.replication.factor={rep.factor}",
                f"min.insync.replicas={rep.min_insync}",
                f"offsets.topic.replication.factor={rep.factor}",
                "offsets.topic.num.partitions=8",
                f"transaction.state.log.replication.factor={rep.factor}",
                f"transaction.state.log.min.isr={rep.min_insync}",
                "transaction.state.log.num.partitions=4",
                f"share.coordinator.state.topic.replication.factor={rep.factor}",
                f"share.coordinator.state.topic.min.isr={rep.min_insync}",
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
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _kafka_argv(s: Settings, node: KafkaNode) -> list[str]:
    heap = s.kafka_heap or ("768m" if node.count == 1 else "512m")
    # AlwaysPreTouch: the heap is touched at start, so the broker's RSS is its heap from the first
    # second instead of creeping up for an hour as G1 first uses each region (the soak's MISS).
    java = [*_java(s, install.kafka_home(s), heap), "-XX:+AlwaysPreTouch"]
    return [*java, "kafka.Kafka", str(_kafka_config(s, node))]


async def create_topics(s: Settings) -> list[str]:
    """Create every topic of the single definition that is missing; returns those created.

    Replication factor and min ISR follow `contract.topics.replication` for the node count."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from contract.topics import TOPICS, replication

    rep = replication(len(kafka_nodes(s)))
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(
                t.name,
                t.partitions,
                rep.factor,
                topic_configs={**t.config, "min.insync.replicas": str(rep.min_insync)},
            )
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


def _kafka_service(node: KafkaNode) -> Service:
    """One node. Of several, all but the last are started once their controller listens (the
    quorum needs a majority before any broker answers); the last waits for the whole cluster."""
    last = node.index == node.count - 1

    async def node_up(s: Settings) -> bool:
        return await broker_answers(node.address(s))

    async def controller_listens(s: Settings) -> bool:
        return _port_open(_host_port(node.address(s))[0], node.controller_port(s))

    return Service(
        name=node.name,
        url=node.address,
        port=lambda s: _host_port(node.address(s))[1],
        ready=node_up if node.count > 1 else kafka_ready,
        start_ready=(kafka_ready if last else controller_listens) if node.count > 1 else None,
        argv=lambda s: _kafka_argv(s, node),
        prepare=lambda s: _kafka_prepare(s, node),
        after_ready=_kafka_after_ready if last else None,
        timeout_s=120,
        groups=("infra", "kafka"),
    )


# --- redis -----------------------------------------------------------------------------------


def redis_argv(host: str, port: int, data: Path) -> list[str]:
    """How this project runs redis-server (the stack's, and private ones of tests and benchmarks).

    AOF with an fsync every second: a clean restart keeps everything (memo and idempotency keys
    included) and a crash loses at most about a second of writes; the view of `scan.events` heals
    itself either way (streams/heal.py). No RDB snapshots, as in `deploy/redis/redis.yaml`: with AOF
    they add nothing to recovery, and their fork and full dump every minute under load cost 2-6 ms
    of CPU per scan (docs/benchmarks.md). See docs/operations.md."""
    return [
        "redis-server",
        *("--bind", host, "--port", str(port), "--dir", str(data)),
        *("--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"),
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
    from contract.settings import get_settings

    from . import services as _app_services  # noqa: F401  (registers APPS)

    s = s or get_settings()
    every = [_kafka_service(n) for n in kafka_nodes(s)] + INFRA + expand(APPS, s)
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


def listens(pid: int, port: int) -> bool:
    """True when process `pid` itself holds a listening TCP socket on `port` (Linux /proc): with
    SO_REUSEPORT a sibling answering on the port proves nothing about this process."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


def _own_ready(svc: Service, check: ReadyCheck) -> ReadyCheck:
    """`check`, and for a shared port also that this service's own process listens on it."""
    if not svc.shared_port:
        return check

    async def both(s: Settings) -> bool:
        pid = read_pid(s, svc)
        return pid is not None and listens(pid, svc.port(s)) and await check(s)

    return both


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
    started = _own_ready(svc, svc.start_ready or svc.ready)
    if read_pid(s, svc) is not None:
        if await started(s):
            return "already up"
        # Running but not ready (e.g. a Kafka node waiting for a restarted peer): wait for it,
        # never start a second copy beside it.
        return await _wait_started(s, svc, started, "was starting")
    port = svc.port(s)
    if read_pid(s, svc) is None and not svc.shared_port and _port_open("127.0.0.1", port):
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
    return await _wait_started(s, svc, started, "started")


async def _wait_started(s: Settings, svc: Service, started: ReadyCheck, what: str) -> str:
    log = log_path(s, svc.name)
    deadline = time.monotonic() + svc.timeout_s
    while time.monotonic() < deadline:
        if await started(s):
            if svc.after_ready is not None:
                await svc.after_ready(s)
            return what
        if read_pid(s, svc) is None:
            raise StackError(f"{svc.name} exited during start-up; last log lines:\n{_tail(log)}")
        await asyncio.sleep(0.3)
    raise StackError(f"{svc.name} not ready after {svc.timeout_s:.0f}s; last log lines:\n{_tail(log)}")


def stop(s: Settings, svc: Service, timeout_s: float = 20.0) -> bool:
    """Stop a service this stack started (by its recorded pid). Returns False if it wasn't up."""
    return stop_together(s, [svc], timeout_s)[0]


def stop_together(s: Settings, svcs: list[Service], timeout_s: float = 20.0) -> list[bool]:
    """Signal every service first, then wait for all: Kafka nodes stopped one by one each wait
    for a controller quorum the previous ones took away."""
    pids: list[int | None] = []
    for svc in svcs:
        pid = read_pid(s, svc)
        pids.append(pid)
        if pid is None:
            continue
        if svc.stop_argv is not None:
            subprocess.run(svc.stop_argv(s), capture_output=True)
        else:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p is not None and _alive(p) for p in pids):
        time.sleep(0.1)
    for svc, pid in zip(svcs, pids, strict=True):
        if pid is None:
            if svc.pid_file is None:  # a stale file of a process that died on its own
                _pid_path(s, svc).unlink(missing_ok=True)
            continue
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if svc.pid_file is None:
            _pid_path(s, svc).unlink(missing_ok=True)
    return [pid is not None for pid in pids]


def _strays(s: Settings, table: list[Service], groups: set[str] | None) -> list[Service]:
    """Processes `up` started under another layout (e.g. kafka-1..3 after ECO2_KAFKA_NODES went
    back to 1, or workers-3 after fewer workers): `down` stops them too, by their pid files."""
    known = {svc.name for svc in table}
    out: list[Service] = []
    for pid_file in sorted(run_dir(s).glob("*.pid")):
        name = pid_file.stem
        head, _, tail = name.rpartition("-")
        base = head if tail.isdigit() else name
        group = "infra" if base == "kafka" else "app"
        if name in known or (groups is not None and not {name, base, group} & groups):
            continue
        out.append(
            Service(name=name, url=lambda s: "", ready=redis_ready, argv=lambda s: [], port=lambda s: 0)
        )
    return out


async def status(s: Settings, groups: set[str] | None = None) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for svc in services(groups, s):
        up = read_pid(s, svc) is not None and await _own_ready(svc, svc.ready)(s)
        out[svc.name] = {"url": svc.url(s), "up": up}
    return out


async def up(s: Settings, groups: set[str] | None = None, echo: Callable[[str], None] = print) -> None:
    install.ensure_apt_packages()
    for svc in services(groups, s):
        t0 = time.monotonic()
        what = await start(s, svc)
        echo(f"{svc.name:<10} {what:<11} {svc.url(s)}  ({time.monotonic() - t0:.1f}s)")


def _stray_note(svc: Service, strays: list[Service]) -> str:
    return " (not in this layout)" if svc in strays else ""


def down(
    s: Settings, groups: set[str] | None = None, reset: bool = False, echo: Callable[[str], None] = print
) -> None:
    table = services(groups, s)
    strays = _strays(s, table, groups)
    rest = [svc for svc in reversed(table) if "kafka" not in svc.groups]
    rest += [svc for svc in strays if not svc.name.startswith("kafka")]
    for svc in rest:
        echo(f"{svc.name:<10} {'stopped' if stop(s, svc) else 'was not running'}{_stray_note(svc, strays)}")
    nodes = [svc for svc in table if "kafka" in svc.groups] + [
        svc for svc in strays if svc.name.startswith("kafka")
    ]
    for svc, was_up in zip(nodes, stop_together(s, nodes), strict=True):
        echo(f"{svc.name:<10} {'stopped' if was_up else 'was not running'}{_stray_note(svc, strays)}")
    if reset:
        shutil.rmtree(data_dir(s), ignore_errors=True)
        echo(f"removed {data_dir(s)}")
