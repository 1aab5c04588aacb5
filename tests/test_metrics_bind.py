"""Consumers bind /metrics, /health, /ready where ECO2_METRICS_HOST says: loopback locally."""

from __future__ import annotations

import socket
import subprocess

import pytest

from contract.settings import Settings
from runtime.health import serve


def test_the_endpoint_binds_loopback_unless_told_otherwise() -> None:
    assert Settings().metrics_host == "127.0.0.1"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve(port, None)
    assert server is not None
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_the_stacks_consumer_ports_listen_on_loopback_only(settings: Settings, stack_status: dict) -> None:
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    ports = [settings.workers_metrics_port, settings.router_metrics_port, settings.writer_metrics_port]
    for port in ports:
        addrs = {
            line.split()[3].rsplit(":", 1)[0]
            for line in listening.splitlines()
            if line.split()[3].rsplit(":", 1)[1] == str(port)
        }
        assert addrs == {"127.0.0.1"}, f"port {port} listens on {addrs}"


@pytest.mark.integration
def test_every_http_service_answers_metrics_at_the_documented_path(
    settings: Settings, stack_status: dict
) -> None:
    """`curl host:port/metrics` as the runbooks write it: 200 with the exposition, no redirect
    (a mounted ASGI app answered the gateway's and the model's with a 307 to `/metrics/`)."""
    import httpx

    model = f"http://{settings.model_host}:{settings.model_port}"
    for base in (settings.api_url, settings.gateway_url, model):
        r = httpx.get(f"{base}/metrics", follow_redirects=False, timeout=10)
        assert r.status_code == 200, (base, r.status_code)
        assert "eco2_asyncio_tasks" in r.text
