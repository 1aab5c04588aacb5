"""Settings for every component, read from `ECO2_*` environment variables.

One class so that a Deployment's env var and the code that reads it cannot drift apart
(tests check every env var in `deploy/` is a field here).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.pipeline import PIPELINE

KAFKA_VERSION = "4.3.1"  # the Kafka that Strimzi 1.2 deploys by default; pinned only here
REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    # `.eco2.env` at the repo root (git-ignored) overrides defaults for every process of a checkout,
    # e.g. other ports so that two checkouts run two stacks side by side; real env vars win.
    model_config = SettingsConfigDict(env_prefix="ECO2_", extra="ignore", env_file=REPO_ROOT / ".eco2.env")

    # Where the local stack keeps binaries, data, logs and pids.
    local_dir: Path = REPO_ROOT / ".local"

    # Infrastructure.
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_controller_port: int = 9093
    # Local stack: KRaft nodes (broker+controller each). With N > 1 node i (0-based) listens on
    # the bootstrap port + 2i and the controller port + 2i, and `kafka_bootstrap` lists them all.
    kafka_nodes: int = 1
    kafka_heap: str = ""  # JVM heap per local node; empty = 768m alone, 512m each of several
    # Kafka client security: PLAINTEXT locally; in Kubernetes SASL_SSL with the component's
    # KafkaUser (SCRAM-SHA-512 password from the Secret Strimzi creates) and the cluster CA.
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""  # PEM CA (Strimzi's <cluster>-cluster-ca-cert Secret, key ca.crt)
    # Request batching (docs/benchmarks.md, "CPU per scan"): every Kafka request costs the broker
    # and the client a round of syscalls, and every fetch that returns wakes Faust's consumer
    # thread, which decodes the whole response (48 stage partitions) in Python. Records a stage
    # worker produces within `kafka_linger_ms` share one produce request; its fetches wait up to
    # `kafka_fetch_max_wait_ms` for `kafka_fetch_min_bytes` (Faust's 1 byte returned per record:
    # the consumer thread was 40% of the worker's CPU). Each adds at most that much to a hop
    # (the model takes seconds): at 300 VUs 64 KiB / 100 ms cut CPU per job 53.6 -> 45.4 ms for
    # +0.2 s E2E p95; idle, the worker polls 10 times a second (~2% of a core).
    kafka_linger_ms: int = 25
    kafka_fetch_min_bytes: int = 65536
    kafka_fetch_max_wait_ms: int = 100
    # A consumer's fetch that follows an empty one waits up to this long for the first record
    # (min bytes 1, answered as soon as one is committed) instead of its own max wait
    # (runtime/idle_fetch.py): idle, the stack's consumers fetched ~31 times a second for nothing,
    # most of the idle broker's CPU. Busy consumers fetch as configured. 0 = off.
    kafka_idle_fetch_wait_ms: int = 1000
    # Compression of every batch the project produces (the log is stored as produced, consumers
    # decompress). zstd: the JSON records shrink 1.7x alone and 3-5x in batches of 4-16, for ~20 us
    # per single-record batch; it halves the disk Kafka needs at retention (docs/operations.md).
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"
    redis_url: str = "redis://127.0.0.1:6390/0"
    postgres_dsn: str = "postgresql://eco2:eco2@127.0.0.1:5440/eco2"

    # HTTP services of the project.
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8081
    model_host: str = "127.0.0.1"
    model_port: int = 8090
    public_base_url: str = ""  # prefix for stream_url/result_url; empty = relative URLs

    # Model (OpenAI-compatible). Without an API key the simulated model server is used.
    openai_api_key: str = ""
    openai_base_url: str = ""
    vision_model: str = "gpt-4o-mini"
    answer_model: str = "gpt-4o-mini"
    supported_models: list[str] = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"]
    model_max_connections: int = 1000  # per worker process, all kept alive (>= stage_concurrency)
    model_client_pools: int = 8  # the connections split over this many clients (streams/model.py)

    # Simulated model latency per call, seconds (the hosted model took 5-10 s).
    sim_latency_min_s: float = 5.0
    sim_latency_max_s: float = 10.0

    # Stage workers.
    stages: str = ",".join(PIPELINE)  # which agents this process runs (default: all)
    stage_concurrency: int = 500  # jobs in flight per stage per process (model calls take seconds)
    stage_timeout_s: float = 30.0
    stage_max_retries: int = 3
    retry_backoff_s: float = 0.5
    metrics_port: int = 9100  # 0 disables the Prometheus endpoint
    # Where workers, router and writer bind /metrics, /health, /ready: loopback like every other
    # local service; the pods set 0.0.0.0 (deploy/app/config.yaml) for Prometheus and the kubelet.
    metrics_host: str = "127.0.0.1"
    # Local stack: processes per component. Workers share one consumer group (same ECO2_STAGES),
    # routers share eco2-router, gateways share the gateway port (SO_REUSEPORT). Process i > 1
    # serves its metrics on the component's metrics port + 10 * (i - 1).
    worker_processes: int = 1
    # A deliberate second stage group beside the stack's workers (tests that run a private
    # one-stage worker): it skips the overlapping-stage-groups refusal and others ignore it.
    stage_overlap_ok: bool = False
    router_processes: int = 1
    gateway_processes: int = 1
    # Local stack: where `eco2 stack up` serves each consumer process's metrics (ECO2_METRICS_PORT).
    workers_metrics_port: int = 9101
    router_metrics_port: int = 9102
    writer_metrics_port: int = 9103

    # Health of the consumers (stage workers, router, writer): /health and /ready on the metrics
    # port fail when work is pending and nothing was fetched or committed for health_stall_s
    # (longer than the slowest legitimate job: stage_timeout_s x attempts), when no partition
    # was assigned health_unassigned_s after a rebalance (0: never), or when the event loop was
    # blocked for health_loop_block_s. runtime/health.py says why.
    health_stall_s: float = 300.0
    health_unassigned_s: float = 300.0
    health_loop_block_s: float = 10.0
    health_interval_s: float = 2.0

    # Stage workers: one INFO line per stage and job with its trace id (`stage=... job=...
    # trace=...`). Off by default: formatting and writing it was ~3% of a worker's CPU (issue 19);
    # the trace id rides in every record's `traceparent` header either way.
    stage_trace_log: bool = False

    # Scan API input limits.
    max_image_url_len: int = 2048
    max_user_input_len: int = 1000
    max_body_bytes: int = 16384
    image_host_allowlist: list[str] = []  # empty = any public host
    idempotency_ttl_s: int = 24 * 3600  # how long an X-Idempotency-Key is remembered
    max_idempotency_key_len: int = 200
    max_user_id_len: int = 128  # X-User-ID (and the gateway's dev ?user=); contract/identity.py
    api_txn_producers: int = 4  # transactional producers committing job batches in parallel
    # Group-commit window: a transaction waits this long after its first job for more (0 = only
    # what is already queued). Fewer transactions (~4 broker requests each) for up to this much
    # more POST latency; issue 19 measured it (docs/benchmarks.md).
    api_txn_window_ms: int = 0
    api_submit_timeout_s: float = 10.0  # a POST that Kafka cannot take this fast answers 503

    # Per-user quotas (quota/), kept in Redis and shared by every API and gateway replica. Sized
    # from the replaced app: one scan at a time per user (~15-20 s each), a few retries. 0 = no
    # limit. `eco2 stack up` runs the local stack without them unless set (docs/operations.md).
    scan_burst: int = 5  # scans a user may post at once (token bucket size)
    scan_rate_per_min: float = 6.0  # ... and sustained (tokens per minute)
    inflight_max: int = 3  # a user's jobs between POST and their terminal event
    inflight_lease_s: int = 600  # a job counts at most this long (longer than any job lives)
    streams_max: int = 5  # a user's concurrent SSE streams across all gateways
    stream_lease_s: int = 30  # a stream's slot expires unless its gateway renews it (every third)
    quota_timeout_s: float = 0.5  # a quota check Redis cannot answer this fast is skipped (fail open)

    # Redis state.
    state_ttl_s: int = 24 * 3600  # a job's state and history while it runs
    result_ttl_s: int = 3600  # ... once it has finished (then its result comes from Postgres)
    # Stage memos only make a redelivered stage re-emit identical events; redeliveries come within
    # seconds (a rebalance) or after a restart, so hours, not the state's day: they are half of
    # what a job keeps in Redis (the soak, docs/benchmarks.md).
    memo_ttl_s: int = 6 * 3600
    # Self-healing view (view/marker.py, streams/heal.py): how often a router checks that Redis
    # still holds the view, and how far back a rebuild replays (0 = state_ttl_s).
    view_check_s: float = 1.0
    rebuild_window_s: int = 0
    # A flushed view is replayed newest first, in chunks of up to this many records per partition
    # going back from the log's end (view/rebuild.py): a job is served once its chunk is back.
    rebuild_chunk: int = 5000
    # How often a router records the offsets below which the ready view is whole (the checkpoint
    # a rebuild after a restart starts from); 0 = never (every rebuild replays the window).
    view_checkpoint_s: float = 5.0

    # SSE gateway.
    keepalive_s: float = 15.0
    max_stream_s: float = 300.0
    max_connections: int = 10000
    cors_origins: list[str] = ["*"]
    gateway_redis_pool: int = 8  # history/state connections per gateway (+1 pub/sub connection)
    client_queue_size: int = 64  # live events buffered per client before it is resynced from history
    unknown_job_wait_s: float = 3.0  # a just-submitted job may reach Redis a moment after the POST
    gap_wait_s: float = 2.0  # how long a stream holds events back waiting for a missing seq
    view_wait_s: float = 10.0  # how long a new stream waits for a rebuilding view before a 503
    # Signed stream URLs (contract/stream_token.py): the POST's stream_url carries a JWT for the
    # job and its owner. Empty secret = one random key per checkout in .local/stream-token.key;
    # in Kubernetes every API and gateway pod gets the same key from a Secret.
    stream_token_secret: SecretStr = SecretStr("")
    stream_token_ttl_s: int = 900
    # Development only: `?user=NAME` authenticates a stream (anyone could claim any user).
    gateway_allow_user_query: bool = False

    # Event router (scan.events -> Redis).
    router_group: str = "eco2-router"  # = contract.topics.ROUTER_GROUP; tests run their own group
    router_batch_max: int = 500  # events per Redis round trip
    # A batch is cut this long after its first event (streams/take.py): adds at most this latency,
    # as Faust's 20 ms clock did at most 20 ms (10 ms on average) while waking 50 times a second.
    router_batch_within_s: float = 0.01
    # The router takes ~10 events per scan: a fetch waits up to 50 ms for 64 KiB, so one fetch,
    # one wake-up and one Redis round trip carry several events (halved its CPU per scan; adds
    # at most 50 ms to SSE delivery).
    router_fetch_min_bytes: int = 65536
    router_fetch_max_wait_ms: int = 50

    # Persistence writer.
    # A batch is one Postgres statement and one offset commit: 200 or a second's worth (at 300
    # VUs ~185 events a second, of which ~18 terminal rows; 50 made ~4 commits a second).
    batch_size: int = 200
    batch_timeout_s: float = 1.0
    writer_max_retries: int = 5
    writer_group: str = "eco2-writer"  # = contract.topics.WRITER_GROUP; tests run their own group
    writer_backoff_max_s: float = 10.0  # cap of the backoff while Postgres is down or slow
    # The writer is not latency-critical (results are in Redis already): fewer, fuller fetches,
    # as long as its batches wait anyway (batch_timeout_s).
    writer_fetch_min_bytes: int = 65536
    writer_fetch_max_wait_ms: int = 1000
    writer_statement_timeout_s: float = 30.0  # a batch slower than this is retried (slow Postgres)

    @model_validator(mode="after")
    def _list_every_kafka_node(self) -> Settings:
        """With several local nodes every client bootstraps from all of them (one may be down)."""
        if self.kafka_nodes > 1 and "," not in self.kafka_bootstrap:
            host, _, port = self.kafka_bootstrap.rpartition(":")
            self.kafka_bootstrap = ",".join(f"{host}:{int(port) + 2 * i}" for i in range(self.kafka_nodes))
        return self

    @property
    def model_base_url(self) -> str:
        """The OpenAI base URL: the configured one, else the simulated model server."""
        if self.openai_base_url:
            return self.openai_base_url
        return f"http://{self.model_host}:{self.model_port}/v1"

    @property
    def model_api_key(self) -> str:
        return self.openai_api_key or "simulated"

    @property
    def kafka_compression_type(self) -> str | None:
        """`compression_type` for aiokafka producers (Faust: `producer_compression_type`)."""
        return None if self.kafka_compression == "none" else self.kafka_compression

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """Security keyword arguments for every aiokafka client; empty when PLAINTEXT."""
        if self.kafka_security_protocol == "PLAINTEXT":
            return {}
        from aiokafka.helpers import create_ssl_context

        kwargs: dict[str, Any] = {"security_protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = create_ssl_context(cafile=self.kafka_ssl_cafile or None)
        if self.kafka_security_protocol.startswith("SASL_"):
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            kwargs["sasl_plain_password"] = self.kafka_sasl_password
        return kwargs

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
