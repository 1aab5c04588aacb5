"""Settings for every component, read from `ECO2_*` environment variables.

One class so that a Deployment's env var and the code that reads it cannot drift apart
(tests check every env var in `deploy/` is a field here).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

KAFKA_VERSION = "4.3.1"  # the Kafka that Strimzi 1.2 deploys by default; pinned only here
REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ECO2_", extra="ignore")

    # Where the local stack keeps binaries, data, logs and pids.
    local_dir: Path = REPO_ROOT / ".local"

    # Infrastructure.
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_controller_port: int = 9093
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

    # Simulated model latency per call, seconds (the hosted model took 5-10 s).
    sim_latency_min_s: float = 5.0
    sim_latency_max_s: float = 10.0

    # Stage workers.
    stages: str = "vision,rule,answer,reward"  # which agents this process runs
    stage_concurrency: int = 200  # jobs in flight per stage per process
    stage_timeout_s: float = 30.0
    stage_max_retries: int = 3
    retry_backoff_s: float = 0.5
    metrics_port: int = 9100  # 0 disables the Prometheus endpoint

    # Scan API input limits.
    max_image_url_len: int = 2048
    max_user_input_len: int = 1000
    max_body_bytes: int = 16384
    image_host_allowlist: list[str] = []  # empty = any public host
    idempotency_ttl_s: int = 24 * 3600

    # Redis state.
    state_ttl_s: int = 24 * 3600
    result_ttl_s: int = 3600

    # SSE gateway.
    keepalive_s: float = 15.0
    max_stream_s: float = 300.0
    max_connections: int = 10000
    cors_origins: list[str] = ["*"]

    # Persistence writer.
    batch_size: int = 50
    batch_timeout_s: float = 1.0
    writer_max_retries: int = 5

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
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
