"""Issue 2: the real Kafka, Redis and Postgres of the local stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contract.settings import Settings
from contract.topics import EVENTS, TOPICS, partition_for
from eco2 import install

from .conftest import eco2

pytestmark = pytest.mark.integration


async def _topic(s: Settings, name: str, partitions: int) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def test_produce_consume_round_trip_and_key_partitioning(settings: Settings, stack_status, uid):
    topic = await _topic(settings, f"test.rt.{uid}", 4)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    keys = [f"job-{uid}-{i}" for i in range(40)]
    try:
        sent = {}
        for k in keys:
            md = await producer.send_and_wait(topic, json.dumps({"k": k}).encode(), key=k.encode())
            sent[k] = md.partition
    finally:
        await producer.stop()
    # The producer's default partitioner and our explicit partition_for agree (murmur2).
    assert sent == {k: partition_for(k, 4) for k in keys}
    assert len(set(sent.values())) > 1, "40 keys all on one partition: partitioner is broken"

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=f"g-{uid}",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: dict[str, int] = {}
    try:
        while len(got) < len(keys):
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "timed out waiting for messages"
            for tp, msgs in batch.items():
                for m in msgs:
                    got[m.key.decode()] = tp.partition
                    assert json.loads(m.value) == {"k": m.key.decode()}
    finally:
        await consumer.stop()
    assert got == sent


async def test_consumer_group_offsets_commit_and_resume(settings: Settings, stack_status, uid):
    topic = await _topic(settings, f"test.grp.{uid}", 1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, str(i).encode(), key=b"k")
    finally:
        await producer.stop()

    async def consume(n: int) -> list[int]:
        c = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=f"grp-{uid}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await c.start()
        out: list[int] = []
        try:
            while len(out) < n:
                msg = await c.getone()
                out.append(int(msg.value))
            await c.commit()
        finally:
            await c.stop()
        return out

    assert await consume(4) == [0, 1, 2, 3]
    # A new consumer in the same group resumes after the committed offset.
    assert await consume(6) == [4, 5, 6, 7, 8, 9]


def test_kcat_lists_topics_with_partitions_from_the_definition(settings: Settings, stack_status):
    out = subprocess.run(
        ["kcat", "-b", settings.kafka_bootstrap, "-L", "-J"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    meta = json.loads(out.stdout)
    listed = {t["topic"]: len(t["partitions"]) for t in meta["topics"]}
    for spec in TOPICS:
        assert listed.get(spec.name) == spec.partitions, spec.name
    assert listed[EVENTS] == 4


async def test_redis_round_trip(settings: Settings, stack_status, uid):
    r = aioredis.from_url(settings.redis_url)
    try:
        await r.hset(f"test:{uid}", mapping={"a": "1", "b": "2"})
        assert await r.hgetall(f"test:{uid}") == {b"a": b"1", b"b": b"2"}
        await r.delete(f"test:{uid}")
    finally:
        await r.aclose()


async def test_redis_persists_as_the_manifest_does(settings: Settings, stack_status):
    """The local Redis runs with the persistence of `deploy/redis/redis.yaml` (AOF every second,
    no RDB snapshots): what the benchmarks measure is what Kubernetes runs."""
    import yaml

    manifest = Path(__file__).parent.parent / "deploy" / "redis" / "redis.yaml"
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "StatefulSet"]
    argv = docs[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    names = ("appendonly", "appendfsync", "save", "zset-max-listpack-value",
             "auto-aof-rewrite-percentage")
    want = {name: argv[argv.index(f"--{name}") + 1] for name in names}
    r = aioredis.from_url(settings.redis_url)
    try:
        got = {name: (await r.config_get(name))[name] for name in want}
    finally:
        await r.aclose()
    assert got == want


async def test_postgres_round_trip(settings: Settings, stack_status, uid):
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(f"CREATE TEMP TABLE t_{uid} (k text primary key, v jsonb)")
        await conn.execute(f"INSERT INTO t_{uid} VALUES ($1, $2)", "x", json.dumps({"a": 1}))
        assert json.loads(await conn.fetchval(f"SELECT v FROM t_{uid} WHERE k = 'x'")) == {"a": 1}
    finally:
        await conn.close()


def _free_port() -> int:
    """A loopback port nothing listens on now (so several stacks' test runs never collide)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_kafka_restart_keeps_data(settings: Settings, tmp_path: Path):
    """`down` then `up` keeps Kafka's data. Runs on a second broker of its own (other ports, own
    data dir) so the shared stack the other tests use is never interrupted."""
    local = tmp_path / "local"
    local.mkdir()
    home = install.kafka_home(settings)
    (local / home.name).symlink_to(home)  # reuse the resolved jars
    env = {
        "ECO2_LOCAL_DIR": str(local),
        "ECO2_KAFKA_BOOTSTRAP": f"127.0.0.1:{_free_port()}",
        "ECO2_KAFKA_CONTROLLER_PORT": str(_free_port()),
    }
    own = settings.model_copy(update={"kafka_bootstrap": env["ECO2_KAFKA_BOOTSTRAP"]})
    try:
        eco2("stack", "up", "--only", "kafka", env=env)
        topic = await _topic(own, "test.keep", 1)
        producer = AIOKafkaProducer(bootstrap_servers=own.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            md = await producer.send_and_wait(topic, b"before-restart")
        finally:
            await producer.stop()

        assert "stopped" in eco2("stack", "down", "--only", "kafka", env=env).stdout
        status = json.loads(eco2("stack", "status", "--json", env=env).stdout)["services"]
        assert status["kafka"] == {"url": env["ECO2_KAFKA_BOOTSTRAP"], "up": False}
        assert "started" in eco2("stack", "up", "--only", "kafka", env=env).stdout
        assert (
            json.loads(eco2("stack", "status", "--json", env=env).stdout)["services"]["kafka"]["up"] is True
        )

        consumer = AIOKafkaConsumer(bootstrap_servers=own.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, md.offset)
            msg = await consumer.getone()
            assert msg.value == b"before-restart"
        finally:
            await consumer.stop()
    finally:
        eco2("stack", "down", "--only", "kafka", env=env, check=False)


def test_status_json_names_every_service(stack_status):
    assert {"kafka", "redis", "postgres"} <= set(stack_status)
    assert stack_status["postgres"]["url"].startswith("postgresql://")
    assert ":" in stack_status["kafka"]["url"] and "//" not in stack_status["kafka"]["url"]


def test_broker_heap_is_resident_from_the_start(settings: Settings, stack_status):
    """Issue 16: the soak saw a fresh broker's RSS climb +313 MiB/h as G1 first used its heap.
    With AlwaysPreTouch the heap is resident at start, so RSS is flat from the first sample."""
    from eco2 import services, stack

    pid = stack.read_pid(settings, services.find("kafka"))
    assert pid is not None, "the stack's broker is not running"
    heap = (settings.kafka_heap or "768m").lower()
    heap_mib = int(heap[:-1]) * (1024 if heap.endswith("g") else 1)
    status = Path(f"/proc/{pid}/status").read_text()
    rss_mib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024
    assert rss_mib >= heap_mib, (
        f"broker RSS {rss_mib:.0f} MiB < its {heap_mib} MiB heap: heap not pre-touched"
    )


def test_up_is_idempotent(stack_status):
    out = eco2("stack", "up", "--only", "infra").stdout
    assert out.count("already up") == 3, out


def test_port_taken_by_a_stranger_is_a_clear_error(tmp_path: Path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = {"ECO2_LOCAL_DIR": str(tmp_path), "ECO2_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        out = eco2("stack", "up", "--only", "redis", env=env, check=False)
    assert out.returncode == 1
    assert f"port {port} is in use by a process this stack did not start" in out.stderr


def test_missing_java_is_a_clear_error(tmp_path: Path):
    env = {
        "ECO2_LOCAL_DIR": str(tmp_path),
        "ECO2_KAFKA_BOOTSTRAP": f"127.0.0.1:{_free_port()}",
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin/nonexistent",
    }
    out = eco2("stack", "up", "--only", "kafka", env=env, check=False)
    assert out.returncode == 1
    assert "`java` not found on PATH" in out.stderr
