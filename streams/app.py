"""The Faust app: one per process, its id (= consumer group) derived from what the process runs."""

from __future__ import annotations

import logging
import sys

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from contract.settings import Settings
from contract.topics import BY_NAME
from runtime import idle_fetch

from . import commits, rejoin
from .groups import OVERLAP_OK_CLIENT_ID


def consumer_overrides(s: Settings, fetch: tuple[int, int] | None = None) -> dict[str, object]:
    """AIOKafkaConsumer attributes Faust does not let us set (read by AIOKafkaConsumer.start()).

    Faust reads read_uncommitted unless it runs exactly-once itself; the scan API writes jobs in
    Kafka transactions, so agents must never see a job whose transaction aborted. Faust also
    hard-codes fetch_max_wait_ms=1500 with fetch_min_bytes=1, so every record that arrives ends a
    fetch and starts the next one: waiting a few ms for more records costs far less CPU."""
    min_bytes, max_wait_ms = fetch or (s.kafka_fetch_min_bytes, s.kafka_fetch_max_wait_ms)
    return {
        "_isolation_level": "read_committed",
        "_fetch_min_bytes": min_bytes,
        "_fetch_max_wait_ms": max_wait_ms,
    }


def _read_committed_consumers() -> None:
    """Patch Faust's consumer factory to apply `consumer_overrides` of the app's settings."""
    cls = faust_aiokafka.AIOKafkaConsumerThread
    if getattr(cls, "_eco2_read_committed", False):
        return
    original = cls._create_worker_consumer

    def create(self, transport):  # type: ignore[no-untyped-def]
        consumer = original(self, transport)
        overrides = getattr(self.app, "eco2_consumer_overrides", None) or {
            "_isolation_level": "read_committed"
        }
        for name, value in overrides.items():
            if not hasattr(consumer, name):  # aiokafka renamed it: fail loudly, not silently
                raise RuntimeError(f"AIOKafkaConsumer has no attribute {name}; update streams/app.py")
            setattr(consumer, name, value)
        return consumer

    cls._create_worker_consumer = create  # type: ignore[method-assign]
    cls._eco2_read_committed = True  # type: ignore[attr-defined]


def _idempotent_producers() -> None:
    """Faust sets acks (`producer_acks=-1` = all) but enables idempotence only for its own
    exactly-once transactions; without it a retried send after a lost ack (a broker killed mid
    request, a leader change) can write a stage's output or event twice. Ask aiokafka for it."""
    cls = faust_aiokafka.Producer
    if getattr(cls, "_eco2_idempotent", False):
        return
    original = cls._settings_extra

    def extra(self):  # type: ignore[no-untyped-def]
        return {**original(self), "acks": "all", "enable_idempotence": True}

    cls._settings_extra = extra  # type: ignore[method-assign]
    cls._eco2_idempotent = True  # type: ignore[attr-defined]


def broker_credentials(s: Settings) -> faust.SASLCredentials | None:
    """The component's KafkaUser login in Kubernetes (SCRAM over TLS); None on the local stack."""
    kw = s.kafka_client_kwargs()
    if not kw.get("sasl_mechanism"):
        return None
    return faust.SASLCredentials(
        username=kw["sasl_plain_username"],
        password=kw["sasl_plain_password"],
        ssl_context=kw.get("ssl_context"),
        mechanism=kw["sasl_mechanism"],
    )


def create_app(
    app_id: str, s: Settings, fetch: tuple[int, int] | None = None, monitor: type | None = None
) -> faust.App:
    """`fetch`: (min bytes, max wait ms) of its consumer; default the stage workers' settings.
    `monitor`: Faust's `Monitor` sensor class (default Faust's own; see streams/monitor.py)."""
    _read_committed_consumers()
    _idempotent_producers()
    commits.install()
    rejoin.install()  # rejoin after a rebalance longer than max_poll_interval (a Kafka outage)
    idle_fetch.install(s.kafka_idle_fetch_wait_ms)  # idle consumers long-poll, answered at once
    datadir = s.local_dir / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=f"kafka://{s.kafka_bootstrap}",
        broker_credentials=broker_credentials(s),
        # None = Faust's default; see streams/groups.py for why an opted-out worker is marked.
        broker_client_id=OVERLAP_OK_CLIENT_ID if s.stage_overlap_ok else None,
        value_serializer="raw",
        key_serializer="raw",
        datadir=str(datadir),
        web_enabled=False,  # metrics come from prometheus-client on ECO2_METRICS_PORT
        topic_allow_declare=False,  # topics come from contract/topics.py, created by the stack
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        producer_acks=-1,
        # A SIGKILLed member must not hold its partitions for long: short session, and a
        # rebalance timeout (max poll interval) in seconds, not Faust's default of 1000 s.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        broker_max_poll_interval=30.0,
        # Offsets are committed once a second (each commit is a request and a write to
        # __consumer_offsets on the broker); after 100 acks the router, ~185 events/s at 300
        # VUs, also committed twice more a second. A crash redelivers at most a second more,
        # which the memos and the idempotent apply absorb (streams/commits.py keeps the rule).
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, s.stage_concurrency * 4),
        producer_linger=s.kafka_linger_ms / 1000.0,
        producer_compression_type=s.kafka_compression_type,
        logging_config=None,
        Monitor=monitor,  # None: Faust's default
    )
    app.eco2_consumer_overrides = consumer_overrides(s, fetch)  # type: ignore[attr-defined]
    return app


def topic(app: faust.App, name: str) -> faust.TopicT:
    """A Faust topic for one of the contract's topics (raw bytes: plain JSON, readable by kcat)."""
    spec = BY_NAME[name]
    return app.topic(
        name,
        partitions=spec.partitions,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        internal=False,
    )


def trace_logger(name: str) -> logging.Logger:
    """A logger for per-job trace lines. The Faust worker sets root logging to WARNING, so these
    loggers write to the process's stderr themselves."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def quiet_noisy_loggers() -> None:
    for name in ("aiokafka", "faust.transport", "mode"):
        logging.getLogger(name).setLevel(logging.WARNING)
