"""The stack's infrastructure: local KRaft Kafka nodes (configured, formatted, topics created),
Redis and Postgres (initialised, its database created), each as a `Service`."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from contract.settings import Settings

from . import install
from .probes import broker_answers, host_port, port_open, postgres_ready, redis_ready
from .service import Service, StackError, data_dir, log_path

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
    host, port = host_port(node.address(s))
    ctl = node.controller_port(s)
    voters = ",".join(f"{n.index + 1}@{host_port(n.address(s))[0]}:{n.controller_port(s)}" for n in nodes)
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
                # Thread pools and G1 stay at Kafka's defaults, as in production: pools sized to
                # the 2 cores and other collectors measured no difference (no GC ran in a 300-VU
                # run; bench/reports/issue19-broker/). tests/test_topology_unit.py checks that
                # every setting of deploy/strimzi/kafka.yaml holds here too.
                "",
            ]
        )
    )
    if not (logs / "meta.properties").exists():
        cluster_id = _kafka_cluster_id(s)
        proc = subprocess.run(
            [
                *_java(s, home),
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",
                "-c",
                str(cfg),
            ],
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


def kafka_service(node: KafkaNode) -> Service:
    """One node. Of several, all but the last are started once their controller listens (the
    quorum needs a majority before any broker answers); the last waits for the whole cluster."""
    last = node.index == node.count - 1

    async def node_up(s: Settings) -> bool:
        return await broker_answers(node.address(s))

    async def controller_listens(s: Settings) -> bool:
        return port_open(host_port(node.address(s))[0], node.controller_port(s))

    return Service(
        name=node.name,
        url=node.address,
        port=lambda s: host_port(node.address(s))[1],
        ready=node_up if node.count > 1 else kafka_ready,
        start_ready=(kafka_ready if last else controller_listens) if node.count > 1 else None,
        argv=lambda s: _kafka_argv(s, node),
        prepare=lambda s: _kafka_prepare(s, node),
        after_ready=_kafka_after_ready if last else None,
        timeout_s=120,
        groups=("infra", "kafka"),
    )


# --- redis -----------------------------------------------------------------------------------


AOF_REWRITE_PERCENTAGE = "400"  # as deploy/redis/redis.yaml (tests/test_deploy.py)


def redis_argv(host: str, port: int, data: Path) -> list[str]:
    """How this project runs redis-server (the stack's, and private ones of tests and benchmarks).

    AOF with an fsync every second: a clean restart keeps everything (memo and idempotency keys
    included) and a crash loses at most about a second of writes; the view of `scan.events` heals
    itself either way (streams/heal.py). No RDB snapshots, as in `deploy/redis/redis.yaml`: with AOF
    they add nothing to recovery, and their fork and full dump every minute under load cost 2-6 ms
    of CPU per scan (docs/benchmarks.md). The AOF is rewritten once it has grown 4x its last
    rewrite (Redis's default: 1x): each rewrite forks the server (5-35 ms blocked at 50-250 MB,
    then copy-on-write faults) and runs a child writing the whole dataset beside it, which held
    every stream up over 50 ms in the churn benchmark (issue 23,
    bench/reports/issue23/round5/churn); a quarter as many rewrites, the same fsync every second.
    See docs/operations.md.

    A job's history (a sorted set of ~10 event JSONs of 0.4-4 KiB) stays a listpack, not a
    skiplist plus a hash table (Redis's default above 64-byte members): 10% less of Redis's CPU
    per applied event and 23% less memory (issue 23, bench/reports/issue23/round5/)."""
    return [
        "redis-server",
        *("--bind", host, "--port", str(port), "--dir", str(data)),
        *("--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"),
        *("--auto-aof-rewrite-percentage", AOF_REWRITE_PERCENTAGE),
        *("--maxclients", "20000", "--protected-mode", "no"),
        *("--zset-max-listpack-value", HISTORY_LISTPACK_VALUE),
    ]


# The largest history entry (bytes) kept in a listpack (`redis_argv`); deploy/redis/redis.yaml too.
HISTORY_LISTPACK_VALUE = "4096"


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


async def _create_database(s: Settings) -> None:
    """Create the project's database when missing."""
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


async def _pg_ready_db(s: Settings) -> bool:
    """Ready means the server answers SELECT 1 (on the maintenance db before ours exists)."""
    if await postgres_ready(s):
        return True
    admin = s.model_copy(update={"postgres_dsn": s.postgres_dsn.rsplit("/", 1)[0] + "/postgres"})
    return await postgres_ready(admin)


# --- the services ----------------------------------------------------------------------------


def kafka_services(s: Settings) -> list[Service]:
    return [kafka_service(n) for n in kafka_nodes(s)]


REDIS = Service(
    name="redis",
    url=lambda s: s.redis_url,
    port=lambda s: urlparse(s.redis_url).port or 6379,
    ready=redis_ready,
    argv=_redis_argv,
)


def postgres(migrate: Callable[[Settings], Awaitable[None]] | None = None) -> Service:
    """Postgres; once it answers, the project's database is created if missing and `migrate` runs."""

    async def after_ready(s: Settings) -> None:
        await _create_database(s)
        if migrate is not None:
            await migrate(s)

    return Service(
        name="postgres",
        url=lambda s: s.postgres_dsn,
        port=lambda s: urlparse(s.postgres_dsn).port or 5432,
        ready=_pg_ready_db,
        argv=_pg_argv,
        prepare=_pg_prepare,
        after_ready=after_ready,
        daemon=True,
        stop_argv=_pg_stop_argv,
        pid_file=lambda s: _pg_dir(s) / "postmaster.pid",
    )
