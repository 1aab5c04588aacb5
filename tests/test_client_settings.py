"""Issue 13: the Kafka and model-client settings that cut CPU per scan reach the real clients.

Unit tests, no broker: they build the clients the processes build and read back what aiokafka and
the openai SDK will use, so an upstream rename (aiokafka's private attributes, the SDK's pool
limits) fails here instead of silently dropping a setting.
"""

from __future__ import annotations

from pathlib import Path

from aiokafka.consumer.fetcher import Fetcher

from contract.settings import Settings
from streams import model
from streams.app import create_app


async def test_faust_consumers_get_read_committed_and_the_fetch_settings(tmp_path: Path) -> None:
    s = Settings(
        local_dir=tmp_path,
        kafka_fetch_min_bytes=4096,
        kafka_fetch_max_wait_ms=7,
        kafka_linger_ms=3,
        kafka_idle_fetch_wait_ms=1234,
    )
    app = create_app("unit-client-settings", s)
    assert Fetcher._eco2_idle_wait_ms == 1234  # type: ignore[attr-defined]  # runtime/idle_fetch.py
    consumer = app.consumer._thread._create_worker_consumer(app.transport)  # type: ignore[attr-defined]
    try:
        assert consumer._isolation_level == "read_committed"
        assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (4096, 7)
    finally:
        await consumer.stop()  # never started: only closes its client
    assert app.conf.producer_linger == 0.003  # Faust passes it to aiokafka as linger_ms=3
    router = create_app("unit-client-settings-router", s, fetch=(s.router_fetch_min_bytes, 50))
    consumer = router.consumer._thread._create_worker_consumer(router.transport)  # type: ignore[attr-defined]
    try:
        assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (65536, 50)
    finally:
        await consumer.stop()


async def test_model_clients_split_the_connections_and_keep_them_alive() -> None:
    s = Settings(model_max_connections=1000, model_client_pools=8)
    clients = model.Clients(s)
    assert len(clients.clients) == 8
    taken = [clients.take() for _ in range(16)]
    assert taken[:8] == clients.clients and taken[8:] == clients.clients  # in turn
    for c in clients.clients:
        transport = c._client._transport  # type: ignore[attr-defined]  # SDK client -> transport
        assert type(transport).__name__ == "AiohttpTransport"  # the SDK's aiohttp transport (issue 19)
        limits = transport.limits  # type: ignore[attr-defined]  # its aiohttp connector is built with them
        assert (limits.max_connections, limits.max_keepalive_connections) == (125, 125)
        assert c.max_retries == 0
    for c in clients.clients:
        await c.close()


def test_redis_clients_parse_replies_in_c() -> None:
    """redis-py picks hiredis's parser when it is installed (`redis[hiredis]`): the gateway's
    churn profile spent a fifth of its CPU in the pure-Python RESP3 parser without it."""
    import redis.asyncio as aioredis
    from redis._parsers import _AsyncHiredisParser

    client = aioredis.from_url("redis://127.0.0.1:1")  # never connects: the parser is chosen here
    assert client.connection_pool.connection_kwargs.get("parser_class", None) in (None, _AsyncHiredisParser)
    assert client.connection_pool.make_connection()._parser.__class__ is _AsyncHiredisParser


def test_the_faust_worker_leaves_the_root_logger_at_warning(tmp_path: Path) -> None:
    """Faust's terminal spinner set the root logger to DEBUG, so every debug call of every library
    built a record for nothing (issue 19); `no_spinner` keeps the level the worker asked for."""
    import logging

    from faust.worker import Worker

    from streams.__main__ import no_spinner

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    app = create_app("unit-no-spinner", Settings(local_dir=tmp_path))
    try:
        levels = {}
        for fixed in (False, True):
            worker = Worker(app, loglevel="warning", quiet=True)
            if fixed:
                no_spinner(worker)
            worker._setup_logging()
            levels[fixed] = root.level
        assert levels == {False: logging.DEBUG, True: logging.WARNING}
        assert not logging.getLogger("httpcore2.http11").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_the_deployment_spells_out_the_kafka_client_defaults() -> None:
    """deploy/app/config.yaml (and the writer's batch) carry the client settings the benchmarks
    measured: a default changed in contract/settings.py alone fails here."""
    import yaml

    root = Path(__file__).parent.parent
    config = yaml.safe_load((root / "deploy/app/config.yaml").read_text())["data"]
    docs = yaml.safe_load_all((root / "deploy/app/writer.yaml").read_text())
    writer = next(d for d in docs if d and d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in writer["spec"]["template"]["spec"]["containers"][0]["env"]}
    fields = [
        "kafka_linger_ms",
        "kafka_fetch_min_bytes",
        "kafka_fetch_max_wait_ms",
        "kafka_idle_fetch_wait_ms",
        "kafka_compression",
        "router_fetch_min_bytes",
        "router_fetch_max_wait_ms",
        "writer_fetch_min_bytes",
        "writer_fetch_max_wait_ms",
    ]
    defaults = Settings.model_fields
    deployed = {f: config.get(f"ECO2_{f.upper()}") for f in fields}
    assert deployed == {f: str(defaults[f].default) for f in fields}
    assert env["ECO2_BATCH_SIZE"] == str(defaults["batch_size"].default)
